"""What the gateway presents to a remote placement's servers: TLS (the roots their certificates
must chain to, a client certificate for mutual TLS) and an API key sent as ``Authorization:
Bearer`` on every call and health check."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from ensemble.tls import load_client_tls_files, no_password


@dataclass(frozen=True)
class ClientCredentials:
    """A remote placement's credentials; paths absolute, files checked when the config loaded."""

    tls: bool
    """oip-grpc and triton: the channel is TLS (oip-http: an ``https://`` endpoint's is)."""
    ca_file: Path | None = None
    """PEM roots the servers' certificates must chain to (None: the system's)."""
    cert_file: Path | None = None
    """The certificate chain the gateway presents (mutual TLS), with ``key_file``."""
    key_file: Path | None = None
    api_key: str | None = field(default=None, repr=False)  # never in a log line

    def headers(self) -> dict[str, str]:
        """Headers (gRPC metadata) every request carries."""
        return {} if self.api_key is None else {"authorization": f"Bearer {self.api_key}"}

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: the servers verified against ``ca_file`` (or the system's roots), this
        client's certificate presented when it has one."""
        context = ssl.create_default_context(
            cafile=None if self.ca_file is None else str(self.ca_file)
        )
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file, password=no_password)
        return context

    def grpc_credentials(self) -> object:
        """``grpc.ChannelCredentials`` for a TLS channel (the files read now)."""
        import grpc

        files = load_client_tls_files(self.ca_file, self.cert_file, self.key_file)
        return grpc.ssl_channel_credentials(
            root_certificates=files.ca,
            private_key=files.private_key,
            certificate_chain=files.cert_chain,
        )
