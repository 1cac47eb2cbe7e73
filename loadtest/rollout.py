"""Versions rolled out on evidence: a deliberately worse version rolled back, a better one
promoted, and no request lost while it happens (nor while a version is unloaded).

`python -m loadtest.rollout` (see --help).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def degraded_copy(source: Path, target: Path, *, noise: float, seed: int) -> str:
    """``source`` with Gaussian noise (``noise`` times each weight matrix's own standard
    deviation) added to its 2-D float weights, written to ``target``: a deliberately worse
    version of the same model (same inputs and classes). Its SHA-256."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(source)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.ndim == 2:
            noisy = weights + rng.normal(0.0, noise * float(weights.std()), weights.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    data = model.SerializeToString()
    target.write_bytes(data)
    return hashlib.sha256(data).hexdigest()
