"""Pure decision code (selection, aggregation, routing, ...), reached through registries."""

from policies import catalog, registry

registry.set_loader(catalog.load)
