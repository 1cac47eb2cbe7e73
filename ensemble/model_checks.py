"""Config checks that read the members' model files: inputs and classes that fit, digests that
match."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ensemble.config_errors import Loc, LocatedError, dotted
from ensemble.errors import EnsembleError
from ensemble.types import ClassLabel, TensorSpec

if TYPE_CHECKING:
    import onnx

    from ensemble.config import GatewayConfig, MemberConfig
    from ensemble.models.card import MemberCard

ONNX_TO_OIP = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}
"""ONNX ``TensorProto`` element types to OIP datatypes (what onnxruntime's types map to)."""


def read_inputs(path: Path) -> tuple[TensorSpec, ...] | None:
    """A model file's inputs as onnxruntime presents them (graph inputs that are not
    initializers; symbolic or unknown dimensions -1), read from the graph without loading a
    session. None when it is not a readable ONNX model whose inputs OIP can carry: loading it
    says why."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's and onnx's own errors: not a model
        return None
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            return None
        tensor = value.type.tensor_type
        datatype = ONNX_TO_OIP.get(tensor.elem_type)
        if datatype is None:
            return None
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        specs.append(TensorSpec(value.name, datatype, dims))
    return tuple(specs) or None


def inputs_agree(a: Sequence[TensorSpec], b: Sequence[TensorSpec]) -> bool:
    """Two members' inputs can take one ensemble request: as many, matched by position (names
    may differ: the ensemble renames), each of one datatype and rank, dimensions equal or
    either variable."""
    return len(a) == len(b) and all(
        x.datatype == y.datatype
        and len(x.shape) == len(y.shape)
        and all(i == j or -1 in (i, j) for i, j in zip(x.shape, y.shape, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name} {s.datatype}{list(s.shape)}" for s in specs)


def _numeric(datatype: str) -> bool:
    return datatype not in ("BYTES", "BOOL")


def input_pairs(
    where: str,
    inputs: Sequence[TensorSpec],
    ensemble_inputs: Sequence[TensorSpec],
    input_map: Mapping[str, str] | None,
) -> list[tuple[TensorSpec, TensorSpec]]:
    """Each of a member's inputs with the ensemble input it takes: by ``input_map`` (member
    name -> ensemble name) or by position; each must fit (rank, fixed dimensions) and convert
    (the same datatype, or numbers to numbers). EnsembleError names the first that does not
    (``where``: the member's place in the config)."""
    if input_map is None:
        if len(inputs) != len(ensemble_inputs):
            raise EnsembleError(
                f"{where}: the model takes {len(inputs)} input(s) ({describe(inputs)}), the "
                f"ensemble {len(ensemble_inputs)} ({describe(ensemble_inputs)}); map them with "
                "`inputs`"
            )
        pairs = list(zip(inputs, ensemble_inputs, strict=True))
    else:
        names = {s.name for s in inputs}
        unknown, missing = sorted(set(input_map) - names), sorted(names - set(input_map))
        if unknown or missing:
            raise EnsembleError(
                f"{where}.inputs: the model's inputs are {', '.join(sorted(names))}"
                + (f"; not the model's: {', '.join(unknown)}" if unknown else "")
                + (f"; not mapped: {', '.join(missing)}" if missing else "")
            )
        by_name = {s.name: s for s in ensemble_inputs}
        pairs = []
        for own in inputs:
            target = by_name.get(input_map[own.name])
            if target is None:
                raise EnsembleError(
                    f"{where}.inputs.{own.name}: the ensemble has no input "
                    f"{input_map[own.name]!r} (it has {', '.join(by_name)})"
                )
            pairs.append((own, target))
    for own, target in pairs:
        fits = len(own.shape) == len(target.shape) and all(
            a == b or -1 in (a, b) for a, b in zip(own.shape, target.shape, strict=True)
        )
        converts = own.datatype == target.datatype or (
            _numeric(own.datatype) and _numeric(target.datatype)
        )
        if not fits or not converts:
            raise EnsembleError(
                f"{where}: model input {describe([own])} cannot take the ensemble's "
                f"{describe([target])}"
            )
    return pairs


def input_errors(cfg: GatewayConfig) -> list[LocatedError]:
    """Members whose inputs do not fit their ensemble's: its declared `inputs` through the
    member's `inputs` map (at that key), else the first readable member's, by position (at
    the `model` key). Files not there yet, or not readable, are left to loading."""
    errors: list[LocatedError] = []
    for ei, ens in enumerate(cfg.ensembles):
        declared = (
            tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in ens.inputs)
            if ens.inputs
            else None
        )
        first: tuple[Loc, str, tuple[TensorSpec, ...]] | None = None
        for mi, member in enumerate(ens.members):
            path = cfg.resolve(member.model)
            inputs = read_inputs(path) if path.is_file() else None
            if inputs is None:
                continue
            loc: Loc = ("ensembles", ei, "members", mi)
            if declared is not None or member.inputs is not None:
                try:
                    input_pairs(dotted(loc), inputs, declared or inputs, member.inputs)
                except EnsembleError as exc:
                    key = "inputs" if member.inputs is not None else "model"
                    errors.append(((*loc, key), exc.message))
                continue
            if first is None:
                first = (loc, member.name, inputs)
            elif not inputs_agree(first[2], inputs):
                errors.append(
                    (
                        (*loc, "model"),
                        f"member {member.name!r} inputs {describe(inputs)} differ from those "
                        f"of member {first[1]!r} ({dotted(first[0])}): {describe(first[2])}; "
                        "an ensemble's members take the same inputs (datatypes and shapes, "
                        "matched by position)",
                    )
                )
    return errors


def graph_labels(
    model: onnx.ModelProto,
) -> tuple[tuple[ClassLabel, ...] | None, dict[str, tuple[ClassLabel, ...]]]:
    """Class labels a graph's classifier node declares, if any, and per ZipMap output name
    the labels of its map keys."""
    classes: tuple[ClassLabel, ...] | None = None
    zipmaps: dict[str, tuple[ClassLabel, ...]] = {}
    for node in model.graph.node:
        labels = _labels(node)
        if labels is None:
            continue
        if node.op_type == "ZipMap":
            for out in node.output:
                zipmaps[out] = labels
        classes = classes or labels
    return classes, zipmaps


def _labels(node: onnx.NodeProto) -> tuple[ClassLabel, ...] | None:
    for attr in node.attribute:
        if attr.name in ("classlabels_ints", "classlabels_int64s") and attr.ints:
            return tuple(int(v) for v in attr.ints)
        if attr.name == "classlabels_strings" and attr.strings:
            return tuple(s.decode() for s in attr.strings)
    return None


def class_columns(
    where: str,
    classes: Sequence[ClassLabel],
    ensemble_classes: Sequence[ClassLabel],
    class_map: Mapping[str, int | str] | None,
) -> list[int] | None:
    """For each of a member's classes, the column of the ensemble's class it is: by
    ``class_map`` (member label as text -> ensemble label), else the classes must be the
    ensemble's (None: the same columns). EnsembleError names what does not fit (``where``:
    the member's place in the config)."""
    if class_map is None:
        if list(classes) != list(ensemble_classes):
            raise EnsembleError(
                f"{where}: the model's classes {list(classes)} are not the ensemble's "
                f"{list(ensemble_classes)}; map them with `class_map`"
            )
        return None
    own = {str(c): c for c in classes}
    unknown = sorted(set(class_map) - set(own))
    missing = sorted(set(own) - set(class_map))
    if unknown or missing:
        raise EnsembleError(
            f"{where}.class_map: the model's classes are {', '.join(own)}"
            + (f"; not the model's: {', '.join(unknown)}" if unknown else "")
            + (f"; not mapped: {', '.join(missing)}" if missing else "")
        )
    index = {str(c): i for i, c in enumerate(ensemble_classes)}
    columns = []
    for label in own:
        target = str(class_map[label])
        if target not in index:
            raise EnsembleError(
                f"{where}.class_map.{label}: {class_map[label]!r} is no class of the ensemble "
                f"({', '.join(index)})"
            )
        columns.append(index[target])
    return None if columns == list(range(len(ensemble_classes))) else columns


def known_classes(cfg: GatewayConfig, member: MemberConfig) -> tuple[ClassLabel, ...] | None:
    """A member's class labels where no session is needed to tell them, in the order loading
    reads them: its config's `classes`, its card's, its graph's classifier node. None when
    only its output's width would say (left to loading)."""
    import onnx

    if member.classes:
        return tuple(member.classes)
    path = cfg.resolve(member.model)
    if not path.is_file():
        return None
    _, card, _ = _card(cfg, member, path)
    if card is not None and card.classes:
        return tuple(card.classes)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's and onnx's own errors: loading says why
        return None
    return graph_labels(model)[0]


def class_errors(cfg: GatewayConfig) -> list[LocatedError]:
    """Members whose classes do not fit their ensemble's (declared `classes`, else the first
    loaded member's): through the member's `class_map` (at that key), else equal (at `model`).
    Members whose classes only a session could tell are left to loading."""
    errors: list[LocatedError] = []
    for ei, ens in enumerate(cfg.ensembles):
        served = [(mi, m) for mi, m in enumerate(ens.members) if m.loaded]
        if ens.classes:
            target: tuple[ClassLabel, ...] | None = tuple(ens.classes)
        else:
            target = known_classes(cfg, served[0][1]) if served else None
        if target is None:
            continue
        for mi, member in served:
            own = known_classes(cfg, member)
            if own is None:
                continue
            loc: Loc = ("ensembles", ei, "members", mi)
            try:
                class_columns(dotted(loc), own, target, member.class_map)
            except EnsembleError as exc:
                key = "class_map" if member.class_map is not None else "model"
                errors.append(((*loc, key), exc.message))
    return errors


def digest_errors(cfg: GatewayConfig) -> list[LocatedError]:
    """Members whose model file does not match its card's or config pin's SHA-256, or has
    neither; at the `sha256` key when the pin is wrong, else at `model` (the check the gateway
    makes again on the bytes it loads)."""
    from ensemble.integrity import PIN_SOURCE, expected_digests, problem
    from ensemble.onnx_files import read_model_files

    errors: list[LocatedError] = []
    for loc, member in cfg.member_specs():
        path = cfg.resolve(member.model)
        if not path.is_file():
            continue
        card_path, card, card_error = _card(cfg, member, path)
        if card_error is not None:
            errors.append(((*loc, "card" if member.card else "model"), card_error))
            continue
        expected = expected_digests(card, card_path, member.sha256)
        try:
            files = read_model_files(path)
        except EnsembleError as exc:
            errors.append(((*loc, "model"), str(exc)))
            continue
        actual = files.digest()
        why = problem(member.name, files.describe(), actual, expected)
        if why is not None:
            pin_wrong = member.sha256 is not None and member.sha256 != actual
            key = "sha256" if pin_wrong and PIN_SOURCE in why else "model"
            errors.append(((*loc, key), why))
    return errors


def _card(
    cfg: GatewayConfig, member: MemberConfig, model: Path
) -> tuple[Path, MemberCard | None, str | None]:
    """The member's card path, its card (None: it has none) and why it is unusable."""
    from ensemble.models.card import card_path_for, load_card

    path = cfg.resolve(member.card) if member.card else card_path_for(model)
    if not path.is_file():
        return path, None, (f"card not found: {path}" if member.card else None)
    try:
        return path, load_card(path), None
    except Exception as exc:  # pydantic's or the file system's: the card is unusable
        return path, None, f"unreadable card {path}: {exc}"
