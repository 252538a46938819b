"""The README's configuration table and commands stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.config import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
NO_DEFAULT = "\u2013"  # the en dash the table shows for "no default"


def _table_variables() -> list[str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([A-Z0-9_]+)` \|", section, flags=re.MULTILINE)


def test_every_setting_is_in_the_configuration_table_once() -> None:
    """Each Settings field appears exactly once in the README table, and nothing else does."""
    documented = _table_variables()
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert set(documented) == {name.upper() for name in Settings.model_fields}


def test_documented_defaults_match_the_settings_model() -> None:
    """The default column of the table is the model's default (or a dash when there is none)."""
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for name, default in re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", section, re.MULTILINE):
        field = Settings.model_fields[name.lower()]
        value = field.get_default(call_default_factory=True)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        shown = default.strip().strip("`")
        if value in (None, []):
            assert shown == NO_DEFAULT, name
        elif isinstance(value, bool):
            assert shown == str(value).lower(), name  # as the environment spells it
        else:
            assert shown == str(value), name


def test_ci_runs_the_test_command_the_readme_gives() -> None:
    """`.ci/run` runs `make test`, the command the README tells a newcomer to use."""
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_ci_runs_the_demo_the_readme_gives_before_the_tests() -> None:
    """`.ci/run` runs `make demo`, the README's first command, as its own phase before the tests."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r"^make (\w+)", ci, flags=re.MULTILINE)
    assert "make demo" in README
    assert "demo" in commands
    assert commands.index("demo") < commands.index("test")
