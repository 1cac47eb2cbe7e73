"""Checks every OIP decoder makes, whichever side decodes: request ids and declared shapes."""

from __future__ import annotations

from ensemble.errors import InvalidInput, PayloadTooLarge

MAX_ID_CHARS = 1024
"""Longest request ``id`` accepted; the answer echoes it."""


def check_elements(count: int, limit: int, where: str) -> None:
    """PayloadTooLarge when a declared shape holds more elements than the model takes."""
    if count > limit:
        raise PayloadTooLarge(
            f"{where}: shape holds {count:,} elements; a request may carry at most {limit:,} "
            "(server.max_batch_size rows, at most server.max_request_elements)"
        )


def check_id(request_id: object) -> None:
    """InvalidInput unless a request ``id`` is a string of at most ``MAX_ID_CHARS``."""
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    if len(request_id) > MAX_ID_CHARS:
        raise InvalidInput(f"'id' has {len(request_id):,} characters; at most {MAX_ID_CHARS}")
