"""Pure decision code (selection, aggregation, routing, ...), reached through registries."""
