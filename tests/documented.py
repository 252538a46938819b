"""The commands README.md, the Dockerfile and docker-compose.yml show, read from the files.

Tests run these commands (tests/e2e/test_documented_commands.py), so a changed comment or code
block changes what is tested. Each source's commands are sorted into the kinds a test knows how to
run; a command of no known kind raises ``UnknownCommand`` (and
tests/unit/test_documented_command_kinds.py fails on it at once), so nothing shown to an operator
goes untested silently.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"

#: The README's own line that starts a broker; the tests bring theirs (the line says
#: "or point KAFKA_BOOTSTRAP_SERVERS at a cluster"), so it is the one line not run.
README_BROKER_LINE = "scripts/local-kafka.sh up"


class UnknownCommand(ValueError):
    """A documented command that no test knows how to run."""


def comment_commands(path: Path) -> list[list[str]]:
    """The ``docker ...`` commands in a file's ``#`` comments, as argv lists.

    A command is a comment line indented by at least three spaces after ``#`` whose first word
    is ``docker``; lines ending in a backslash continue on the next comment line, and a
    trailing ``# ...`` is a shell comment, not part of the command.
    """
    bodies = [line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(bodies))
    return [
        shlex.split(body, comments=True)
        for body in joined.splitlines()
        if body.startswith("   ") and body.split()[:1] == ["docker"]
    ]


def readme_shell_blocks() -> list[str]:
    """The README's fenced ``sh`` blocks, in order."""
    return re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def shell_lines(block: str) -> list[list[str]]:
    """A shell block's commands as words: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


@dataclass(frozen=True)
class ComposeRun:
    """``docker compose run --rm SERVICE ARGS``: ARGS given to the service's image entrypoint."""

    service: str
    args: list[str]


def compose_file() -> dict[str, Any]:
    """docker-compose.yml, YAML merge keys resolved."""
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def compose_steps() -> list[ComposeRun | str]:
    """The compose file's commands in order: ``"up"`` for ``docker compose up ...`` (the tests
    start the services that run this project's image), a ``ComposeRun`` for each one-off run."""
    steps: list[ComposeRun | str] = []
    for argv in comment_commands(COMPOSE):
        if argv[:3] == ["docker", "compose", "up"]:
            steps.append("up")
        elif argv[:4] == ["docker", "compose", "run", "--rm"] and len(argv) > 5:
            steps.append(ComposeRun(service=argv[4], args=argv[5:]))
        else:
            raise UnknownCommand(f"docker-compose.yml: {shlex.join(argv)}")
    return steps


def compose_image_services() -> dict[str, dict[str, Any]]:
    """The services built from this project's Dockerfile (the worker replicas, the simulator)."""
    return {
        name: service for name, service in compose_file()["services"].items() if "build" in service
    }


# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass(frozen=True)
class DockerRun:
    """``docker run [options] IMAGE [ARGS]`` with the environment its ``-e`` options set.

    ``env`` maps a name to its value, or to None for ``-e NAME`` (the value comes from the
    caller's shell). ``args`` is empty when the image's CMD applies.
    """

    env: dict[str, str | None] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)


def dockerfile_steps() -> list[DockerRun | str]:
    """The Dockerfile's comment commands: ``"build"`` for ``docker build`` (the tests check the
    image's content offline), a ``DockerRun`` for each ``docker run``."""
    steps: list[DockerRun | str] = []
    for argv in comment_commands(DOCKERFILE):
        if argv[:2] == ["docker", "build"]:
            steps.append("build")
        elif argv[:2] == ["docker", "run"]:
            steps.append(parse_docker_run(argv[2:]))
        else:
            raise UnknownCommand(f"Dockerfile: {shlex.join(argv)}")
    return steps


def parse_docker_run(options: list[str]) -> DockerRun:
    """``docker run``'s options, image and arguments (the options this project's docs use)."""
    run = DockerRun()
    words = iter(options)
    for word in words:
        if word in ("--rm", "-d", "-it", "-i", "-t"):
            continue
        if word in ("-e", "--env"):
            name, has_value, value = next(words).partition("=")
            run.env[name] = value if has_value else None
        elif word in ("-p", "--publish", "--name", "-v", "--volume", "--network"):
            next(words)
        elif word.startswith("-"):
            raise UnknownCommand(f"Dockerfile: docker run option {word!r}")
        else:
            run.args.extend(words)  # the image is `word`; what follows are its arguments
    return run


def dockerfile_cmd() -> list[str]:
    """The image's CMD (exec form)."""
    (cmd,) = re.findall(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return list(yaml.safe_load(cmd))


# ---------------------------------------------------------------------------------------------
# README.md


def readme_steps() -> list[tuple[str, str]]:
    """The README's shell blocks, each as (kind, block).

    Kinds: ``"make"`` (a block of ``make`` targets, each run on its own), ``"by-hand"`` (a block
    that runs the project's commands with ``vapi-worker``, run as one script), ``"cluster"`` (a
    block of ``kubectl`` commands: there is no cluster here, so tests/unit/test_manifests.py
    builds every kustomization such a block applies, and checks what it creates).
    """
    steps = []
    for block in readme_shell_blocks():
        lines = shell_lines(block)
        if all(words[0] == "make" for words in lines):
            steps.append(("make", block))
        elif any("vapi-worker" in words for words in lines):
            steps.append(("by-hand", block))
        elif all(words[0] == "kubectl" for words in lines):
            steps.append(("cluster", block))
        else:
            raise UnknownCommand(f"README.md block:\n{block}")
    return steps


def make_targets(block: str) -> list[str]:
    """The targets of a block of ``make TARGET`` lines."""
    return [words[1] for words in shell_lines(block)]
