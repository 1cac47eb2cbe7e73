"""Scenario files: defaults, every shipped example, and errors that name file, line and path."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.faults import PauseParams, hook_names, validate_params
from loadtest.scenario import ClosedLoad, ScenarioError, StepLoad, load_scenario

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "loadtest" / "scenarios").glob("*.yaml"))

MINIMAL = """\
target: {url: "http://127.0.0.1:8000"}
load: {shape: poisson, rps: 10, duration_s: 5}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    return info.value.errors


def test_minimal_scenario_defaults(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, MINIMAL))
    assert sc.protocol == "http_binary"
    assert sc.model == "digits"
    assert sc.request.input == "input" and sc.request.output == "label"
    assert [c.name for c in sc.mix] == ["default"]
    assert sc.generators == 1
    assert sc.limits.max_requests == 1_000_000
    assert sc.display_name(tmp_path / "s.yaml") == "s"
    assert sc.slo.latency_budget_ms() is None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_are_valid(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.display_name(path) == path.stem


def test_smoke_serves_the_default_config() -> None:
    sc = load_scenario(ROOT / "loadtest" / "scenarios" / "smoke.yaml")
    assert sc.target.config is not None
    assert sc.resolve(sc.target.config) == ROOT / "configs" / "local.yaml"
    assert sc.slo.latency_ms and sc.slo.min_accuracy


def test_unknown_key_names_path_line_and_suggestion(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, MINIMAL + "slo:\n  latency_ms: {p99: 10}\n  max_eror_rate: 0.1\n")
    assert errors == [
        f"{tmp_path / 's.yaml'}:5:3: slo.max_eror_rate: unknown key 'max_eror_rate'; "
        "did you mean 'max_error_rate'?"
    ]


def test_shape_fields_are_checked_without_the_union_tag(tmp_path: Path) -> None:
    text = (
        'target: {url: "http://127.0.0.1:8000"}\n'
        "load:\n  shape: poisson\n  rps: -1\n  duration_s: 99999\n"
    )
    errors = errors_of(tmp_path, text)
    assert any(":4:3: load.rps: Input should be greater than or equal to 0" in e for e in errors)
    assert any(":5:3: load.duration_s: Input should be less than or equal to 3600" in e
               for e in errors)  # fmt: skip
    assert len(errors) == 2


def test_unknown_shape(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path, 'target: {url: "http://h:1"}\nload: {shape: ramp, duration_s: 1}\n'
    )
    assert len(errors) == 1 and "load.shape: unknown shape; expected one of constant" in errors[0]


def test_unknown_load_key_suggests_from_all_shapes(tmp_path: Path) -> None:
    text = 'target: {url: "http://h:1"}\nload: {shape: closed, concurency: 4, duration_s: 1}\n'
    errors = errors_of(tmp_path, text)
    assert any("load.concurency: unknown key 'concurency'; did you mean 'concurrency'?" in e
               for e in errors)  # fmt: skip


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ('{url: "http://h:1", config: c.yaml}', "either `config` or `url`/`grpc`"),
        ("{}", "give `config`"),
        ('{url: "https://h:1"}', "must look like http://HOST:PORT"),
        ('{grpc: "nohost"}', "must look like HOST:PORT"),
    ],
)
def test_bad_targets(tmp_path: Path, target: str, message: str) -> None:
    errors = errors_of(
        tmp_path, f"target: {target}\nload: {{shape: poisson, rps: 1, duration_s: 1}}\n"
    )
    assert any(message in e and ":1:" in e for e in errors), errors


def test_protocol_needs_its_address(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, MINIMAL + "protocol: grpc\n")
    assert any("protocol grpc needs target.grpc" in e for e in errors)


def test_bad_latency_percentile_and_step_order(tmp_path: Path) -> None:
    text = (
        'target: {url: "http://h:1"}\n'
        "load: {shape: step, duration_s: 9, steps: [{at_s: 1, rps: 5}]}\n"
        "slo: {latency_ms: {p100: 5}}\n"
    )
    errors = errors_of(tmp_path, text)
    assert any("load: the first step must start at at_s: 0" in e for e in errors)
    assert any("slo.latency_ms: unknown percentile 'p100'" in e for e in errors)


def test_fault_errors(tmp_path: Path) -> None:
    text = MINIMAL + (
        "faults:\n"
        "  - {at_s: 1, name: pause, params: {duration_s: 1}}\n"
        "  - {at_s: 1, name: explode}\n"
        "  - {at_s: 1, name: log, params: {mesage: x}}\n"
        "  - {at_s: 9, name: log}\n"
    )
    errors = errors_of(tmp_path, text)
    assert any(
        ":4:15: faults[0].name: 'pause' needs a harness-started gateway" in e for e in errors
    )
    known = "faults[1].name: unknown fault 'explode'; known: kill_replica, link, log, partition"
    assert any(known in e for e in errors)
    assert any("faults[2].params.mesage: Extra inputs are not permitted" in e for e in errors)
    assert any("faults[3].at_s: must be before the load ends (5 s)" in e for e in errors)


def test_missing_files_are_reported(tmp_path: Path) -> None:
    text = "target: {config: nowhere.yaml}\nload: {shape: trace, path: none.txt}\n"
    errors = errors_of(tmp_path, text)
    assert any("target.config: file not found" in e for e in errors)
    assert any("load.path: file not found" in e for e in errors)


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    assert "invalid YAML" in errors_of(tmp_path, "target: [\n")[0]
    assert "must be a mapping" in errors_of(tmp_path, "- 1\n")[0]
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "absent.yaml")


def test_mix_parameters_become_request_parameters(tmp_path: Path) -> None:
    text = MINIMAL + (
        "mix:\n"
        "  - {name: a, weight: 2, parameters: {priority: 1, timeout: 5000, custom: {x: y}}}\n"
        "  - {name: b, parameters: {tier: edge, policy: vote, min_accuracy: 0.9}}\n"
    )
    sc = load_scenario(write(tmp_path, text))
    assert sc.mix[0].parameters.as_dict() == {"x": "y", "priority": 1, "timeout": 5000}
    assert sc.mix[1].parameters.as_dict() == {"tier": "edge", "policy": "vote", "min_accuracy": 0.9}
    errors = errors_of(tmp_path, MINIMAL + "mix: [{name: a, parameters: {priorty: 1}}]\n")
    assert any("mix[0].parameters.priorty: unknown key 'priorty'; did you mean 'priority'?" in e
               for e in errors)  # fmt: skip


def test_goodput_budget_defaults_to_the_largest_latency_target(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, MINIMAL + "slo: {latency_ms: {p50: 10, p99: 80}}\n"))
    assert sc.slo.latency_budget_ms() == 80
    sc = load_scenario(
        write(tmp_path, MINIMAL + "slo: {latency_ms: {p99: 80}, goodput_latency_ms: 20}\n")
    )
    assert sc.slo.latency_budget_ms() == 20


def test_closed_and_step_loads_parse(tmp_path: Path) -> None:
    sc = load_scenario(
        write(
            tmp_path,
            'target: {url: "http://h:1"}\nload: {shape: closed, concurrency: 8, duration_s: 2}\n',
        )
    )
    assert isinstance(sc.load, ClosedLoad) and sc.load.concurrency == 8
    text = (
        'target: {url: "http://h:1"}\n'
        "load: {shape: step, duration_s: 4, steps: [{at_s: 0, rps: 1}, {at_s: 2, rps: 3}]}\n"
    )
    assert isinstance(load_scenario(write(tmp_path, text)).load, StepLoad)


def test_fault_registry() -> None:
    assert {"log", "pause", "sigstop_gateway"} <= set(hook_names())
    params = validate_params("pause", {"duration_s": 1.5})
    assert isinstance(params, PauseParams) and params.duration_s == 1.5
    with pytest.raises(KeyError):
        validate_params("nope", {})


def test_closed_loop_needs_a_client_per_generator(tmp_path: Path) -> None:
    text = (
        'target: {url: "http://h:1"}\ngenerators: 4\n'
        "load: {shape: closed, concurrency: 2, duration_s: 1}\n"
    )
    errors = errors_of(tmp_path, text)
    assert any("load.concurrency must be at least `generators`" in e for e in errors)
