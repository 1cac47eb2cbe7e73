"""Model file integrity without sockets: a member's file must hash to its card's and its config
pin's SHA-256 wherever the gateway loads it (start, reload, a new replica, `ensemble replica`, a
process child's command line, a Ray deployment), and is loaded from the very bytes it hashed."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ensemble.cli import main
from ensemble.config import GatewayConfig, parse_yaml
from ensemble.control.build import build, build_member, single_model
from ensemble.control.provisioning import ReplicaSet
from ensemble.control.reload import Reloader
from ensemble.dataplane.dispatcher import Dispatcher
from ensemble.errors import ConfigError, EnsembleError, ModelIntegrityError
from ensemble.integrity import PIN_SOURCE, Digest, expected_digests, read_verified
from ensemble.metrics import GatewayMetrics
from ensemble.models.card import load_card
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.process import ProcessReplica

ZOO = Path(__file__).resolve().parents[2] / "models" / "digits"
X = np.random.default_rng(3).uniform(0, 16, (4, 64)).astype(np.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def zoo_copy(tmp: Path, *names: str) -> Path:
    """Zoo models and their cards copied into ``tmp`` (the shared zoo is never changed)."""
    for name in names:
        for suffix in (".onnx", ".card.json"):
            shutil.copy(ZOO / f"{name}{suffix}", tmp / f"{name}{suffix}")
    return tmp


def swap(tmp: Path, member: str, other: str = "mlp_small") -> None:
    """Replace ``member``'s ONNX file with another zoo model of the same inputs and outputs."""
    shutil.copy(ZOO / f"{other}.onnx", tmp / f"{member}.onnx")


def config(
    tmp: Path, *members: str, placement: str = "[{tier: edge}]", pin: str | None = None
) -> GatewayConfig:
    """One ensemble of ``members`` (zoo names, files in ``tmp``); ``pin`` on the first."""
    lines = [f"      - {{name: {m}, model: {m}.onnx, placement: {placement}}}" for m in members]
    if pin is not None:
        lines[0] = lines[0][:-1] + f", sha256: '{pin}'}}"
    text = "ensembles:\n  - name: e\n    members:\n" + "\n".join(lines) + "\n"
    return parse_yaml(text, source="t.yaml", base_dir=tmp)


@pytest.fixture
def engine() -> Iterator[InProcessEngine]:
    engine = InProcessEngine(1)
    yield engine
    engine.shutdown()


# -- the digests and the check -------------------------------------------------------------


def test_a_file_is_read_once_and_returned_when_it_matches(tmp_path: Path) -> None:
    zoo_copy(tmp_path, "logreg")
    path = tmp_path / "logreg.onnx"
    card = load_card(tmp_path / "logreg.card.json")
    expected = expected_digests(card, tmp_path / "logreg.card.json", None)
    assert expected == (Digest(sha256(path), f"its card {tmp_path / 'logreg.card.json'}"),)
    assert read_verified("logreg", path, expected) == path.read_bytes()


def test_a_mismatch_names_the_file_both_digests_and_where_the_expected_one_came_from(
    tmp_path: Path,
) -> None:
    zoo_copy(tmp_path, "logreg")
    card_digest = sha256(tmp_path / "logreg.onnx")
    swap(tmp_path, "logreg")
    actual = sha256(tmp_path / "logreg.onnx")
    card = load_card(tmp_path / "logreg.card.json")
    with pytest.raises(ModelIntegrityError) as info:
        read_verified(
            "logreg", tmp_path / "logreg.onnx", expected_digests(card, tmp_path / "c.json", None)
        )
    message = str(info.value)
    assert f"model file {tmp_path / 'logreg.onnx'} has SHA-256 {actual}" in message
    assert f"its card {tmp_path / 'c.json'} expects {card_digest}" in message
    assert info.value.members == ["logreg"]

    pin = "AB" * 32  # a pin in either case is compared in lower case
    with pytest.raises(ModelIntegrityError, match=f"{PIN_SOURCE} expects {'ab' * 32}"):
        read_verified("logreg", tmp_path / "logreg.onnx", expected_digests(None, None, pin))


def test_with_a_card_and_a_pin_the_file_must_match_both(tmp_path: Path) -> None:
    zoo_copy(tmp_path, "logreg")
    card = load_card(tmp_path / "logreg.card.json")
    path = tmp_path / "logreg.onnx"
    read_verified("logreg", path, expected_digests(card, None, sha256(path)))
    with pytest.raises(ModelIntegrityError, match=PIN_SOURCE):
        read_verified("logreg", path, expected_digests(card, None, "0" * 64))


def test_a_file_nothing_pins_is_refused_with_its_digest_to_pin(tmp_path: Path) -> None:
    shutil.copy(ZOO / "logreg.onnx", tmp_path / "foreign.onnx")
    digest = sha256(tmp_path / "foreign.onnx")
    with pytest.raises(ModelIntegrityError) as info:
        read_verified("foreign", tmp_path / "foreign.onnx", ())
    assert f"pin it with `sha256: {digest}` in the member's config" in str(info.value)
    # `ensemble replica` may serve the file it was pointed at unverified.
    assert read_verified("foreign", tmp_path / "foreign.onnx", (), allow_unverified=True)


# -- the gateway's loads -------------------------------------------------------------------


def test_start_refuses_every_swapped_file_at_once(tmp_path: Path, engine: InProcessEngine) -> None:
    zoo_copy(tmp_path, "logreg", "forest", "mlp_small")
    swap(tmp_path, "logreg")
    swap(tmp_path, "forest")
    cfg = config(tmp_path, "logreg", "forest", "mlp_small")
    with pytest.raises(ModelIntegrityError) as info:
        build(cfg, engine)
    assert info.value.members == ["logreg", "forest"]
    assert len(info.value.problems) == 2


def test_every_version_is_checked_against_its_own_card(
    tmp_path: Path, engine: InProcessEngine
) -> None:
    zoo_copy(tmp_path, "logreg", "forest", "mlp_small")
    text = (
        "ensembles:\n  - name: e\n    members:\n"
        "      - name: clf\n        model: logreg.onnx\n        placement: [{tier: edge}]\n"
        "        versions: [{version: '2', model: forest.onnx}, {version: '3', model: "
        "mlp_small.onnx}]\n"
    )
    cfg = parse_yaml(text, source="t.yaml", base_dir=tmp_path)
    built = build(cfg, engine).repository
    versions = built.versions["clf"]
    assert {v: m.card.name for v, m in versions.members.items() if m.card} == {
        "1": "logreg", "2": "forest", "3": "mlp_small"}  # fmt: skip
    assert built.members["clf"].version == "3"  # the latest serves unversioned calls
    swap(tmp_path, "forest")  # version 2's file no longer matches its card
    with pytest.raises(ModelIntegrityError) as info:
        build(cfg, engine)
    assert info.value.members == ["clf"] and "forest.onnx" in info.value.problems[0]


def test_a_card_is_checked_against_the_model_on_its_zoos_test_split(
    tmp_path: Path, engine: InProcessEngine, caplog: pytest.LogCaptureFixture
) -> None:
    zoo_copy(tmp_path, "logreg", "forest")
    for name in ("zoo.json", "test.npz"):  # the manifest and test split beside the cards
        shutil.copy(ZOO / name, tmp_path / name)
    caplog.set_level("INFO", logger="ensemble.cards")
    build(config(tmp_path, "logreg", "forest"), engine)
    checked = [r.getMessage() for r in caplog.records if "card checked" in r.getMessage()]
    card = load_card(tmp_path / "forest.card.json")
    assert any(f"(card {card.test_accuracy:.4f})" in line for line in checked), checked
    # A card that claims an accuracy its model does not score (its digest still matches).
    doc = card.model_dump()
    doc["test_accuracy"] = card.test_accuracy - 0.05
    (tmp_path / "forest.card.json").write_text(type(card).model_validate(doc).model_dump_json())
    with pytest.raises(EnsembleError, match="the card describes another model"):
        build(config(tmp_path, "logreg", "forest"), engine)


def test_a_pinned_model_without_a_card_loads(tmp_path: Path, engine: InProcessEngine) -> None:
    shutil.copy(ZOO / "logreg.onnx", tmp_path / "foreign.onnx")
    with pytest.raises(ModelIntegrityError, match="pin it with `sha256: "):
        build(config(tmp_path, "foreign"), engine)
    digest = sha256(tmp_path / "foreign.onnx").upper()
    repository = build(config(tmp_path, "foreign", pin=digest), engine).repository
    assert repository.members["foreign"].card is None


def test_the_session_runs_the_bytes_that_were_checked(
    tmp_path: Path, engine: InProcessEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file swapped right after it was hashed: what runs is still the checked model."""
    import ensemble.control.build as repository_module

    zoo_copy(tmp_path, "logreg")
    real = read_verified

    def then_swapped(*args: object, **kwargs: bool) -> bytes:
        data = real(*args, **kwargs)  # type: ignore[arg-type]
        swap(tmp_path, "logreg")
        return data

    monkeypatch.setattr(repository_module, "read_verified", then_swapped)
    repository = build(config(tmp_path, "logreg"), engine).repository
    member = repository.members["logreg"]

    async def call() -> np.ndarray:
        return (await member.only().infer({"input": X}, ["probabilities"]))["probabilities"]

    got = asyncio.run(call())

    from ensemble.replicas.onnx import load_session

    logreg = load_session(ZOO / "logreg.onnx").run(["probabilities"], {"input": X})[0]
    np.testing.assert_allclose(got, logreg, rtol=1e-6)


def test_a_replica_added_later_checks_the_file_again(
    tmp_path: Path, engine: InProcessEngine
) -> None:
    zoo_copy(tmp_path, "logreg")
    cfg = config(tmp_path, "logreg", placement="[{tier: edge, replicas: {min: 1, max: 3}}]")
    _, provisioners = build_member(cfg, cfg.ensembles[0].members[0], engine)
    provisioner = provisioners[("logreg", "edge")]
    assert isinstance(provisioner, ReplicaSet)
    provisioner.add(provisioner.make("edge/1"))  # the file is still the checked one
    swap(tmp_path, "logreg")
    with pytest.raises(ModelIntegrityError, match=r"logreg\.card\.json expects"):
        provisioner.make("edge/2")


def test_a_process_child_is_told_the_digest_to_check(
    tmp_path: Path, engine: InProcessEngine
) -> None:
    zoo_copy(tmp_path, "logreg")
    cfg = config(tmp_path, "logreg", placement="[{tier: edge, backend: process}]")
    member, _ = build_member(cfg, cfg.ensembles[0].members[0], engine)
    (replica,) = member.replicas
    assert isinstance(replica, ProcessReplica)
    argv = replica.command.argv()
    assert argv[argv.index("--sha256") + 1] == sha256(tmp_path / "logreg.onnx")
    assert argv[argv.index("--card") + 1] == str(tmp_path / "logreg.card.json")


def test_a_replica_server_checks_its_card_and_sha256(
    tmp_path: Path, engine: InProcessEngine
) -> None:
    zoo_copy(tmp_path, "logreg")
    path = tmp_path / "logreg.onnx"
    assert single_model(path, "m", engine, sha256=sha256(path)).repository.members["m"]
    with pytest.raises(ModelIntegrityError, match=PIN_SOURCE):
        single_model(path, "m", engine, sha256="0" * 64)
    swap(tmp_path, "logreg")
    with pytest.raises(ModelIntegrityError, match="its card"):
        single_model(path, "m", engine)
    (tmp_path / "logreg.card.json").unlink()  # no card, no --sha256: served as named
    assert single_model(path, "m", engine).repository.members["m"]


def test_a_replica_server_with_a_swapped_file_exits_3(tmp_path: Path) -> None:
    zoo_copy(tmp_path, "logreg")
    swap(tmp_path, "logreg")
    assert main(["replica", str(tmp_path / "logreg.onnx"), "--http-port", "0"]) == 3
    with pytest.raises(SystemExit) as info:
        main(["replica", str(tmp_path / "logreg.onnx"), "--sha256", "xyz"])
    assert info.value.code == 2


# -- hot reload ----------------------------------------------------------------------------


def test_a_reload_onto_a_swapped_file_is_refused_and_counted(
    tmp_path: Path, engine: InProcessEngine
) -> None:
    zoo_copy(tmp_path, "logreg", "forest")
    cfg = config(tmp_path, "logreg", "forest")
    metrics = GatewayMetrics()
    old = build(cfg, engine)
    dispatcher = Dispatcher(old.repository, metrics)
    reloader = Reloader(cfg, None, engine, dispatcher, old.fleet, metrics)
    swap(tmp_path, "forest")
    text = (
        "ensembles:\n  - name: e\n    members:\n"
        "      - {name: logreg, model: logreg.onnx, placement: [{tier: edge}]}\n"
        "      - {name: forest, model: forest.onnx, placement: [{tier: edge}]}\n"
    )

    async def main() -> None:
        result = await reloader.reload_text(text)
        assert not result.ok
        (error,) = result.errors
        assert str(tmp_path / "forest.onnx") in error and "forest.card.json expects" in error
        assert dispatcher.repository is old.repository  # the old config keeps serving
        await reloader.close()

    asyncio.run(main())
    assert metrics.integrity_failures == {"forest": 1}
    exposition = metrics.exposition()[0].decode()
    assert 'ensemble_model_integrity_failures_total{member="forest"} 1.0' in exposition
    assert metrics.reloads["failure"] == 1


# -- `ensemble validate` -------------------------------------------------------------------


def test_validate_reports_digest_mismatches_with_file_line_and_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zoo_copy(tmp_path, "logreg", "forest")
    swap(tmp_path, "forest")
    path = tmp_path / "c.yaml"
    path.write_text(
        "ensembles:\n  - name: e\n    members:\n"
        "      - {name: logreg, model: logreg.onnx, sha256: '" + "0" * 64 + "',\n"
        "         placement: [{tier: edge}]}\n"
        "      - {name: forest, model: forest.onnx, placement: [{tier: edge}]}\n"
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:4:44: ensembles[0].members[0].sha256: member 'logreg'" in err
    assert f"{path}:6:24: ensembles[0].members[1].model: member 'forest'" in err
    assert "invalid config (2 error(s))" in err


def test_validate_reports_a_card_its_model_does_not_live_up_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zoo_copy(tmp_path, "logreg")
    for name in ("zoo.json", "test.npz"):
        shutil.copy(ZOO / name, tmp_path / name)
    path = tmp_path / "c.yaml"
    path.write_text(
        "ensembles:\n  - name: e\n    members:\n"
        "      - {name: logreg, model: logreg.onnx, placement: [{tier: edge}]}\n"
    )
    assert main(["validate", str(path)]) == 0
    card = load_card(tmp_path / "logreg.card.json")
    doc = card.model_dump()
    doc["test_accuracy"] = card.test_accuracy - 0.05
    (tmp_path / "logreg.card.json").write_text(type(card).model_validate(doc).model_dump_json())
    capsys.readouterr()
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:4:24: ensembles[0].members[0].model: member 'logreg'" in err, err
    assert "the card describes another model" in err


def test_validate_accepts_matching_files(tmp_path: Path) -> None:
    zoo_copy(tmp_path, "logreg")
    path = tmp_path / "c.yaml"
    path.write_text(
        "ensembles: [{name: e, members: [{name: logreg, model: logreg.onnx, "
        "placement: [{tier: edge}]}]}]\n"
    )
    assert main(["validate", str(path)]) == 0


def test_the_pin_must_be_a_hex_digest(tmp_path: Path) -> None:
    zoo_copy(tmp_path, "logreg")
    with pytest.raises(ConfigError, match=r"members\[0\].sha256"):
        config(tmp_path, "logreg", pin="abc")
