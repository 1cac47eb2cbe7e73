"""TLS material, the files read and checked once with clear reasons: both frontends' (server
side) and what the gateway presents to remote replicas (client side)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"


class _Encrypted(Exception):
    """Raised by the password callback: the gateway takes unencrypted keys only."""


def no_password() -> str:
    """The password callback for loading keys: raises, since the gateway takes unencrypted
    keys only (without a callback OpenSSL would prompt on the terminal for a passphrase, and a
    gateway, or `ensemble validate`, started from a script would hang there)."""
    raise _Encrypted


@dataclass(frozen=True)
class TlsFiles:
    """The PEM contents of a frontend's TLS settings, read once and checked to fit together."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    """CA certificates client certificates must chain to (mutual TLS), or None."""


class TlsFileError(ValueError):
    """A TLS file is missing, unreadable or does not fit; ``field`` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _read(field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(field, f"cannot read {path}: {exc.strerror or exc}") from None


def load_tls_files(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> TlsFiles:
    """Read and check the files (PEM, the key matching the certificate, the CA loadable);
    raises TlsFileError with the first problem."""
    cert, key = _cert_and_key(cert_file, key_file)
    ca = None if client_ca_file is None else _ca("client_ca_file", client_ca_file)
    return TlsFiles(cert, key, ca)


def server_context(
    cert_file: Path, key_file: Path, client_ca_file: Path | None, alpn: list[str]
) -> ssl.SSLContext:
    """A frontend's server side from the files (``load_tls_files`` checked them): mutual TLS
    with a client CA, offering the application protocols ``alpn`` (OpenSSL's ciphers and
    versions: TLS 1.2 and later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file, password=no_password)
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(alpn)
    return context


def tls_file_errors(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> list[TlsFileError]:
    """The problems with the files: one for the certificate and key, one for the client CA
    (an empty list: they load)."""
    errors = []
    try:
        _cert_and_key(cert_file, key_file)
    except TlsFileError as exc:
        errors.append(exc)
    if client_ca_file is not None:
        try:
            _ca("client_ca_file", client_ca_file)
        except TlsFileError as exc:
            errors.append(exc)
    return errors


def _cert_and_key(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    cert = _read("cert_file", cert_file)
    if _CERT_MARK not in cert:
        raise TlsFileError(
            "cert_file", f"{cert_file} holds no PEM certificate (no {_CERT_MARK.decode()} line)"
        )
    key = _read("key_file", key_file)
    if _KEY_MARK not in key:
        raise TlsFileError("key_file", f"{key_file} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except _Encrypted:
        raise TlsFileError(
            "key_file", f"{key_file} is encrypted; give the gateway an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{key_file} is not the private key of the certificate in {cert_file}"
        else:
            message = f"cannot load {cert_file} with {key_file}: {exc.reason or exc}"
        raise TlsFileError("key_file", message) from None
    except OSError as exc:  # the file changed between the reads above and this one
        raise TlsFileError("key_file", f"cannot load {key_file}: {exc.strerror or exc}") from None
    return cert, key


def _ca(field: str, path: Path) -> bytes:
    ca = _read(field, path)
    problem = None if _CERT_MARK in ca else "no PEM certificate in it"
    if problem is None:
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            problem = exc.reason or str(exc)
    if problem is not None:
        raise TlsFileError(field, f"{path} holds no usable CA certificate: {problem}")
    return ca


@dataclass(frozen=True)
class ClientTlsFiles:
    """The PEM contents of a remote placement's TLS settings (client side)."""

    ca: bytes | None
    """CA certificates the servers' certificates must chain to (None: the system's)."""
    cert_chain: bytes | None
    """The certificate the gateway presents (mutual TLS), or None."""
    private_key: bytes | None


def load_client_tls_files(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ClientTlsFiles:
    """Read and check a remote placement's files (``cert_file`` and ``key_file`` come
    together); raises TlsFileError with the first problem."""
    ca = None if ca_file is None else _ca("ca_file", ca_file)
    if cert_file is None or key_file is None:
        return ClientTlsFiles(ca, None, None)
    cert, key = _cert_and_key(cert_file, key_file)
    return ClientTlsFiles(ca, cert, key)


def client_tls_file_error(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> TlsFileError | None:
    """The first problem with a remote placement's files (None: they load)."""
    try:
        load_client_tls_files(ca_file, cert_file, key_file)
    except TlsFileError as exc:
        return exc
    return None
