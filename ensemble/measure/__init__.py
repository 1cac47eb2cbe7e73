"""`ensemble profile`: members measured on their tiers through the gateway's own replicas."""
