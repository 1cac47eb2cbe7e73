"""Build a digits zoo in a staging directory and move it into place."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from ensemble.models import training
from ensemble.models.card import MANIFEST_FILE, MemberCard, ZooManifest, save_card, save_manifest
from ensemble.models.layout import (
    MEMBER_NAMES,
    TEST_SET_FILE,
    ZOO_FORMAT_VERSION,
    card_file,
    model_file,
    zoo_files,
)
from ensemble.models.onnx_io import session_io_specs
from ensemble.models.profiling import Predictions, latency_profile, predict, profiling_session
from ensemble.models.reference import input_reference

_VERSIONED_LIBRARIES = ("numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime")


def build_unlocked(out_dir: Path, *, seed: int, progress: Callable[[str], None]) -> ZooManifest:
    """Train, export, quantize and profile every member, then install the zoo in ``out_dir``.

    The caller holds the build lock for ``out_dir``.
    """
    if set(MEMBER_NAMES) != {*training.TRAINED_MEMBERS, *training.QUANTIZED_MEMBERS}:
        raise RuntimeError("MEMBER_NAMES and the training recipes disagree")
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=out_dir.parent))
    try:
        progress("loading digits data ...")
        split = training.load_digits_split(seed)
        with (staging / TEST_SET_FILE).open("wb") as handle:
            np.savez(handle, X=split.x_test, y=split.y_test)

        parameters: dict[str, int | None] = {}
        for name in training.TRAINED_MEMBERS:
            progress(f"training {name} ...")
            member = training.train_member(name, split, seed)
            training.export_onnx(member, staging / model_file(name))
            parameters[name] = member.parameters
        for name, source in training.QUANTIZED_MEMBERS.items():
            progress(f"quantizing {source} -> {name} ...")
            training.quantize_int8(staging / model_file(source), staging / model_file(name))
            parameters[name] = parameters[source]

        for name in MEMBER_NAMES:
            progress(f"profiling {name} ...")
            card = _member_card(name, staging / model_file(name), split, seed, parameters[name])
            save_card(card, staging / card_file(name))

        manifest = ZooManifest(
            format_version=ZOO_FORMAT_VERSION,
            dataset=training.DATASET_NAME,
            seed=seed,
            classes=split.classes,
            train_size=len(split.y_train),
            validation_size=len(split.y_validation),
            test_size=len(split.y_test),
            validation_labels=[int(label) for label in split.y_validation],
            test_file=TEST_SET_FILE,
            members=list(MEMBER_NAMES),
            build_seconds=round(time.perf_counter() - started, 2),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            library_versions=_library_versions(),
        )
        save_manifest(manifest, staging)
        _install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"zoo ready in {out_dir} ({manifest.build_seconds:.1f} s)")
    return manifest


def _member_card(
    name: str, path: Path, split: training.DigitsSplit, seed: int, parameters: int | None
) -> MemberCard:
    session = profiling_session(path)
    inputs, outputs = session_io_specs(session)
    classes = split.classes

    def run(x: training.FloatArray) -> Predictions:
        return predict(
            session,
            x,
            probability_output=training.PROBABILITY_OUTPUT,
            label_output=training.LABEL_OUTPUT,
            classes=classes,
        )

    validation = run(split.x_validation)
    test = run(split.x_test)
    per_class = {
        str(label): float(np.mean(validation.labels[split.y_validation == label] == label))
        for label in classes
    }
    content = path.read_bytes()
    return MemberCard(
        name=name,
        model_file=path.name,
        family=training.family_of(name),
        variant="int8" if name in training.QUANTIZED_MEMBERS else "fp32",
        dataset=training.DATASET_NAME,
        seed=seed,
        classes=classes,
        inputs=inputs,
        outputs=outputs,
        probability_output=training.PROBABILITY_OUTPUT,
        label_output=training.LABEL_OUTPUT,
        accuracy=validation.accuracy(split.y_validation),
        test_accuracy=test.accuracy(split.y_test),
        per_class_accuracy=per_class,
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        parameters=parameters,
        latency_ms=latency_profile(session, split.x_test),
        validation_predictions=[int(label) for label in validation.labels],
        # Rounded from float64 so the JSON holds 0.12345, not float32 noise like 0.1234500035.
        validation_probabilities=np.round(validation.probabilities.astype(np.float64), 5).tolist(),
        input_reference=input_reference(inputs[0].name, split.x_train),
    )


def _install(staging: Path, out_dir: Path) -> None:
    """Move the staged files into ``out_dir``, manifest last.

    Each move is an atomic rename on one file system. ``zoo.json`` is the commit marker: it is
    removed first and put back last, so a crash part-way leaves a directory that reads as
    incomplete (and gets rebuilt) rather than a zoo whose cards and models disagree.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for name in zoo_files():
        os.replace(staging / name, out_dir / name)


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.build-"


def _remove_stale_staging(out_dir: Path) -> None:
    # Only a killed build leaves these behind; the caller's lock means none is in use.
    for stale in out_dir.parent.glob(_staging_prefix(out_dir) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    versions.update({library: metadata.version(library) for library in _VERSIONED_LIBRARIES})
    return versions
