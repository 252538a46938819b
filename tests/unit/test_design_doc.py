"""docs/design.md is the repository's own design document, and what cites it finds its sections.

A clone has only the repository: a citation of a file outside it (a bare design document name,
a sibling directory) points nowhere. Every ``docs/design.md §N`` names a section that exists, and
every private API of a dependency that the worker's code uses (each ``# noqa: SLF001``) is named,
with its reason, in the document's section on the Faust and aiokafka facts the code relies on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs/design.md"

#: Where the project's own text lives (tests/data holds third-party files, kept as they came).
SCANNED = ("worker", "tests", "bench", "scripts", "schemas", "k8s", "deploy", "docs", ".ci")
SCANNED_FILES = ("README.md", "Makefile", "Dockerfile", "docker-compose.yml", "pyproject.toml")
SKIPPED = (ROOT / "tests" / "data",)
TEXT_SUFFIXES = {".py", ".md", ".json", ".yaml", ".yml", ".toml", ".sh", ".xml", ""}

HEADING = re.compile(r"^(#{2,3}) (\d+(?:\.\d+)?)\.? (\S.*)$", re.MULTILINE)
#: The design document named without its ``docs/`` directory, alone or behind another path.
BARE_CITATION = re.compile(r"(?<![\w-])(?:\.{1,2}/[\w./-]*)?(?<!docs/)design\.md")
OUTSIDE_PATH = re.compile(r"\.\./shared\b|/work/(?:shared|main|wt)\b")
CITATION = re.compile(r"docs/design\.md((?:,? (?:and )?§\d+(?:\.\d+)?)+)")
#: A private attribute of another object (``self._x`` is the class's own).
PRIVATE_USE = re.compile(r"(?<!\bself)\._([a-z]\w*)")


def _project_files() -> Iterator[Path]:
    for name in SCANNED_FILES:
        yield ROOT / name
    for directory in SCANNED:
        for path in sorted((ROOT / directory).rglob("*")):
            if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
                continue
            if any(path.is_relative_to(skipped) for skipped in SKIPPED) or "__pycache__" in str(
                path
            ):
                continue
            yield path


def _sections() -> dict[str, str]:
    """Section number → title, for every numbered heading of docs/design.md."""
    return {number: title for _, number, title in HEADING.findall(DESIGN.read_text("utf-8"))}


def test_the_design_document_is_in_the_repository_with_numbered_sections() -> None:
    """docs/design.md exists; its top-level sections are numbered 1, 2, 3, ... without a gap."""
    assert DESIGN.is_file(), "docs/design.md is missing"
    text = DESIGN.read_text("utf-8")
    top = [int(number) for level, number, _ in HEADING.findall(text) if level == "##"]
    assert top, "no numbered sections"
    assert top == list(range(1, len(top) + 1))
    for level, number, _ in HEADING.findall(text):
        if level == "###":
            assert number.split(".")[0] in {str(n) for n in top}, number


def test_nothing_cites_a_file_outside_the_repository() -> None:
    """No bare design document name and no path into a sibling checkout, in any project file."""
    found = []
    for path in _project_files():
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if BARE_CITATION.search(line) or OUTSIDE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_citation_names_a_section_that_exists() -> None:
    """Each ``docs/design.md §N`` (or ``§N.M``) names a numbered heading of the document."""
    sections = _sections()
    cited = 0
    missing = []
    for path in _project_files():
        for match in CITATION.finditer(path.read_text("utf-8")):
            for number in re.findall(r"§(\d+(?:\.\d+)?)", match.group(1)):
                cited += 1
                if number not in sections:
                    missing.append(f"{path.relative_to(ROOT)}: §{number}")
    assert cited, "nothing cites the design document"
    assert not missing, "\n".join(missing)


def test_every_private_api_use_has_its_reason_and_is_in_the_design_document() -> None:
    """Each ``# noqa: SLF001`` in worker/ gives a reason, and its name is in the document."""
    text = DESIGN.read_text("utf-8")
    uses = 0
    problems = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if "noqa: SLF001" not in line:
                continue
            uses += 1
            where = f"{path.relative_to(ROOT)}:{number}"
            if not re.search(r"noqa: SLF001\s+\S", line):
                problems.append(f"{where}: no reason after the noqa")
            code = line.split("#", 1)[0]
            for name in PRIVATE_USE.findall(code):
                if f"`_{name}" not in text and f"._{name}" not in text:
                    problems.append(f"{where}: _{name} is not in docs/design.md")
    assert uses, "no private API use is marked"
    assert not problems, "\n".join(problems)
