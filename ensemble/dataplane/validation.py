"""Check a request's tensors against a model's metadata before anything runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensemble.errors import InvalidInput, clip
from ensemble.types import ModelMetadata, RequestedOutput, Tensor


def _names(items: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in items)


def _fits(shape: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    return len(shape) == len(spec) and all(
        want in (-1, got) for got, want in zip(shape, spec, strict=True)
    )


def check_inputs(
    meta: ModelMetadata,
    inputs: Sequence[Tensor],
    max_batch_size: int,
    allow_non_finite: bool = False,
) -> dict[str, np.ndarray]:
    """The feed for the model, keyed by input name; InvalidInput says exactly what is off
    (NaN and infinity included, unless ``allow_non_finite``)."""
    expected = {spec.name: spec for spec in meta.inputs}
    feed: dict[str, np.ndarray] = {}
    for tensor in inputs:
        if tensor.name in feed:
            raise InvalidInput(f"input {clip(tensor.name)!r} is given more than once")
        if tensor.name not in expected:
            raise InvalidInput(
                f"unknown input {clip(tensor.name)!r} for model {meta.name!r}; "
                f"it expects {_names(list(expected))}"
            )
        feed[tensor.name] = tensor.data
    missing = [name for name in expected if name not in feed]
    if missing:
        raise InvalidInput(f"model {meta.name!r} is missing input(s) {_names(missing)}")

    batch: int | None = None
    for tensor in inputs:
        spec = expected[tensor.name]
        where = f"input {clip(tensor.name)!r}"
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"{where}: datatype {tensor.datatype} does not match the model's {spec.datatype}"
            )
        if tensor.shape != spec.shape and not _fits(tensor.shape, spec.shape):
            raise InvalidInput(
                f"{where}: shape {list(tensor.shape)} does not match the model's "
                f"{list(spec.shape)} (-1 is any size)"
            )
        if spec.shape and spec.shape[0] == -1:
            rows = tensor.shape[0]
            if rows == 0:
                raise InvalidInput(f"{where}: batch dimension is 0; send at least one row")
            if rows > max_batch_size:
                raise InvalidInput(
                    f"{where}: batch of {rows} exceeds the limit of {max_batch_size} rows"
                )
            if batch is not None and rows != batch:
                raise InvalidInput(f"inputs disagree on batch size ({batch} vs {rows})")
            batch = rows
        if not allow_non_finite:
            _check_finite(tensor.data, where)
    return feed


def _check_finite(data: np.ndarray, where: str) -> None:
    """InvalidInput when a floating-point tensor holds NaN or infinity (a model answers them
    with NaN scores, or worse, a confident wrong class)."""
    if data.dtype.kind != "f" or not data.size:
        return
    finite = np.isfinite(data)
    if finite.all():  # (a float64 sum instead cost twice as much: a cast and an errstate)
        return
    bad = ~finite
    position = [int(i) for i in np.argwhere(bad)[0]]
    raise InvalidInput(
        f"{where}: holds {int(bad.sum())} NaN or infinite value(s), the first at "
        f"{position}; send finite numbers (server.non_finite_inputs: allow passes them)"
    )


def check_outputs(meta: ModelMetadata, outputs: Sequence[RequestedOutput] | None) -> None:
    """Every requested output must exist, once."""
    if outputs is None:
        return
    known = [spec.name for spec in meta.outputs]
    seen: set[str] = set()
    for out in outputs:
        if out.name not in known:
            raise InvalidInput(
                f"unknown output {clip(out.name)!r} for model {meta.name!r}; it has {_names(known)}"
            )
        if out.name in seen:
            raise InvalidInput(f"output {clip(out.name)!r} is requested more than once")
        seen.add(out.name)
