"""The lock files are current with pyproject.toml, and the image and CI install from them.

``make lock`` writes requirements.lock (the image's dependencies) and requirements-dev.lock (the
same plus the dev extra; ``make venv`` and CI install it) with uv. These checks are offline: they
read the files, they resolve nothing.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: Distributions built from this repository (uv's path sources): no hash can pin them, so the
#: locks leave them out and make venv and the Dockerfile build them, without dependencies.
LOCAL = {
    canonicalize_name(name): ROOT / source["path"]
    for name, source in PYPROJECT["tool"]["uv"]["sources"].items()
}
#: How uv's annotation names a requirement that comes straight from pyproject.toml.
DIRECT = f"{PROJECT['name']} (pyproject.toml)"


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: int
    via: frozenset[str]


@cache
def pins(path: Path) -> dict[str, Pin]:
    """The lock's entries by canonical name: version, number of hashes, what requires it."""
    found: dict[str, Pin] = {}
    text = path.read_text()
    # uv's trailer names what --no-emit-package left out (the LOCAL distributions).
    body, _, excluded = text.partition("\n# The following packages were excluded from the output:")
    left_out = {canonicalize_name(line.lstrip("# ")) for line in excluded.strip().splitlines()}
    assert left_out <= set(LOCAL), f"{path.name} leaves out {left_out}"
    for entry in re.split(r"\n(?=[A-Za-z0-9])", body.split("\n", 2)[2]):
        head = entry.split("\\", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)(?: ; .*)?", head)
        assert match, f"{path.name}: not a pinned requirement: {head!r}"
        annotation = entry.split("# via", 1)[1] if "# via" in entry else ""
        via = frozenset(
            line.strip().lstrip("#").strip() for line in annotation.splitlines() if line.strip()
        )
        name = canonicalize_name(match[1].split("[")[0])
        found[name] = Pin(name, match[2], entry.count("--hash=sha256:"), via)
    return found


def requirements(extra: str | None) -> Iterator[Requirement]:
    """pyproject.toml's dependencies, or those of one extra; for a local distribution, its own
    dependencies instead of itself."""
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    for text in listed:
        req = Requirement(text)
        local = LOCAL.get(canonicalize_name(req.name))
        if local is None:
            yield req
            continue
        project = tomllib.loads((local / "pyproject.toml").read_text())["project"]
        assert req.specifier.contains(project["version"]), f"{req}: {local} is {project['version']}"
        yield from (Requirement(dependency) for dependency in project["dependencies"])


LOCKS = [(RUNTIME_LOCK, [None]), (DEV_LOCK, [None, "dev"])]


@pytest.mark.parametrize(("lock", "extras"), LOCKS, ids=["runtime", "dev"])
def test_every_pyproject_dependency_is_locked_at_a_version_it_allows(
    lock: Path, extras: list[str | None]
) -> None:
    """Each dependency pyproject.toml lists is pinned in the lock, within its specifier."""
    locked = pins(lock)
    for extra in extras:
        for req in requirements(extra):
            pin = locked.get(canonicalize_name(req.name))
            assert pin is not None, f"{req} is not in {lock.name}: run make lock"
            assert req.specifier.contains(pin.version, prereleases=True), (
                f"{lock.name} pins {pin.name}=={pin.version}, pyproject.toml wants {req}: "
                "run make lock"
            )


@pytest.mark.parametrize(("lock", "extras"), LOCKS, ids=["runtime", "dev"])
def test_the_lock_holds_nothing_pyproject_no_longer_asks_for(
    lock: Path, extras: list[str | None]
) -> None:
    """A package locked as a direct dependency is still one, and every other package is required
    by one in the same lock: a dependency dropped from pyproject.toml leaves no entry behind."""
    direct = {canonicalize_name(r.name) for extra in extras for r in requirements(extra)}
    locked = pins(lock)
    for pin in locked.values():
        assert pin.via, f"{lock.name}: {pin.name} says nothing requires it"
        if DIRECT in pin.via:
            assert pin.name in direct, f"{lock.name}: {pin.name} is no longer in pyproject.toml"
        # "-c requirements-dev.lock": the runtime lock is resolved within the dev lock's pins.
        parents = {canonicalize_name(v) for v in pin.via if v != DIRECT and not v.startswith("-")}
        parents -= set(LOCAL)  # built from the repository, not locked
        assert parents <= set(locked), f"{lock.name}: {pin.name} is required by {parents}"


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, DEV_LOCK], ids=["runtime", "dev"])
def test_every_locked_package_is_pinned_with_hashes(lock: Path) -> None:
    """pip's --require-hashes mode needs an exact version and a hash for every package."""
    for pin in pins(lock).values():
        assert pin.hashes > 0, f"{lock.name}: {pin.name} has no hash"


def test_both_locks_pin_the_same_version_of_what_they_share() -> None:
    """CI tests the versions the image ships: the dev lock agrees with the runtime lock."""
    runtime, dev = pins(RUNTIME_LOCK), pins(DEV_LOCK)
    assert set(runtime) <= set(dev)
    assert {n: p.version for n, p in runtime.items()} == {n: dev[n].version for n in runtime}


def test_make_lock_writes_both_locks_and_make_venv_installs_the_dev_lock() -> None:
    """One make target regenerates both locks; the venv (and so CI) installs from the lock with
    hashes checked, then the project itself without dependencies."""
    makefile = (ROOT / "Makefile").read_text()
    lock_recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert lock_recipe, "a make lock target"
    assert "requirements.lock" in lock_recipe[1]
    assert "requirements-dev.lock" in lock_recipe[1]
    venv_recipe = re.search(r"^\$\(VENV_STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert venv_recipe
    assert "requirements-dev.lock" in venv_recipe[1], "the venv is rebuilt when the lock changes"
    assert re.search(r"--require-hashes.*-r requirements-dev\.lock", venv_recipe[2])
    assert re.search(r"--no-deps.*-e \.", venv_recipe[2])
    for name, local in LOCAL.items():
        where = local.relative_to(ROOT)
        assert f"--no-emit-package {name}" in makefile, f"make lock leaves {name} out"
        assert re.search(rf"--no-deps.*-e {where}$", venv_recipe[2], re.MULTILINE), name
        assert f"{where}/pyproject.toml" in venv_recipe[1], f"a change to {where} rebuilds the venv"
    assert "make venv" in (ROOT / ".ci" / "run").read_text()


def test_the_image_installs_the_runtime_lock_on_a_base_pinned_by_digest() -> None:
    """The Dockerfile builds from requirements.lock with hashes checked, the project without
    dependencies, on a base image named by tag and digest; the lock is in the build context."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert re.fullmatch(r"python:3\.11-slim(-bookworm)?@sha256:[0-9a-f]{64}", base), base
    assert re.search(r"--require-hashes[^\n]*-r requirements\.lock", dockerfile)
    assert re.search(r"--no-deps[^\n]*\.$", dockerfile, flags=re.MULTILINE)
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!requirements.lock" in dockerignore
    for local in LOCAL.values():
        where = local.relative_to(ROOT)
        assert re.search(rf"--no-deps[^\n]*\./{where}$", dockerfile, flags=re.MULTILINE)
        assert f"!{where}" in dockerignore
