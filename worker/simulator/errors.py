"""The simulator's own exceptions; kept apart from ``worker.errors``, which is the worker's tree.

    SimulatorError
    ├── SpecError            a ``[[sim:...]]`` directive or a ``--fault`` rule cannot be parsed
    └── ChatRejectedError    ``POST /chat`` must answer with an error status, as Vapi would

Pure modules (validation, directives, conversation state) raise these; only ``chat.py`` turns them
into HTTP responses, so the rules stay testable without a server.
"""

from __future__ import annotations


class SimulatorError(Exception):
    """Base of every error the simulator raises on purpose."""


class SpecError(SimulatorError, ValueError):
    """A directive or fault rule is malformed; a test wrote it wrong, so say exactly what."""


class ChatRejectedError(SimulatorError):
    """The request is refused with ``status``; ``message`` is a list for validation errors.

    Vapi (NestJS) answers validation failures with ``message`` as a list of strings and other
    errors with a single string; the simulator keeps that difference so clients meet both.
    """

    def __init__(self, status: int, message: str | list[str]) -> None:
        super().__init__(message if isinstance(message, str) else "; ".join(message))
        self.status = status
        self.message = message
