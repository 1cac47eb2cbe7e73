"""The `process` backend in config: what it accepts, what it rejects, and the replicas it makes
(none started: building a member only describes its children)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble.config import load_config, parse_config
from ensemble.control.build import build_member, replica_bounds
from ensemble.control.provisioning import ReplicaSet
from ensemble.errors import ConfigError
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.process import ProcessReplica, parse_ready_line


def config(zoo: Path, placement: dict[str, object]) -> dict[str, object]:
    member = {"name": "logreg", "model": str(zoo / "logreg.onnx"), "placement": [placement]}
    return {"ensembles": [{"name": "e", "members": [member]}]}


def errors(zoo: Path, placement: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config(zoo, placement))
    return info.value.errors


def test_a_process_placement_is_networked_but_has_no_endpoints(zoo_dir: Path) -> None:
    place_config = {
        "tier": "edge",
        "backend": "process",
        "replicas": {"min": 1, "max": 3},
        "process": {"executor_threads": 2, "startup_timeout_s": 20},
        "timeout_s": 5,
        "health_check_interval_s": 0.5,
    }
    cfg = parse_config(config(zoo_dir, place_config))
    (place,) = cfg.ensembles[0].members[0].placement
    assert place.networked and not place.remote
    assert place.process is not None and place.process.executor_threads == 2
    assert place.process.stop_timeout_s == 10.0  # the default
    assert replica_bounds(cfg) == {("logreg", "edge"): (1, 3)}
    assert cfg.ensembles[0].members[0].replica_names() == [["edge/0"]]


def test_the_process_block_is_optional(zoo_dir: Path) -> None:
    cfg = parse_config(config(zoo_dir, {"tier": "edge", "backend": "process"}))
    (place,) = cfg.ensembles[0].members[0].placement
    assert place.process is None and (place.replicas.min, place.replicas.max) == (1, 1)


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (
            {"tier": "edge", "process": {"executor_threads": 2}},
            "process: only for the process backend, not for inprocess",
        ),
        (
            {"tier": "edge", "backend": "oip-http", "endpoints": ["http://h:1"], "process": {}},
            "process: only for the process backend, not for oip-http",
        ),
        (
            {"tier": "edge", "backend": "process", "endpoints": ["http://h:1"]},
            "endpoints: only for the remote backends",
        ),
        (
            {"tier": "edge", "backend": "process", "remote_model": "x"},
            "remote_model: only for the remote backends",
        ),
        (
            {"tier": "edge", "backend": "process", "process": {"executor_threads": 0}},
            "greater than or equal to 1",
        ),
        (
            {"tier": "edge", "backend": "process", "process": {"startup_timeout_s": 0}},
            "greater than 0",
        ),
        (
            {"tier": "edge", "backend": "process", "process": {"threads": 2}},
            "unknown key 'threads'",
        ),
        (
            {"tier": "edge", "backend": "process", "replicas": {"min": 3, "max": 2}},
            "min (3) must not exceed max (2)",
        ),
    ],
)
def test_process_placement_errors_explain_themselves(
    zoo_dir: Path, placement: dict[str, object], message: str
) -> None:
    [err] = errors(zoo_dir, placement)
    assert "ensembles[0].members[0].placement[0]" in err
    assert message in err


def test_process_errors_carry_the_yaml_line(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text(
        "ensembles:\n"
        "  - name: e\n"
        "    members:\n"
        "      - name: a\n"
        "        model: a.onnx\n"
        "        placement: [{tier: edge, backend: process, process: {executor_threads: -1}}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [err] = info.value.errors
    assert "c.yaml:6:" in err and "process.executor_threads" in err


def test_a_member_on_processes_describes_its_children_and_can_grow(zoo_dir: Path) -> None:
    place = {
        "tier": "edge",
        "backend": "process",
        "replicas": {"min": 2, "max": 4},
        "process": {"executor_threads": 3},
        "timeout_s": 7,
    }
    doc = {**config(zoo_dir, place), "server": {"max_batch_size": 64, "batching": False}}
    cfg = parse_config(doc)
    engine = InProcessEngine(1)
    try:
        member, provisioners = build_member(cfg, cfg.ensembles[0].members[0], engine)
    finally:
        engine.shutdown()
    replicas = member.replicas
    assert [r.name for r in replicas] == ["edge/0", "edge/1"]
    assert all(isinstance(r, ProcessReplica) and r.pid is None for r in replicas)
    first = replicas[0]
    assert isinstance(first, ProcessReplica) and first.timeout_s == 7
    argv = first.command.argv()
    assert argv[1:4] == ["-m", "ensemble.cli", "replica"]
    assert argv[4] == str(zoo_dir / "logreg.onnx")
    flags = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert flags["--name"] == "logreg" and flags["--host"] == "127.0.0.1"
    assert flags["--http-port"] == flags["--grpc-port"] == "0"
    assert flags["--executor-threads"] == "3" and flags["--max-batch-size"] == "64"
    assert flags["--card"] == str(zoo_dir / "logreg.card.json")
    assert "--no-batching" in argv
    provisioner = provisioners[("logreg", "edge")]
    assert isinstance(provisioner, ReplicaSet)
    grown = provisioner.make("edge/2")  # what the control loop's scaling calls
    assert isinstance(grown, ProcessReplica) and grown.name == "edge/2" and grown.pid is None


def test_ready_lines_are_parsed() -> None:
    ready = parse_ready_line("ensemble replica ready: http=127.0.0.1:4100 grpc=127.0.0.1:4101 m=x")
    assert ready is not None and (ready.kind, ready.host) == ("replica", "127.0.0.1")
    assert (ready.http_port, ready.grpc_port) == (4100, 4101)
    assert parse_ready_line("ensemble: loading models/digits/logreg.onnx") is None
