"""Which policies exist: imports the built-in policy modules and the entry-point group's plugins.

Importing a policy module registers its policies; ``policies/__init__.py`` installs ``load`` as
the registry's loader, so ``registry.lookup``, ``names`` and ``build`` see every policy without
their callers importing anything else.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "ensemble.policies"
"""Third-party packages register policies by naming a module (or callable) in this group."""


def load() -> None:
    """Import the built-in policies, then every entry point of ``ENTRY_POINT_GROUP``."""
    # Imported here, not at the top: importing ``policies.registry`` (any policy module does)
    # must not import every policy, numpy included.
    import policies.admission
    import policies.aggregation
    import policies.autoscaling
    import policies.autoscaling_r3e
    import policies.hedging
    import policies.outlier_detection
    import policies.retry
    import policies.routing
    import policies.selection
    import policies.selection_bandits
    import policies.selection_cocktail
    import policies.selection_slo
    import policies.split  # noqa: F401

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
