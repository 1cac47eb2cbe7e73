"""Config loading: good files parse, every error names its YAML path and line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ensemble.cli import main
from ensemble.config import json_schema, load_config, parse_config
from ensemble.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
tiers:
  edge: {link: {delay_ms: 2}}
ensembles:
  - name: e
    members:
      - {name: a, model: a.onnx, placement: [{tier: edge}]}
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.onnx").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


def test_default_config_is_valid() -> None:
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert [e.name for e in cfg.ensembles] == ["digits"]
    assert {"edge", "cloud"} <= set(cfg.tiers)
    assert cfg.zoo_dir() == ROOT / "models" / "digits"
    assert all(p.tier in cfg.tiers for e in cfg.ensembles for m in e.members for p in m.placement)


def test_defaults_are_safe() -> None:
    """What the quickstart configs get without saying: overload shed by an adaptive limit,
    loopback only, every client-controlled resource bounded."""
    for name in ("default.yaml", "local.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.admission.name == "adaptive"
        server = cfg.server
        assert server.host == "127.0.0.1"
        assert server.non_finite_inputs == "reject"
        assert server.max_connections <= 4096 and server.header_timeout_s <= 10
        assert server.max_inflate_ratio <= 100 and server.tls is None


def test_relative_model_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.resolve(cfg.ensembles[0].members[0].model) == tmp_path / "a.onnx"


def test_unknown_key_names_path_line_and_suggestion(tmp_path: Path) -> None:
    text = GOOD.replace("{name: a, model:", "{name: a, modle: x, model:")
    [err] = errors_of(write(tmp_path, text))
    assert "c.yaml:7:" in err
    assert "ensembles[0].members[0].modle" in err
    assert "unknown key 'modle'" in err and "did you mean 'model'" in err


def test_all_structural_errors_reported_together(tmp_path: Path) -> None:
    text = GOOD.replace("delay_ms: 2", "delay_ms: -2, lossy: 1") + "\nserver: {http_port: 70000}\n"
    errs = errors_of(write(tmp_path, text))
    joined = "\n".join(errs)
    assert len(errs) == 3
    assert "tiers.edge.link.delay_ms" in joined
    assert "tiers.edge.link.lossy: unknown key" in joined
    assert "server.http_port" in joined


def test_semantic_errors_have_paths(tmp_path: Path) -> None:
    text = """
tiers: {edge: {}}
ensembles:
  - name: e
    policy: nope
    members:
      - {name: a, model: a.onnx, placement: [{tier: moon}]}
      - {name: a, model: missing.onnx, placement: [{tier: edge}]}
policies:
  p: {selection: {name: bogus}, aggregation: {name: mean_probability, params: {k: 1}}}
"""
    joined = "\n".join(errors_of(write(tmp_path, text)))
    assert "ensembles[0].policy: unknown profile 'nope'" in joined
    assert "ensembles[0].members[0].placement[0].tier: unknown tier 'moon'" in joined
    assert "ensembles[0].members[1].name: model name 'a' is already used" in joined
    assert "ensembles[0].members[1].model: model file not found" in joined
    assert "policies.p.selection.name: unknown selection policy 'bogus'" in joined
    assert "policies.p.aggregation.params.k" in joined


def test_reliability_settings_are_checked(tmp_path: Path) -> None:
    text = (
        GOOD
        + """
outlier_detection: {name: consecutive_failures, params: {consecutive_failures: 0}}
policies:
  p:
    retry: {name: budget, params: {max_attempts: 0}}
    on_violation: explode
    fallback: b
  q: {retry: {name: forever}, fallback: aa}
"""
    )
    joined = "\n".join(errors_of(write(tmp_path, text)))
    assert "policies.p.on_violation: Input should be 'reject', 'degrade'" in joined
    # Structural errors come first; fix them to see the cross-field ones.
    joined = "\n".join(errors_of(write(tmp_path, text.replace("explode", "alert"))))
    assert "outlier_detection.params.consecutive_failures" in joined
    assert "policies.p.retry.params.max_attempts" in joined
    assert "policies.p.fallback: unknown member 'b'" in joined
    assert "policies.q.retry.name: unknown retry policy 'forever'" in joined
    assert "policies.q.fallback: unknown member 'aa'; did you mean 'a'?" in joined


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    [err] = errors_of(write(tmp_path, "ensembles: [\n  - {name: x\n"))
    assert "invalid YAML" in err and "c.yaml:" in err


def test_non_mapping_document_rejected() -> None:
    with pytest.raises(ConfigError):
        parse_config(["a", "b"])


def test_replica_bounds_checked(tmp_path: Path) -> None:
    text = GOOD.replace("[{tier: edge}]", "[{tier: edge, replicas: {min: 3, max: 2}}]")
    [err] = errors_of(write(tmp_path, text))
    assert "replicas" in err and "min (3) must not exceed max (2)" in err


def test_schema_file_is_current() -> None:
    on_disk = json.loads((ROOT / "configs" / "schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema())), "run `ensemble schema`"


def test_validate_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `validate` checks the model file's digest too: this (empty) one is pinned.
    pinned = "{name: a, model: a.onnx, sha256: " + hashlib.sha256(b"").hexdigest() + ","
    good = write(tmp_path, GOOD.replace("{name: a, model: a.onnx,", pinned))
    assert main(["validate", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    watched = GOOD.replace("{name: a, model: a.onnx,", pinned) + (
        "    drift: {window: 200, threshold: 0.1}\n"
        "policies:\n"
        "  careful: {uncertainty: {entropy: 0.3, escalate: true}}\n"
    )
    assert main(["validate", str(write(tmp_path, watched))]) == 0
    summary = capsys.readouterr().out
    assert "drift window 200 rows, threshold 0.1" in summary
    assert "profile careful:" in summary and "uncertain=entropy>0.3 (escalated)" in summary
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("tier: edge", "tier: mars"))
    assert main(["validate", str(bad)]) == 1
    assert "unknown tier 'mars'" in capsys.readouterr().err


def placement_errors(tmp_path: Path, placement: str) -> list[str]:
    return errors_of(write(tmp_path, GOOD.replace("[{tier: edge}]", f"[{placement}]")))


def test_remote_placements_take_one_replica_per_endpoint(tmp_path: Path) -> None:
    text = GOOD.replace(
        "[{tier: edge}]",
        "[{tier: edge, backend: oip-http, endpoints: [http://10.0.0.5:9000, "
        "'http://[::1]:9000/prefix']}, "
        "{tier: cloud, backend: oip-grpc, endpoints: ['cloud.example:9001'], "
        "remote_model: logreg_v2, timeout_s: 2, health_check_interval_s: 0.5}]",
    ).replace("edge: {link: {delay_ms: 2}}", "edge: {}\n  cloud: {}")
    edge, cloud = load_config(write(tmp_path, text)).ensembles[0].members[0].placement
    assert edge.remote and (edge.replicas.min, edge.replicas.max) == (2, 2)
    assert edge.timeout_s == 30.0 and edge.remote_model is None
    assert (cloud.replicas.min, cloud.replicas.max) == (1, 1)
    assert cloud.remote_model == "logreg_v2" and cloud.health_check_interval_s == 0.5


def test_triton_is_another_name_for_oip_grpc(tmp_path: Path) -> None:
    text = GOOD.replace(
        "[{tier: edge}]", "[{tier: edge, backend: triton, endpoints: ['127.0.0.1:8001', 'h:8001']}]"
    )
    (place,) = load_config(write(tmp_path, text)).ensembles[0].members[0].placement
    assert place.remote and place.backend == "triton"
    assert (place.replicas.min, place.replicas.max) == (2, 2)


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("{tier: edge, backend: oip-http}", "backend oip-http needs `endpoints`"),
        ("{tier: edge, backend: oip-grpc, endpoints: []}", "at least 1 item"),
        ("{tier: edge, endpoints: ['h:1']}", "endpoints: only for the remote backends"),
        ("{tier: edge, timeout_s: 5}", "timeout_s: only for the remote, ray and process backends"),
        ("{tier: edge, backend: oip-http, endpoints: ['127.0.0.1:9000']}", "http://HOST:PORT"),
        ("{tier: edge, backend: oip-http, endpoints: ['http://h:99999']}", "invalid port"),
        ("{tier: edge, backend: oip-grpc, endpoints: ['http://h:1']}", "HOST:PORT (no scheme)"),
        ("{tier: edge, backend: oip-grpc, endpoints: ['h']}", "HOST:PORT (no scheme)"),
        ("{tier: edge, backend: oip-grpc, endpoints: ['h:1', 'h:1']}", "must not repeat"),
        (
            "{tier: edge, backend: kserve}",
            "Input should be 'inprocess', 'oip-http', 'oip-grpc', 'triton', 'ray' or 'process'",
        ),
        ("{tier: edge, backend: triton}", "backend triton needs `endpoints`"),
        ("{tier: edge, backend: triton, endpoints: ['http://h:8001']}", "no scheme) for triton"),
        (
            "{tier: edge, backend: oip-grpc, endpoints: ['h:1'], replicas: {min: 2, max: 4}}",
            "does not fit the 1 endpoint(s): a remote placement has exactly one replica per "
            "endpoint",
        ),
    ],
)
def test_remote_placement_errors_explain_themselves(
    tmp_path: Path, placement: str, message: str
) -> None:
    [err] = placement_errors(tmp_path, placement)
    assert "ensembles[0].members[0].placement[0]" in err
    assert message in err


def test_an_endpoint_is_one_replica_of_a_member(tmp_path: Path) -> None:
    text = GOOD.replace(
        "[{tier: edge}]",
        "[{tier: edge, backend: oip-grpc, endpoints: ['h:1']}, "
        "{tier: edge, backend: oip-grpc, endpoints: ['h:2', 'h:1']}]",
    )
    [err] = errors_of(write(tmp_path, text))
    assert "placement[1].endpoints: endpoint 'h:1' is already a replica of this member" in err
