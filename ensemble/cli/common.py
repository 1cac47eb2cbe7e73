"""What the `ensemble` commands share: progress lines, reading a config, the model zoo on
first use, the ready line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from ensemble.config import GatewayConfig, load_config
from ensemble.errors import ConfigError

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What each command module's ``register`` adds its subcommands to."""

DEFAULT_CONFIG = Path("configs/default.yaml")


def progress(line: str) -> None:
    print(f"ensemble: {line}", file=sys.stderr, flush=True)


def read_config(path: Path) -> GatewayConfig | None:
    """The config at ``path``; None, with every error printed on stderr, when it is invalid."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{path}: invalid config ({len(exc.errors)} error(s))", file=sys.stderr)
        return None


def missing_models(cfg: GatewayConfig) -> list[Path]:
    return [
        cfg.resolve(m.model) for _, m in cfg.member_specs() if not cfg.resolve(m.model).is_file()
    ]


def ensure_models(cfg: GatewayConfig) -> None:
    """Build the model zoo on first use when the config's member files live there."""
    missing = missing_models(cfg)
    if not missing:
        return
    from ensemble.models.zoo import ensure_zoo

    zoo = cfg.zoo_dir()
    if cfg.model_zoo.build_if_missing and all(p.parent == zoo for p in missing):
        progress(f"model files missing; building the model zoo in {zoo} (takes about 15 s)")
        start = time.perf_counter()
        ensure_zoo(zoo, progress=progress)
        progress(f"model zoo ready in {time.perf_counter() - start:.1f} s")


def announcer(kind: str, models: list[str]) -> Callable[[object], None]:
    """Prints the one line on stdout that says the server listens (scripts and tests wait for
    it): ``ensemble gateway ready: http=HOST:PORT grpc=HOST:PORT models=a,b``."""

    def announce(addr: object) -> None:
        from ensemble.server import Addresses

        assert isinstance(addr, Addresses)
        print(
            f"ensemble {kind} ready: http={addr.host}:{addr.http_port} "
            f"grpc={addr.host}:{addr.grpc_port} models={','.join(models)}",
            flush=True,
        )

    return announce
