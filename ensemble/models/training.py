"""Split scikit-learn's bundled digits data and train, export and quantize the zoo's classifiers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

DATASET_NAME = "sklearn.datasets.load_digits"
N_FEATURES = 64
INPUT_NAME = "input"
LABEL_OUTPUT = "label"
PROBABILITY_OUTPUT = "probabilities"
# Opset 17 / ai.onnx.ml 3 is old enough for Triton's and MLServer's onnxruntime builds and new
# enough for quantize_dynamic.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DigitsSplit:
    """Stratified 60/20/20 split of the digits data as raw pixel values (0..16)."""

    x_train: FloatArray
    y_train: LabelArray
    x_validation: FloatArray
    y_validation: LabelArray
    x_test: FloatArray
    y_test: LabelArray

    @property
    def classes(self) -> list[int]:
        return [int(label) for label in np.unique(self.y_train)]


@dataclass(frozen=True)
class TrainedMember:
    """A fitted pipeline (scaler + classifier) and what the card says about its family."""

    name: str
    family: str
    pipeline: Any
    parameters: int | None


def load_digits_split(seed: int) -> DigitsSplit:
    """Load the digits data bundled with scikit-learn and split it 60/20/20, stratified."""
    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    # A quarter of the remaining 80% is the 20% validation split.
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=seed
    )
    return DigitsSplit(x_train, y_train, x_val, y_val, x_test, y_test)


def _logreg(seed: int) -> Any:
    return LogisticRegression(max_iter=2000, random_state=seed)


def _forest(seed: int) -> Any:
    return RandomForestClassifier(n_estimators=100, random_state=seed)


def _mlp_small(seed: int) -> Any:
    return MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=seed)


def _mlp_large(seed: int) -> Any:
    # Wide enough that one batch-1 call costs a few tenths of a millisecond on one thread, so the
    # zoo has a member that is clearly slower than the rest; a dozen epochs already reach ~96%
    # and keep the build well under a minute.
    return MLPClassifier(hidden_layer_sizes=(2048, 1024), max_iter=12, random_state=seed)


def _mlp_deep(seed: int) -> Any:
    # A funnel for split computing: a 24-wide first layer (its output, 96 bytes a row, is
    # three eighths of the input's 256) before two wide layers where nearly all the compute
    # is, so cutting after the first layer sends less than the input and leaves the work to
    # the tail. 60 epochs reach ~94% (its int8 copy ~93%) in under ten seconds.
    return MLPClassifier(hidden_layer_sizes=(24, 1024, 1024), max_iter=60, random_state=seed)


def _svm(seed: int) -> Any:
    # SVC(probability=True) is deprecated since scikit-learn 1.9; this is its stated replacement.
    return CalibratedClassifierCV(SVC(), ensemble=False, cv=5)


_FAMILIES: dict[str, tuple[str, Callable[[int], Any]]] = {
    "logreg": ("linear", _logreg),
    "forest": ("forest", _forest),
    "mlp_small": ("mlp", _mlp_small),
    "mlp_large": ("mlp", _mlp_large),
    "svm": ("svm", _svm),
    "mlp_deep": ("mlp", _mlp_deep),
}

TRAINED_MEMBERS: tuple[str, ...] = tuple(_FAMILIES)
"""Members trained from data, in build order; the int8 members are derived from them."""

QUANTIZED_MEMBERS: dict[str, str] = {
    "mlp_small_int8": "mlp_small",
    "mlp_large_int8": "mlp_large",
    "mlp_deep_int8": "mlp_deep",
}
"""int8 member name -> the fp32 member it is quantized from."""


def family_of(name: str) -> str:
    """Return the model family of a trained or quantized member."""
    return _FAMILIES[QUANTIZED_MEMBERS.get(name, name)][0]


def train_member(name: str, split: DigitsSplit, seed: int) -> TrainedMember:
    """Fit the named member's pipeline on the training split."""
    family, make_classifier = _FAMILIES[name]
    pipeline = Pipeline(
        [("scaler", StandardScaler()), ("classifier", make_classifier(seed))],
    )
    with warnings.catch_warnings():
        if family == "mlp":
            # The MLPs' epoch caps are deliberate (build time); not converging is expected.
            warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(split.x_train, split.y_train)
    return TrainedMember(name, family, pipeline, _weight_count(pipeline.named_steps["classifier"]))


def _weight_count(classifier: Any) -> int | None:
    if isinstance(classifier, MLPClassifier):
        arrays = [*classifier.coefs_, *classifier.intercepts_]
    elif isinstance(classifier, LogisticRegression):
        arrays = [classifier.coef_, classifier.intercept_]
    else:
        # Trees and kernel machines have no weight count comparable to the others.
        return None
    return sum(int(np.asarray(array).size) for array in arrays)


def export_onnx(member: TrainedMember, path: Path) -> None:
    """Export a fitted pipeline to ONNX: input FP32 [N, 64]; outputs label and probabilities."""
    classifier = member.pipeline.named_steps["classifier"]
    with warnings.catch_warnings():
        # skl2onnx's SVC converter reads probA_/probB_, which scikit-learn 1.9 deprecated; they
        # are empty here because the calibrator, not the SVC, produces the probabilities.
        warnings.filterwarnings(
            "ignore", message=r"Attribute `prob[AB]_` was deprecated", category=FutureWarning
        )
        model = convert_sklearn(
            member.pipeline,
            name=member.name,
            initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
            options={id(classifier): {"zipmap": False}},
            target_opset=TARGET_OPSET,
        )
    path.write_bytes(model.SerializeToString())


def quantize_int8(source: Path, target: Path) -> None:
    """Write an int8 dynamically quantized copy of the fp32 ONNX model ``source`` to ``target``."""
    preprocessed = target.with_name(f".{target.name}.preprocessed")
    try:
        # Shape inference only: onnxruntime's graph optimisation step would fuse MatMul+Add into
        # ops the dynamic quantizer then fails to type.
        quant_pre_process(source, preprocessed, skip_optimization=True, skip_symbolic_shape=True)
        quantize_dynamic(preprocessed, target, weight_type=QuantType.QInt8)
    finally:
        preprocessed.unlink(missing_ok=True)
