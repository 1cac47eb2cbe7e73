"""Credentials from the environment (admin token, feedback token, API keys), checked in constant
time."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ensemble.errors import Forbidden, Unauthorized

ADMIN_TOKEN_ENV = "ENSEMBLE_ADMIN_TOKEN"
"""Opens the admin API (`PUT /admin/config`, `/admin/links`); unset, the admin API is off."""
FEEDBACK_TOKEN_ENV = "ENSEMBLE_FEEDBACK_TOKEN"
"""Opens the feedback route; unset, feedback is off and answers carry no feedback id."""
API_KEYS_ENV = "ENSEMBLE_API_KEYS"
"""Comma-separated keys the inference routes need; unset, they are open."""


def bearer_token(authorization: bytes | str | None) -> bytes | None:
    """The credential of an ``Authorization: Bearer <token>`` value; None for another scheme
    or no token."""
    if authorization is None:
        return None
    if isinstance(authorization, str):
        authorization = authorization.encode("utf-8", errors="replace")
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


@dataclass(frozen=True, slots=True)
class BearerToken:
    """A credential routes need as ``Authorization: Bearer <token>`` (HTTP header or gRPC
    metadata)."""

    name: str
    """What it is called in errors (`admin token`)."""
    token: str | None
    """None: unset at start, so the routes it guards are disabled."""
    realm: str
    """Named in a 401's ``WWW-Authenticate``."""
    disabled: str
    """The 403's message while it is unset: how an operator enables the routes."""

    def check(self, authorization: bytes | str | None) -> None:
        """403 while unset (the routes it guards are off), 401 without a bearer token, 403
        for a wrong one (compared in constant time)."""
        if self.token is None:
            raise Forbidden(self.disabled)
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized(
                f"send the {self.name} as `Authorization: Bearer <token>`", realm=self.realm
            )
        if not hmac.compare_digest(token, self.token.encode()):
            raise Forbidden(f"wrong {self.name}")


def admin_credential(token: str | None) -> BearerToken:
    """The admin API's credential (``ENSEMBLE_ADMIN_TOKEN``; None: the admin API is off)."""
    return BearerToken(
        "admin token",
        token or None,
        "ensemble-admin",
        "the admin API is disabled; start the gateway with ENSEMBLE_ADMIN_TOKEN set",
    )


def _digest(secret: bytes) -> bytes:
    # Keys and candidates are compared as digests of equal length, so the time a comparison
    # takes says nothing about a key's length either.
    return hashlib.sha256(secret).digest()


class ApiKeys:
    """The keys that open the inference routes; none configured means the routes are open."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = tuple(_digest(key.encode("utf-8")) for key in keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ApiKeys:
        """``ENSEMBLE_API_KEYS``: comma-separated keys, whitespace around each trimmed, empty
        entries ignored (unset or empty: no keys)."""
        raw = environ.get(API_KEYS_ENV, "")
        return cls([key.strip() for key in raw.split(",") if key.strip()])

    @property
    def required(self) -> bool:
        """Inference needs a key."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: bytes | str | None, how: str) -> None:
        """Unauthorized unless ``authorization`` (the header's or metadata's value) is a bearer
        token holding one of the keys; ``how`` says how to send one, in the message."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized(f"this gateway needs an API key: send {how}")
        if not self.accepts(token):
            raise Unauthorized("invalid API key")

    def accepts(self, token: bytes | None) -> bool:
        """``token`` is one of the keys (every key is compared, so timing does not say which)."""
        if token is None:
            return False
        candidate = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched
