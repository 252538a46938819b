"""bench.table_recovery's command line: what it refuses before it starts anything."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from bench import table_recovery


def test_rocksdb_without_rocksdict_exits_2_and_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "rocksdict" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    started: list[str] = []
    monkeypatch.setattr(table_recovery, "LocalBroker", lambda: started.append("broker"))
    assert table_recovery.main(["--store", "rocksdb", "--conversations", "10"]) == 2
    assert "pip install rocksdict" in capsys.readouterr().err
    assert started == []


@pytest.mark.parametrize(
    ("store", "phases"),
    [("rocksdb", "full,expiring"), ("memory", "restart"), ("memory", "full,nonsense")],
)
def test_a_phase_the_store_has_not_is_refused(
    store: str, phases: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        table_recovery.main(["--store", store, "--phases", phases])
    assert exited.value.code == 2
    assert f"--store {store} has no phase" in capsys.readouterr().err
