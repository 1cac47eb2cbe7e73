"""Transports: OIP over HTTP (ASGI) and gRPC, both over one dispatcher."""
