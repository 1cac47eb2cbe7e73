"""`ensemble profile`: every member on every tier it is placed on, measured the way the gateway
calls it: accuracy on the zoo's test split, latency p50/p99 and throughput, memory, and cost.

Members are built by the gateway's own code (:func:`ensemble.repository.build_member`) on a
gateway-like in-process engine, so each call goes through the very replica objects the gateway
routes to: a tier's emulated link (``LinkedReplica``), stragglers and failures when the config
has them, the oip-http/oip-grpc clients of remote placements and the handles of `ray` ones (on
a private Ray that `ensemble profile` starts). What is *not* measured is the
gateway's frontend (HTTP/gRPC parsing, the dispatcher): these are member-call figures, the cost
an ensemble request pays per member on that tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gc
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ensemble.config import GatewayConfig, MemberConfig, Placement
from ensemble.errors import EnsembleError
from ensemble.links import LinkedReplica, Links
from ensemble.models.layout import TEST_SET_FILE
from ensemble.replicas.base import Replica
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.member import Member
from ensemble.replicas.onnx import load_session
from ensemble.replicas.ray_serve import RayRuntime
from ensemble.repository import build_member

Progress = Callable[[str], None]

ACCURACY_CHUNK_ROWS = 256
"""Test rows per call when scoring accuracy (well under any server's batch limit)."""


@dataclass(frozen=True)
class ProfileSettings:
    """How hard to measure each member x tier cell."""

    requests: int = 1000
    concurrency: int = 4
    batch: int = 1
    warmup: int = 50
    max_seconds: float = 20.0
    """A cell stops starting calls after this long, whatever ``requests`` says."""
    all_tiers: bool = False
    """Also measure every member in-process on configured tiers it is not placed on."""


QUICK = ProfileSettings(requests=40, concurrency=2, warmup=5, max_seconds=5.0)


@dataclass
class ProfileRow:
    """One member on one tier."""

    member: str
    tier: str
    backend: str
    placed: bool
    """False for a what-if row of ``--all-tiers`` (in-process on a tier it is not placed on)."""
    replicas: int
    link: str
    """The tier's emulated link, e.g. ``20ms``, or ``-`` when the config does not emulate it."""
    accuracy: float | None
    accuracy_source: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_rps: float | None = None
    calls: int = 0
    failures: int = 0
    rss_mb: float | None = None
    file_mb: float | None = None
    cost_per_1k: float | None = None
    pareto: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.member}@{self.tier}"


# -- the Pareto front -----------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which (accuracy, latency) points no other point dominates: higher accuracy and lower
    latency are better; a point is dominated by one at least as good on both and better on one.
    Points with a missing value are never on the front."""

    def usable(p: tuple[float | None, float | None]) -> bool:
        a, b = p
        return a is not None and b is not None and not (math.isnan(a) or math.isnan(b))

    flags = []
    for i, (acc, lat) in enumerate(points):
        if not usable((acc, lat)):
            flags.append(False)
            continue
        assert acc is not None and lat is not None
        dominated = False
        for j, (a2, l2) in enumerate(points):
            if j == i or not usable((a2, l2)):
                continue
            assert a2 is not None and l2 is not None
            if a2 >= acc and l2 <= lat and (a2 > acc or l2 < lat):
                dominated = True
                break
        flags.append(not dominated)
    return flags


def dominates(a: ProfileRow, b: ProfileRow) -> bool:
    """True when ``a`` is at least as accurate and as fast as ``b`` and better on one."""
    if None in (a.accuracy, a.p50_ms, b.accuracy, b.p50_ms):
        return False
    assert a.accuracy is not None and b.accuracy is not None
    assert a.p50_ms is not None and b.p50_ms is not None
    return (
        a.accuracy >= b.accuracy
        and a.p50_ms <= b.p50_ms
        and (a.accuracy > b.accuracy or a.p50_ms < b.p50_ms)
    )


def mark_pareto(rows: list[ProfileRow]) -> None:
    for row, flag in zip(rows, pareto_front([(r.accuracy, r.p50_ms) for r in rows]), strict=True):
        row.pareto = flag


# -- cost -----------------------------------------------------------------------------------


def cost_per_1k(
    cost_per_request: float, cost_per_replica_hour: float, replicas: int, throughput_rps: float
) -> float | None:
    """Price of 1,000 calls on a tier: 1,000 x ``cost_per_request`` plus the tier's replica-hours
    amortised over the calls they serve at the measured throughput (the replicas kept busy at
    that rate: a lower bound; idle replicas cost more per call). None when replicas cost money
    but no call succeeded."""
    per_call = cost_per_request
    if cost_per_replica_hour > 0:
        if throughput_rps <= 0:
            return None
        per_call += cost_per_replica_hour * replicas / 3600.0 / throughput_rps
    return per_call * 1000.0


# -- the table ------------------------------------------------------------------------------

COLUMNS: tuple[tuple[str, str], ...] = (
    ("member", "member"),
    ("tier", "tier"),
    ("backend", "backend"),
    ("link", "link"),
    ("accuracy", "accuracy"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("throughput_rps", "calls/s"),
    ("rss_mb", "RSS MB"),
    ("file_mb", "file MB"),
    ("cost_per_1k", "cost/1k"),
    ("pareto", "pareto"),
)
CSV_COLUMNS = (
    "member",
    "tier",
    "backend",
    "placed",
    "replicas",
    "link",
    "accuracy",
    "accuracy_source",
    "p50_ms",
    "p99_ms",
    "throughput_rps",
    "calls",
    "failures",
    "rss_mb",
    "file_mb",
    "cost_per_1k",
    "pareto",
    "notes",
)


def _cell(row: ProfileRow, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "-"
    if key == "accuracy":
        star = "" if row.accuracy_source.startswith("test") else "*"
        return f"{value:.4f}{star}"
    if key in ("p50_ms", "p99_ms"):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if key == "throughput_rps":
        return f"{value:.0f}"
    if key in ("rss_mb", "file_mb"):
        return f"{value:.2f}"
    if key == "cost_per_1k":
        return f"{value:.4g}"
    if key == "pareto":
        return "*" if value else ""
    if key == "tier" and not row.placed:
        return f"{value} (what-if)"
    return str(value)


def table_cells(rows: Sequence[ProfileRow]) -> tuple[list[str], list[list[str]]]:
    return [title for _, title in COLUMNS], [[_cell(r, key) for key, _ in COLUMNS] for r in rows]


def format_table(rows: Sequence[ProfileRow]) -> str:
    """The table as aligned plain text (what the command prints)."""
    head, body = table_cells(rows)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    numeric = {i for i, (key, _) in enumerate(COLUMNS) if key not in ("member", "tier", "backend")}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *(line(b) for b in body)]
    return "\n".join(out) + "\n"


def format_markdown(rows: Sequence[ProfileRow]) -> str:
    head, body = table_cells(rows)
    align = ["---" if key in ("member", "tier", "backend") else "---:" for key, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[ProfileRow]) -> str:
    """Every measured value at full precision (empty cells where there is none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        values: list[object] = []
        for key in CSV_COLUMNS:
            value = getattr(row, key)
            if key == "notes":
                value = "; ".join(row.notes)
            elif isinstance(value, bool):
                value = int(value)
            elif isinstance(value, float):
                value = f"{value:.6g}"
            values.append("" if value is None else value)
        writer.writerow(values)
    return buffer.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_outputs(rows: list[ProfileRow], out_dir: Path, title: str) -> list[Path]:
    """``profile.csv``, ``profile.md`` and ``profile.png`` in ``out_dir``; returns their paths."""
    from ensemble.profile_plot import pareto_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "profile.csv", out_dir / "profile.md", out_dir / "profile.png"]
    paths[0].write_text(format_csv(rows), encoding="utf-8")
    note = (
        f"# {title}\n\n"
        "Accuracy on the zoo's test split (`*`: from the member card instead); latency and "
        "calls/s of member calls through the gateway's replica objects, emulated link "
        "included; RSS: resident-set growth of loading the member; cost per 1,000 calls; "
        "pareto: not dominated on (accuracy, p50).\n\n"
    )
    paths[1].write_text(note + format_markdown(rows), encoding="utf-8")
    pareto_plot(rows, paths[2], title)
    return paths


# -- measuring ------------------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size after giving free heap pages back to the system (so
    memory freed by an earlier member is not silently reused by the next one); Linux /proc,
    0 where unavailable."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import resource

    return resident * resource.getpagesize()


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the deltas may then undercount


@dataclass
class TestSplit:
    x: np.ndarray
    y: np.ndarray
    source: str


def load_test_split(zoo_dir: Path) -> TestSplit | None:
    path = zoo_dir / TEST_SET_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return TestSplit(
            np.ascontiguousarray(data["X"], dtype=np.float32),
            np.asarray(data["y"], dtype=np.int64),
            f"test ({path.name}, n={len(data['y'])})",
        )


def _test_split_fits(member: Member, split: TestSplit | None) -> bool:
    if split is None or len(member.inputs) != 1:
        return False
    spec = member.inputs[0]
    return (
        spec.datatype == "FP32"
        and len(spec.shape) == 2
        and spec.shape[1] in (-1, split.x.shape[1])
        and member.schema is not None
        and all(isinstance(c, int) for c in member.schema.classes)
    )


def _feed(member: Member, split: TestSplit | None, batch: int, i: int) -> dict[str, np.ndarray]:
    """Request ``i``'s feed: ``batch`` consecutive test rows (cycling), else zeros."""
    if split is not None and _test_split_fits(member, split):
        n = len(split.x)
        rows = [(i * batch + k) % n for k in range(batch)]
        return {member.inputs[0].name: split.x[rows]}
    from ensemble.datatypes import OIP_TO_NUMPY

    feed = {}
    for spec in member.inputs:
        shape = tuple(batch if d == -1 and k == 0 else max(d, 1) for k, d in enumerate(spec.shape))
        feed[spec.name] = np.zeros(shape, dtype=OIP_TO_NUMPY[spec.datatype])
    return feed


async def _accuracy(
    member: Member, replica: Replica, split: TestSplit | None
) -> tuple[float | None, str]:
    card = member.card
    fallback = (card.test_accuracy, "card (test_accuracy)") if card else (None, "none")
    if split is None or not _test_split_fits(member, split):
        return fallback
    assert member.schema is not None
    classes = np.asarray(member.schema.classes, dtype=np.int64)
    correct = 0
    for start in range(0, len(split.x), ACCURACY_CHUNK_ROWS):
        x = split.x[start : start + ACCURACY_CHUNK_ROWS]
        feed = {member.inputs[0].name: x}
        for attempt in range(3):  # an emulated lossy link may drop a call
            try:
                result = await replica.infer(feed, member.score_outputs)
                break
            except EnsembleError:
                if attempt == 2:
                    return fallback[0], f"{fallback[1]}; test split failed"
        predicted = classes[np.argmax(member.scores(result), axis=1)]
        correct += int(np.sum(predicted == split.y[start : start + ACCURACY_CHUNK_ROWS]))
    return correct / len(split.x), split.source


async def _latency(
    member: Member,
    replicas: list[Replica],
    split: TestSplit | None,
    settings: ProfileSettings,
) -> tuple[list[float], int, float]:
    """Call the tier's replicas round robin from ``concurrency`` workers; returns the latencies
    (s) of successful calls, the failures, and the wall time."""
    outputs = member.score_outputs
    for i in range(settings.warmup):
        with contextlib.suppress(EnsembleError):  # warm-up: failures do not count
            await replicas[i % len(replicas)].infer(
                _feed(member, split, settings.batch, i), outputs
            )
    latencies: list[float] = []
    failures = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + settings.max_seconds

    async def worker() -> None:
        nonlocal issued, failures
        while issued < settings.requests and time.perf_counter() < deadline:
            i = issued
            issued += 1
            feed = _feed(member, split, settings.batch, i)
            t0 = time.perf_counter()
            try:
                await replicas[i % len(replicas)].infer(feed, outputs)
            except EnsembleError:
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
    return latencies, failures, time.perf_counter() - start


def _what_if(cfg: GatewayConfig, member: MemberConfig) -> tuple[MemberConfig, set[str]]:
    """The member with an in-process placement added on each tier it is not placed on."""
    placed = {p.tier for p in member.placement}
    extra = [Placement(tier=t) for t in cfg.tiers if t not in placed]
    return member.model_copy(update={"placement": [*member.placement, *extra]}), {
        p.tier for p in extra
    }


def _link_label(cfg: GatewayConfig, tier: str) -> str:
    link = cfg.tiers[tier].link
    if not link.emulate:
        return "-"
    label = f"{link.delay_ms:g}ms"
    if link.jitter_ms:
        label += f"±{link.jitter_ms:g}"
    if link.loss:
        label += f" loss {link.loss:g}"
    return label


async def profile_members(
    cfg: GatewayConfig, settings: ProfileSettings, progress: Progress, ray: RayRuntime | None = None
) -> list[ProfileRow]:
    """Measure every member of the config on every tier it is placed on (see the module doc);
    `ray` placements through ``ray``'s deployments."""
    split = load_test_split(cfg.zoo_dir())
    if split is None:
        progress(f"no {TEST_SET_FILE} in {cfg.zoo_dir()}: accuracy comes from member cards")
    engine = InProcessEngine(
        cfg.server.executor_threads,
        max_batch_rows=cfg.server.batch_max_rows,
        batching=cfg.server.batching,
    )
    links = Links(cfg.tiers)
    rows: list[ProfileRow] = []
    configs = [m for e in cfg.ensembles for m in e.members]
    _warm_up_runtime(cfg.resolve(configs[0].model))
    try:
        for index, member_cfg in enumerate(configs, 1):

            def report(row: ProfileRow, index: int = index) -> None:
                p50 = "-" if row.p50_ms is None else f"{row.p50_ms:.2f} ms"
                accuracy = "-" if row.accuracy is None else f"{row.accuracy:.4f}"
                failed = f", {row.failures} failed" if row.failures else ""
                progress(
                    f"[{index}/{len(configs)}] {row.member}@{row.tier} ({row.backend}): "
                    f"accuracy {accuracy}, p50 {p50}, {row.calls} calls{failed}"
                )

            rows += await _profile_member(
                cfg, member_cfg, engine, links, ray, split, settings, report
            )
    finally:
        engine.shutdown()
    mark_pareto(rows)
    return rows


def _warm_up_runtime(path: Path) -> None:
    """Load and drop one session, so onnxruntime's one-time setup (its environment, thread
    pools) is not counted in the first member's memory."""
    if path.is_file():
        with contextlib.suppress(EnsembleError):
            session = load_session(path)
            del session


async def _profile_member(
    cfg: GatewayConfig,
    member_cfg: MemberConfig,
    engine: InProcessEngine,
    links: Links,
    ray: RayRuntime | None,
    split: TestSplit | None,
    settings: ProfileSettings,
    report: Callable[[ProfileRow], None],
) -> list[ProfileRow]:
    """One member's rows; it is loaded here and released on return, so the next member's
    memory is measured on its own."""
    what_if: set[str] = set()
    if settings.all_tiers:
        member_cfg, what_if = _what_if(cfg, member_cfg)
    before = rss_bytes()
    member = build_member(cfg, member_cfg, engine, links, ray)
    rss_mb = max(0.0, (rss_bytes() - before) / 2**20)
    file_mb = cfg.resolve(member_cfg.model).stat().st_size / 2**20
    rows: list[ProfileRow] = []
    try:
        await asyncio.gather(*(r.start() for r in member.replicas))
        for place in member_cfg.placement:
            if any(r.tier == place.tier and r.backend == place.backend for r in rows):
                continue  # a second placement of one backend on one tier: the same replicas
            row = await _profile_cell(
                cfg, member, place, place.tier not in what_if, split, settings
            )
            row.file_mb = file_mb
            row.rss_mb = None if place.networked else rss_mb
            rows.append(row)
            report(row)
    finally:
        await member.close()
    return rows


async def _profile_cell(
    cfg: GatewayConfig,
    member: Member,
    place: Placement,
    placed: bool,
    split: TestSplit | None,
    settings: ProfileSettings,
) -> ProfileRow:
    tier = place.tier
    # Replicas of this placement: its tier's, made by the same backend (a member may have an
    # in-process and a remote placement on one tier; they are measured apart).
    kind = "remote" if place.networked else "inprocess"
    replicas = [
        r for r in member.replicas if r.tier == tier and _backend_kind(r) == kind and r.ready()
    ]
    row = ProfileRow(
        member.name,
        tier,
        place.backend,
        placed,
        len(replicas),
        _link_label(cfg, tier),
        None,
        "none",
    )
    if not replicas:
        row.notes.append("no ready replica (remote servers or Ray down, or link partitioned)")
        card = member.card
        if card is not None:
            row.accuracy, row.accuracy_source = card.test_accuracy, "card (test_accuracy)"
        return row
    row.accuracy, row.accuracy_source = await _accuracy(member, replicas[0], split)
    latencies, failures, wall_s = await _latency(member, replicas, split, settings)
    row.calls, row.failures = len(latencies), failures
    if failures:
        row.notes.append(f"{failures} failed call(s)")
    if latencies:
        ms = np.asarray(latencies) * 1e3
        row.p50_ms = float(np.percentile(ms, 50))
        row.p99_ms = float(np.percentile(ms, 99))
    row.throughput_rps = len(latencies) / wall_s if wall_s > 0 else 0.0
    prices = cfg.tiers[tier]
    row.cost_per_1k = cost_per_1k(
        prices.cost_per_request, prices.cost_per_replica_hour, len(replicas), row.throughput_rps
    )
    return row


def _backend_kind(replica: Replica) -> str:
    from ensemble.replicas.faults import FailingReplica, StragglerReplica
    from ensemble.replicas.remote import RemoteReplica

    inner: object = replica
    while isinstance(inner, LinkedReplica | FailingReplica | StragglerReplica):
        inner = inner.inner
    return "remote" if isinstance(inner, RemoteReplica) else "inprocess"
