"""vapi-stream-client: produce chat requests to vapi-stream-worker and read its output correctly.

Faust-free (aiokafka and pydantic only), so a producing service can install it alone::

    async with ChatClient("kafka:9092") as client:
        request_id = await client.send("conversation-1", "Hello")
        response = await client.ask("conversation-1", "What did I say?", on_event=print)
        async with client.follow(conversation_id="conversation-1") as events:
            async for event in events:  # Delta, Restart, Response, Unreadable
                ...

The reading rules (duplicates dropped, restarted streams marked, the final response's stream as
the answer) are applied in ``folding`` and nowhere else.
"""

from vapi_stream_client.client import (
    ChatClient,
    Follower,
    Start,
    Topics,
    new_cancel,
    new_request,
    partition_for,
)
from vapi_stream_client.errors import (
    AskTimeoutError,
    ClientError,
    InvalidRequestError,
    TopicMissingError,
)
from vapi_stream_client.events import (
    Delta,
    Event,
    FollowEvent,
    Response,
    Restart,
    RestartReason,
    Unreadable,
)
from vapi_stream_client.folding import StreamFolder
from vapi_stream_client.messages import ChatCancel, ChatDelta, ChatRequest, ChatResponse

__all__ = [
    "AskTimeoutError",
    "ChatCancel",
    "ChatClient",
    "ChatDelta",
    "ChatRequest",
    "ChatResponse",
    "ClientError",
    "Delta",
    "Event",
    "FollowEvent",
    "Follower",
    "InvalidRequestError",
    "Response",
    "Restart",
    "RestartReason",
    "Start",
    "StreamFolder",
    "TopicMissingError",
    "Topics",
    "Unreadable",
    "new_cancel",
    "new_request",
    "partition_for",
]
