"""The Open Inference Protocol (KServe v2): datatypes and the REST and gRPC codecs, shared by
the frontends (server side) and the remote replica clients (client side)."""
