"""The benchmark's `--grpc-stack`: the gateways serve a copy of its config on that stack."""

from __future__ import annotations

from pathlib import Path

from ensemble.config import load_config
from loadtest.bench import BENCH_CONFIG, parse_args, stack_config


def test_grpcio_serves_the_config_as_is(tmp_path: Path) -> None:
    assert stack_config(BENCH_CONFIG, "grpcio", tmp_path) == BENCH_CONFIG
    assert not list(tmp_path.iterdir())


def test_uvicorn_serves_a_copy_that_loads_with_its_models(tmp_path: Path) -> None:
    copy = stack_config(BENCH_CONFIG, "uvicorn", tmp_path)
    assert copy.parent == tmp_path
    cfg = load_config(copy)
    original = load_config(BENCH_CONFIG)
    assert cfg.server.grpc_stack == "uvicorn"
    members = [m for e in cfg.ensembles for m in e.members]
    before = [m for e in original.ensembles for m in e.members]
    expected = [(original.base_dir / m.model).resolve() for m in before]
    assert [Path(m.model) for m in members] == expected


def test_the_option_reaches_the_settings() -> None:
    assert parse_args(["--quick"]).grpc_stack == "grpcio"
    assert parse_args(["--quick", "--grpc-stack", "uvicorn"]).grpc_stack == "uvicorn"
