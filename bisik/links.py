"""Signed tokens for links in messages: unsubscribe, and anything else a link must prove.

A token carries its payload in the clear (base64 JSON) with an HMAC-SHA256 signature made with
BISIK_SECRET_KEY and a purpose-specific salt, so an unsubscribe token cannot be replayed as a
click token and nobody can forge a link for someone else. A token whose signature does not
verify reads as None, which the API answers with 404.
"""

from __future__ import annotations

from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer


class LinkSigner:
    def __init__(self, secret_key: str) -> None:
        self._secret_key = secret_key

    def _serializer(self, purpose: str) -> URLSafeSerializer:
        return URLSafeSerializer(self._secret_key, salt=f"bisik.{purpose}")

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        return self._serializer(purpose).dumps(payload)

    def verify(self, purpose: str, token: str) -> dict[str, Any] | None:
        """Return the payload of a token signed for `purpose`, or None if it was not."""
        try:
            payload = self._serializer(purpose).loads(token)
        except BadSignature:
            return None
        return payload if isinstance(payload, dict) else None

    def unsubscribe_token(self, customer_id: str, message_id: int | None, channel: str = "email") -> str:
        return self.sign("unsubscribe", {"c": customer_id, "m": message_id, "ch": channel})
