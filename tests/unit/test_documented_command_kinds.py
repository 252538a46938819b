"""The commands the README, the Dockerfile and the compose file show are ones the tests run.

tests/e2e/test_documented_commands.py runs them; these checks fail at once (offline) when a
document shows a command of a kind no test knows how to run, or one that cannot start.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.documented import (
    ComposeRun,
    DockerRun,
    UnknownCommand,
    comment_commands,
    compose_steps,
    dockerfile_steps,
    parse_docker_run,
    readme_steps,
    shell_lines,
)
from worker.config import Settings

pytestmark = pytest.mark.unit


def test_every_documented_command_is_of_a_kind_a_test_runs() -> None:
    """Each source shows commands, and every one of them is of a kind the end-to-end tests run."""
    compose = compose_steps()
    assert "up" in compose
    assert {s.args[0] for s in compose if isinstance(s, ComposeRun)} >= {"send", "tail"}
    assert any(isinstance(s, DockerRun) for s in dockerfile_steps())
    assert {kind for kind, _ in readme_steps()} == {"make", "by-hand", "cluster"}


def test_comment_commands_join_continuations_and_drop_trailing_comments(tmp_path: Path) -> None:
    """A ``docker`` comment line may continue with a backslash; prose lines are not commands."""
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# Build it:\n"
        "#   docker build -t x:dev .        # the image\n"
        "#   docker run --rm -e A=1 \\\n"
        "#       -e B x:dev run\n"
        "#   Grafana: http://localhost:3000\n"
        "FROM scratch\n"
    )
    assert comment_commands(path) == [
        ["docker", "build", "-t", "x:dev", "."],
        ["docker", "run", "--rm", "-e", "A=1", "-e", "B", "x:dev", "run"],
    ]


def test_docker_run_options_image_and_arguments_are_told_apart() -> None:
    """``-e NAME=VALUE`` and ``-e NAME`` (from the shell) are the environment; after the image
    come its arguments; an option no test understands is an error, not ignored."""
    run = parse_docker_run(["--rm", "-e", "A=1", "-e", "B", "-p", "1:1", "img", "send", "-x"])
    assert run == DockerRun(env={"A": "1", "B": None}, args=["send", "-x"])
    with pytest.raises(UnknownCommand):
        parse_docker_run(["--privileged", "img"])


def test_shell_lines_are_words_without_comments() -> None:
    """README blocks: continuation lines joined, comment-only lines and comments dropped."""
    block = 'make demo   # a comment\n            # more comment\nA=1 \\\n  b run "x y" &\n'
    assert shell_lines(block) == [["make", "demo"], ["A=1", "b", "run", "x y", "&"]]


def test_each_docker_run_the_dockerfile_shows_passes_what_the_worker_requires() -> None:
    """A ``docker run`` that passes a Vapi key also passes the assistant id, which the worker
    requires with a real Vapi (without it the example exits 2)."""
    for run in (s for s in dockerfile_steps() if isinstance(s, DockerRun)):
        settings = Settings.model_validate(
            {name.lower(): value or f"<{name}>" for name, value in run.env.items()}
        )
        settings.default_assistant_id()
