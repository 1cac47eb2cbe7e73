"""`ensemble profile`: every member on every tier it is placed on, measured the way the gateway
calls it: accuracy on the zoo's test split, latency p50/p99 and throughput, memory, and cost.

Members are built by the gateway's own code (:func:`ensemble.control.build.build_member`) on a
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ensemble.config import GatewayConfig, MemberConfig, Placement
from ensemble.control.build import build_member
from ensemble.control.ray_runtime import RayRuntime
from ensemble.errors import EnsembleError
from ensemble.measure.probes import (
    TestSplit,
    load_test_split,
    measure_accuracy,
    measure_latency,
    rss_bytes,
)
from ensemble.measure.rows import ProfileRow, SplitFigures, cost_per_1k, mark_pareto
from ensemble.measure.settings import ProfileSettings, Progress
from ensemble.models.layout import TEST_SET_FILE
from ensemble.replicas.base import Replica
from ensemble.replicas.engine import InProcessEngine
from ensemble.replicas.links import LinkedReplica, Links
from ensemble.replicas.member import Member
from ensemble.replicas.onnx import load_session
from policies.split import expected_s


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

            rows += await _measure_member(
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


async def _measure_member(
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
    member, _ = build_member(cfg, member_cfg, engine, links, ray)
    rss_mb = max(0.0, (rss_bytes() - before) / 2**20)
    file_mb = cfg.resolve(member_cfg.model).stat().st_size / 2**20
    rows: list[ProfileRow] = []
    try:
        await asyncio.gather(*(r.start() for r in member.replicas))
        if member.splitter is not None:
            rows = await _measure_split(cfg, member, member_cfg, split, settings)
            for row in rows:
                row.file_mb, row.rss_mb = file_mb, rss_mb
                report(row)
            return rows
        for place in member_cfg.placement:
            if any(r.tier == place.tier and r.backend == place.backend for r in rows):
                continue  # a second placement of one backend on one tier: the same replicas
            row = await _measure_cell(
                cfg, member, place, place.tier not in what_if, split, settings
            )
            row.file_mb = file_mb
            row.rss_mb = None if place.networked else rss_mb
            rows.append(row)
            report(row)
    finally:
        await member.close()
    return rows


async def _measure_cell(
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
    row.accuracy, row.accuracy_source = await measure_accuracy(member, replicas[0], split)
    latencies, failures, wall_s = await measure_latency(member, replicas, split, settings)
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


async def _measure_split(
    cfg: GatewayConfig,
    member: Member,
    member_cfg: MemberConfig,
    split: TestSplit | None,
    settings: ProfileSettings,
) -> list[ProfileRow]:
    """A row per way a split member runs (tier ``split:OPTION``), measured through that path,
    with its split policy's figures for a one-row call under the link as configured."""
    splitter = member.splitter
    assert splitter is not None
    ctx = splitter.context(1)
    choice = splitter.policy.choose(ctx)
    tail_tier = member_cfg.placement[1].tier
    rows = []
    for option in ctx.options:
        path = splitter.paths[option.name]
        row = ProfileRow(
            member.name,
            f"split:{option.name}",
            "split",
            True,
            1,
            _link_label(cfg, tail_tier),
            None,
            "none",
        )
        row.split = SplitFigures(
            option.name,
            option.head_s * 1e3,
            option.tail_s * 1e3,
            option.sent_bytes,
            option.returned_bytes,
            expected_s(option, ctx) * 1e3,
            option.name == choice,
        )
        row.accuracy, row.accuracy_source = await measure_accuracy(member, path, split)
        latencies, failures, wall_s = await measure_latency(member, [path], split, settings)
        row.calls, row.failures = len(latencies), failures
        if latencies:
            ms = np.asarray(latencies) * 1e3
            row.p50_ms = float(np.percentile(ms, 50))
            row.p99_ms = float(np.percentile(ms, 99))
        row.throughput_rps = len(latencies) / wall_s if wall_s > 0 else 0.0
        rows.append(row)
    return rows


def _backend_kind(replica: Replica) -> str:
    from ensemble.replicas.faults import FailingReplica, StragglerReplica
    from ensemble.replicas.remote import RemoteReplica

    inner: object = replica
    while isinstance(inner, LinkedReplica | FailingReplica | StragglerReplica):
        inner = inner.inner
    return "remote" if isinstance(inner, RemoteReplica) else "inprocess"
