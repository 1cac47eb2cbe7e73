"""Replicas: one client per backend kind, and the members that own them."""
