"""Debian's headless Chromium, driven over the Chrome DevTools protocol (a WebSocket, aiohttp).

Only what the chat page's test needs: open a page, type into the focused field and press Enter
as a user would (real key events), evaluate an expression, reload, take a PNG screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.harness import stop_process

#: Flags for a machine without network access: no background traffic, no sandbox (root in CI).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=900,640",
    "--remote-debugging-port=0",
)


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is not installed: apt-get install chromium chromium-driver")
    return found


class Chromium:
    """One headless browser with a fresh profile; ``async with Chromium(dir) as page``."""

    def __init__(self, profile_dir: Path) -> None:
        self.profile_dir = profile_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    def _launch(self) -> subprocess.Popen[bytes]:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        with (self.profile_dir / "chromium.log").open("ab") as log:
            return subprocess.Popen(
                [chromium_binary(), *FLAGS, f"--user-data-dir={self.profile_dir}", "about:blank"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    async def __aenter__(self) -> Chromium:
        self.proc = self._launch()
        port_file = self.profile_dir / "DevToolsActivePort"
        async with asyncio.timeout(30):
            while not port_file.exists() or not port_file.read_text().strip():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"chromium exited with {self.proc.returncode}")
                await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as reply:
            targets = await reply.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        stop_process(self.proc, 10)

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            body = json.loads(message.data)
            future = self._waiting.pop(body.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(body)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        call = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call] = future
        await self._ws.send_str(json.dumps({"id": call, "method": method, "params": params}))
        async with asyncio.timeout(30):
            body = await future
        if "error" in body:
            raise RuntimeError(f"{method}: {body['error']}")
        result: dict[str, Any] = body.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        async with asyncio.timeout(timeout_s):
            while not (value := await self.evaluate(expression)):  # noqa: ASYNC110 (a page)
                await asyncio.sleep(0.05)
        return value

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href === {json.dumps(url)}")
        await self.wait_for("document.readyState === 'complete'")

    async def reload(self) -> None:
        await self.evaluate("window.__beforeReload = true")
        await self.send("Page.reload")
        await self.wait_for("!window.__beforeReload && document.readyState === 'complete'")

    async def type_and_press_enter(self, text: str) -> None:
        """Type into the focused element and press Enter, as key events."""
        await self.send("Input.insertText", text=text)
        enter = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        await self.send("Input.dispatchKeyEvent", type="keyDown", text="\r", **enter)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **enter)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
