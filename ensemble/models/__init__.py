"""Model zoo: digits classifiers exported to ONNX, with cards describing each member."""

from __future__ import annotations

from ensemble.models.card import (
    LatencyStats,
    MemberCard,
    OipDatatype,
    TensorSpec,
    ZooManifest,
    card_path_for,
    load_card,
    load_manifest,
    save_card,
)
from ensemble.models.layout import DEFAULT_ZOO_DIR, MEMBER_NAMES, default_zoo_dir
from ensemble.models.onnx_io import NUMPY_TO_OIP, OIP_TO_NUMPY, numpy_to_oip, onnx_io_specs
from ensemble.models.zoo import Progress, build_zoo, complete_manifest, ensure_zoo

__all__ = [
    "DEFAULT_ZOO_DIR",
    "MEMBER_NAMES",
    "NUMPY_TO_OIP",
    "OIP_TO_NUMPY",
    "LatencyStats",
    "MemberCard",
    "OipDatatype",
    "Progress",
    "TensorSpec",
    "ZooManifest",
    "build_zoo",
    "card_path_for",
    "complete_manifest",
    "default_zoo_dir",
    "ensure_zoo",
    "load_card",
    "load_manifest",
    "numpy_to_oip",
    "onnx_io_specs",
    "save_card",
]
