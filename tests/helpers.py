"""Helpers the tests share: polling for a condition, reading a metric out of a scrape, a model
with external data."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, overload

import httpx


def wait_for(
    check: Callable[[], object],
    what: str,
    timeout_s: float = 30.0,
    *,
    interval_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> float:
    """Poll ``check`` every ``interval_s`` until it returns something true; the seconds it took.

    Bounded in time and in count: AssertionError saying what it waited for (and ``detail()``,
    say a server's log) once ``timeout_s`` has passed or ``timeout_s / interval_s`` checks have
    failed, whichever comes first."""
    start = time.monotonic()
    checks = 1 + max(1, math.ceil(timeout_s / interval_s))
    for _ in range(checks):
        if check():
            return time.monotonic() - start
        if time.monotonic() - start >= timeout_s:
            break
        time.sleep(interval_s)
    message = f"gave up after {time.monotonic() - start:.1f} s waiting for: {what}"
    raise AssertionError(message if detail is None else f"{message}\n{detail()}")


def scrape(base_url: str) -> str:
    """The Prometheus exposition a gateway (or replica server) at ``base_url`` serves."""
    return httpx.get(f"{base_url}/metrics", timeout=10).text


class _Required:
    """``metric``'s default: a series that is missing fails the test."""


_REQUIRED: Final = _Required()


@overload
def metric(text: str, series: str) -> float: ...


@overload
def metric(text: str, series: str, default: float) -> float: ...


@overload
def metric(text: str, series: str, default: None) -> float | None: ...


def metric(text: str, series: str, default: float | _Required | None = _REQUIRED) -> float | None:
    """The sum of the samples of ``series`` in an exposition ``text``.

    ``series`` is a metric name, with all of its label set (``x{a="1"}``), the start of it
    (``x{a="1"``: every series whose labels begin so), or none (``x``: every series of ``x``).
    With no such sample: ``default`` when given, else AssertionError showing the scrape.
    """
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(series) and line[len(series) : len(series) + 1] in (" ", "{", ",", "}")
    ]
    if values:
        return sum(values)
    if isinstance(default, _Required):
        raise AssertionError(f"no {series} in the metrics:\n{text}")
    return default


def labelled(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of metric ``name`` (as exposed: ``_total`` and all) whose labels
    include ``labels``, in any order; None when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    return sum(found) if found else None


def save_with_external_data(source: Path, target: Path, location: str = "weights.bin") -> Path:
    """``source``'s model saved as ``target`` with its larger tensors (over 1 KiB) kept in the
    external data file ``location`` beside it, as exporters write big models; ``target``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    for tensor in model.graph.initializer:  # only raw_data can move out of the model file
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    return target
