"""Serve one ONNX model from a real Triton Inference Server (the one in the `nvidia-pytriton`
wheel), through a Python-backend inference function running onnxruntime.

Run with the Triton environment's interpreter (`.venv-triton/bin/python`, see venv.py), never
the project's: it does not import the project. The model's inputs and outputs, names and
datatypes, are read from the ONNX file, so the gateway's output checks pass. Triton listens on
127.0.0.1 only, on the given ports (metrics off); once the model is ready it prints

    triton ready: http=127.0.0.1:PORT grpc=127.0.0.1:PORT model=NAME

SIGTERM (or SIGINT) stops Triton and exits 0.

    .venv-triton/bin/python tests/triton/serve_member.py models/digits/mlp_large.onnx \\
        --http-port 8000 --grpc-port 8001 [--name mlp_large]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

# Triton's Python-backend stub links against libpython: it must load the running
# interpreter's, so its directory goes on LD_LIBRARY_PATH before Triton starts (the server
# process inherits this environment).
_LIBDIR = sysconfig.get_config_var("LIBDIR") or ""
if _LIBDIR and _LIBDIR not in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (_LIBDIR, os.environ.get("LD_LIBRARY_PATH", "")) if p
    )

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from pytriton.model_config import ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig  # noqa: E402

ONNX_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _shape(dims: list[Any]) -> tuple[int, ...]:
    """An ONNX shape as Triton's: symbolic or unknown dimensions are -1."""
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)


def _tensors(args: list[Any]) -> list[Tensor]:
    return [Tensor(name=a.name, dtype=ONNX_TYPES[a.type], shape=_shape(a.shape)) for a in args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the ONNX file")
    parser.add_argument("--name", help="model name on the server (default: the file's stem)")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    args = parser.parse_args(argv)
    name = args.name or args.model.stem

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        answers = []
        for request in requests:
            feed = {n: np.asarray(request[n]) for n in input_names}
            answers.append(dict(zip(output_names, session.run(output_names, feed), strict=True)))
        return answers

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
        exit_timeout_secs=5,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    triton = Triton(config=config)
    try:
        # No Triton batching: each request's whole tensors reach onnxruntime, and the declared
        # shapes are the ONNX model's own ([-1, 64] in, [-1] and [-1, 10] out for the zoo).
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=_tensors(session.get_inputs()),
            outputs=_tensors(session.get_outputs()),
            config=ModelConfig(batching=False),
        )
        triton.run()
        print(
            f"triton ready: http=127.0.0.1:{args.http_port} grpc=127.0.0.1:{args.grpc_port} "
            f"model={name}",
            flush=True,
        )
        while not stop.wait(0.5):
            if not triton.is_alive():
                print("triton died", file=sys.stderr, flush=True)
                return 1
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
