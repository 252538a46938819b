"""Conversation tokens: ``base64url(HMAC-SHA256(key=secret, msg=conversation_id))``, unpadded.

Pure. The operator's backend issues a token for each conversation a user may read and write; the
gateway recomputes it on every call and compares in constant time. A token names one
conversation and never expires: a new ``GATEWAY_SECRET`` withdraws them all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def issue_token(secret: str, conversation_id: str) -> str:
    """The token for ``conversation_id`` under ``secret``."""
    digest = hmac.new(secret.encode(), conversation_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def token_is_valid(secret: str, conversation_id: str, token: str) -> bool:
    """Whether ``token`` is the one issued for ``conversation_id`` (constant time)."""
    return hmac.compare_digest(issue_token(secret, conversation_id).encode(), token.encode())
