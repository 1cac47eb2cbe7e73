"""The gRPC wire details the uvicorn stack handles itself: timeouts, status messages, metadata,
its writes."""

from __future__ import annotations

import base64

import pytest

from ensemble.config import ServerConfig
from ensemble.frontends.grpc_h2 import encode_message, metadata_of, parse_timeout


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"100m", 0.1), (b"5u", 5e-6), (b"7n", 7e-9)],
)
def test_grpc_timeout_units(header: bytes, seconds: float) -> None:
    assert parse_timeout(header) == pytest.approx(seconds)


@pytest.mark.parametrize("header", [b"", b"10", b"10x", b"123456789S", b"-1S", b"1.5S"])
def test_malformed_grpc_timeouts_are_refused(header: bytes) -> None:
    with pytest.raises(ValueError, match="grpc-timeout"):
        parse_timeout(header)


def test_status_messages_are_percent_encoded() -> None:
    assert encode_message("plain text: ok") == b"plain text: ok"
    assert encode_message("100% sure") == b"100%25 sure"
    assert encode_message("line\nnext") == b"line%0Anext"
    assert encode_message("é") == b"%C3%A9"


def test_metadata_is_what_the_caller_sent() -> None:
    blob = base64.b64encode(b"\x00\x01binary").rstrip(b"=")
    headers = [
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", b"1S"),
        (b"authorization", b"Bearer k"),
        (b"trace-bin", blob),
    ]
    assert metadata_of(headers) == (("authorization", "Bearer k"), ("trace-bin", b"\x00\x01binary"))


def test_the_uvicorn_stack_takes_only_its_fixed_stream_cap() -> None:
    assert ServerConfig(grpc_stack="uvicorn").grpc_stack == "uvicorn"
    with pytest.raises(ValueError, match="128 calls per connection"):
        ServerConfig(grpc_stack="uvicorn", grpc_max_concurrent_streams=64)
