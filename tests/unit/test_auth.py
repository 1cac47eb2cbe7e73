"""API keys: read from ENSEMBLE_API_KEYS, Bearer credentials parsed, every key compared."""

from __future__ import annotations

import pytest

from ensemble.auth import API_KEYS_ENV, ApiKeys, bearer_token


@pytest.mark.parametrize("raw", [None, "", " ", " , ,"])
def test_no_keys_leave_inference_open(raw: str | None) -> None:
    keys = ApiKeys.from_env({} if raw is None else {API_KEYS_ENV: raw})
    assert not keys.required
    assert not keys.accepts(b"anything")


def test_keys_are_split_on_commas_and_trimmed() -> None:
    keys = ApiKeys.from_env({API_KEYS_ENV: " alpha ,beta,, gamma\t"})
    assert keys.required and len(keys) == 3
    for key in (b"alpha", b"beta", b"gamma"):
        assert keys.accepts(key)
    for wrong in (b" alpha", b"alph", b"alphaa", b"", b"alpha,beta", None):
        assert not keys.accepts(wrong)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer k1", b"k1"),
        ("bearer k1", b"k1"),
        (b"BEARER   k1  ", b"k1"),
        (b"Basic azE6", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"k1", None),
        (None, None),
    ],
)
def test_bearer_token(header: bytes | str | None, token: bytes | None) -> None:
    assert bearer_token(header) == token
