"""A Vapi ``/chat`` simulator: a real HTTP server speaking Vapi's protocol byte for byte.

Why: the worker's streaming, retry and context logic must be tested against a network peer that
behaves like Vapi, including its failures, without an API key or cost. One module per concept:

    server.py       the aiohttp app, ``serve_simulator`` and ``RunningSimulator``
    config.py       ``SimulatorConfig`` (imported from ``server`` by callers)
    chat.py         ``POST /chat``: auth, validation, faults, context, reply; ``GET /chat/{id}``
    streaming.py    writing a reply as paced SSE, with in-stream faults
    events.py       pure: the SSE bytes, right and deliberately wrong
    validation.py   pure: ``CreateChatDTO`` rules
    directives.py   pure: ``[[sim:pace ...]]`` / ``[[sim:fault ...]]`` in the input
    faults.py       pure: fault kinds, their syntax, ``times=K`` bookkeeping
    replies.py      pure: deterministic reply text
    pricing.py      pure: a chat's tokens and cost (``Chat.cost``, ``Chat.costs``)
    state.py        chats, sessions, the call log, counters
    inspection.py   ``/_sim/*`` endpoints and ``/healthz``
    cli.py          ``vapi-worker simulator`` / ``python -m worker.simulator``
"""
