"""Commands other packages plug into `ensemble` through the `ensemble.commands` entry points."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

from ensemble.cli.common import Subparsers

COMMANDS_GROUP = "ensemble.commands"
"""Entry-point group through which other packages add commands (the load-test harness does):
each entry point names a ``register(subparsers)`` function."""


def add_plugin_commands(sub: Subparsers) -> None:
    """Let every ``ensemble.commands`` entry point add its subcommands; one that fails to load
    is left out with a note on stderr, and every other command still works."""
    seen: set[str] = set()
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(ep.name)
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plug-in must not take the gateway's commands down
            print(
                f"ensemble: command {ep.name!r} ({ep.value}) not loaded: "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
