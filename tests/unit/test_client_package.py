"""The client distribution installs and imports without Faust: its declared dependencies are
aiokafka and pydantic only, its modules import nothing else, and its built wheel imports in an
interpreter that sees only those two distributions (and what they need), not the worker's."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients/python"
PACKAGE = CLIENT / "vapi_stream_client"
ALLOWED = {"aiokafka", "pydantic"}
#: Top-level modules the client may import besides the standard library and itself.
ALLOWED_MODULES = {"aiokafka", "pydantic", "pydantic_core"}
#: The worker's own dependencies a producing service must not get through the client.
WORKER_ONLY = ("faust", "mode", "httpx", "httpx_sse", "structlog", "prometheus_client", "worker")


def test_the_declared_dependencies_are_aiokafka_and_pydantic_only() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    names = {canonicalize_name(Requirement(text).name) for text in project["dependencies"]}
    assert names == ALLOWED
    assert not project.get("optional-dependencies")


@pytest.mark.parametrize("module", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_every_module_imports_the_standard_library_aiokafka_pydantic_or_itself(
    module: Path,
) -> None:
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert (
                top in sys.stdlib_module_names
                or top in ALLOWED_MODULES
                or top in {"vapi_stream_client", "__future__"}
            ), f"{module.name} imports {name}"


def test_importing_it_in_a_fresh_interpreter_loads_no_worker_dependency() -> None:
    """Importing every module of the client loads none of the worker's own dependencies."""
    modules = [f"vapi_stream_client.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys\n"
        f"import vapi_stream_client, {', '.join(modules)}\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({WORKER_ONLY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def _closure(names: set[str]) -> set[str]:
    """The installed distributions ``names`` need, recursively (markers for this interpreter)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _top_level(distribution: str) -> set[str]:
    files = metadata.files(distribution) or []
    return {
        f.parts[0].removesuffix(".py")
        for f in files
        if not f.parts[0].endswith((".dist-info", ".pth", "__pycache__")) and f.parts[0] != ".."
    }


def test_the_built_wheel_imports_with_only_its_declared_dependencies(tmp_path: Path) -> None:
    """The wheel's metadata requires aiokafka and pydantic only; unpacked beside those two and
    their own dependencies alone (no site-packages), it imports and folds a delta."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
            "--wheel-dir", str(wheels), str(CLIENT),
        ],
        check=True,
        timeout=120,
    )  # fmt: skip
    (wheel,) = wheels.glob("vapi_stream_client-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(
                next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            )
            .decode()
            .splitlines()
            if line.startswith("Requires-Dist:")
        ]
        assert {canonicalize_name(Requirement(r).name) for r in requires} == ALLOWED
        tops = {name.split("/")[0] for name in archive.namelist()}
        assert {t for t in tops if not t.endswith(".dist-info")} == {"vapi_stream_client"}
        archive.extractall(site)
    for distribution in _closure(ALLOWED):
        for top in _top_level(distribution):
            source = Path(str(metadata.distribution(distribution).locate_file(top)))
            for candidate in (source, source.with_suffix(".py")):
                if candidate.exists():
                    (site / candidate.name).symlink_to(candidate)
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "from vapi_stream_client import ChatDelta, StreamFolder, ChatClient\n"
        "d = ChatDelta(request_id='r', conversation_id='c', chat_id='x', attempt=1, seq=0,"
        " delta='hi', ts=0.0)\n"
        "print(len(StreamFolder().on_delta(d)), sorted(m for m in sys.modules"
        f" if m.split('.')[0] in {WORKER_ONLY!r}))"
    )
    # -S: no site-packages, so only the standard library and ``site`` are importable.
    out = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 []"
    assert not re.search(r"faust|httpx", out.stderr)
