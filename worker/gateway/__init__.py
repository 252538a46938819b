"""``vapi-worker gateway``: the worker's conversations for browsers, over HTTP and SSE.

``tokens`` (who may use a conversation), ``cursor`` (SSE event ids and what a resume replays),
``feed`` (one shared consumer per partition, and the catch-up read of a resume), ``server`` (the
aiohttp routes), ``chat.html`` (the chat page).
"""
