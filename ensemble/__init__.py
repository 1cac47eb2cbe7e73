"""Elastic ensemble serving gateway: OIP (KServe v2) over HTTP and gRPC."""

__version__ = "0.1.0"
