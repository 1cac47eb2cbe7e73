"""Recorded requests to report.json and report.md: stats, SLO verdicts, timeline, warnings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.faults import Mark
from loadtest.runner import OK, GeneratorResult
from loadtest.scenario import ClosedLoad, Scenario

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}


@dataclass(frozen=True)
class RunInfo:
    """Facts about the run that the records do not hold."""

    name: str
    source: str
    started_at: str
    url: str | None
    grpc: str | None
    harness_started: bool
    gateway_exit_code: int | None
    marks: list[Mark]
    interrupted: bool = False


def _quantile(values: np.ndarray, q: float) -> float:
    # Nearest rank: the reported p99 is a latency some request really had.
    return float(np.percentile(values, q, method="inverted_cdf"))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _latency(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {**dict.fromkeys(PERCENTILES), "max": None, "mean": None}
    out: dict[str, float | None] = {k: _ms(_quantile(values, q)) for k, q in PERCENTILES.items()}
    out["max"] = _ms(float(values.max()))
    out["mean"] = _ms(float(values.mean()))
    return out


def _pct_of(key: str) -> float:
    return 100.0 if key == "max" else float(key[1:])


def _checks(sc: Scenario, summary: dict[str, Any], info: RunInfo) -> list[dict[str, Any]]:
    slo = sc.slo
    checks: list[dict[str, Any]] = []

    def add(name: str, op: str, target: float, actual: float | None, unit: str) -> None:
        ok = actual is not None and (
            actual <= target if op == "<=" else actual >= target if op == ">=" else actual == target
        )
        checks.append(
            {"name": name, "op": op, "target": target, "actual": actual, "unit": unit, "passed": ok}
        )

    ok_lat = summary["ok_latencies"]
    for key, target in sorted(slo.latency_ms.items(), key=lambda kv: _pct_of(kv[0])):
        actual = _ms(_quantile(ok_lat, _pct_of(key))) if ok_lat.size else None
        add(f"latency {key}", "<=", target, actual, "ms")
    if slo.max_error_rate is not None:
        add("error rate", "<=", slo.max_error_rate, summary["error_rate"], "")
    if slo.min_accuracy is not None:
        add("accuracy", ">=", slo.min_accuracy, summary["accuracy"], "")
    if slo.min_throughput_rps is not None:
        add("throughput", ">=", slo.min_throughput_rps, summary["throughput_rps"], "req/s")
    if slo.min_goodput_rps is not None:
        add("goodput", ">=", slo.min_goodput_rps, summary["goodput_rps"], "req/s")
    if info.harness_started:
        code = info.gateway_exit_code
        add("gateway exit code after SIGTERM", "==", 0, None if code is None else code, "")
    return checks


def _timeline(
    done_at: np.ndarray,
    intended: np.ndarray,
    latency: np.ndarray,
    ok: np.ndarray,
    good: np.ndarray,
    correct: np.ndarray,
    checked: np.ndarray,
    lag: np.ndarray,
    batch: int,
    degraded: np.ndarray,
) -> list[dict[str, Any]]:
    if done_at.size == 0:
        return []
    seconds = math.ceil(max(float(done_at.max()), float(intended.max())) + 1e-9)
    done_sec = np.minimum(done_at.astype(np.int64), seconds - 1)
    sent_sec = intended.astype(np.int64)
    rows = []
    for s in range(seconds):
        here = done_sec == s
        lat = latency[here & ok]
        sent_here = sent_sec == s
        checked_here = here & checked
        samples = int(checked_here.sum()) * batch
        rows.append(
            {
                "t": s,
                "sent": int(sent_here.sum()),
                "answered": int((here & ok).sum()),
                "degraded": int((here & ok & degraded).sum()),
                "errors": int((here & ~ok).sum()),
                "goodput": int((here & good).sum()),
                "accuracy": round(float(correct[checked_here].sum()) / samples, 4)
                if samples
                else None,
                "latency_ms": {k: (_ms(_quantile(lat, q)) if lat.size else None)
                               for k, q in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0))}
                | {"max": _ms(float(lat.max())) if lat.size else None},
                "lag_p99_ms": _ms(_quantile(lag[sent_here], 99)) if sent_here.any() else None,
            }
        )  # fmt: skip
    return rows


def build_report(sc: Scenario, result: GeneratorResult, info: RunInfo) -> dict[str, Any]:
    """The whole report as a JSON-able dict."""
    rec = result.records
    intended = np.frombuffer(rec.intended, dtype=np.float64)
    latency = np.frombuffer(rec.latency, dtype=np.float64)
    lag = np.frombuffer(rec.lag, dtype=np.float64)
    kind = np.frombuffer(rec.kind, dtype=np.int8)
    klass = np.frombuffer(rec.klass, dtype=np.int8)
    correct = np.frombuffer(rec.correct, dtype=np.int16).astype(np.int64)
    batch = sc.request.batch_size
    ok = kind == rec.kinds.index(OK)
    degraded = np.frombuffer(rec.degraded, dtype=np.int8).astype(bool) & ok
    checked = ok & (correct >= 0)
    all_right = checked & (correct == batch)
    budget_ms = sc.slo.latency_budget_ms()
    within = latency * 1000 <= budget_ms if budget_ms is not None else np.ones_like(ok)
    # Unchecked answers (liveness probes) cannot be wrong, so they count as good when in time.
    good = ok & within & (all_right | ~checked)
    window = max(result.send_window_s, 1e-9)
    sent = len(rec)
    samples = int(checked.sum()) * batch
    errors = {
        name: int((kind == code).sum())
        for code, name in enumerate(rec.kinds)
        if name != OK and (kind == code).any()
    }
    summary: dict[str, Any] = {
        "ok_latencies": latency[ok],
        "error_rate": round(float((~ok).sum()) / sent, 6) if sent else None,
        "accuracy": round(float(correct[checked].sum()) / samples, 6) if samples else None,
        "throughput_rps": round(float(ok.sum()) / window, 3),
        "goodput_rps": round(float(good.sum()) / window, 3),
    }
    checks = _checks(sc, summary, info)
    report: dict[str, Any] = {
        "scenario": _scenario(sc, info),
        "target": {
            "url": info.url,
            "grpc": info.grpc,
            "harness_started": info.harness_started,
            "gateway_exit_code": info.gateway_exit_code,
        },
        "started_at": info.started_at,
        "interrupted": info.interrupted,
        "send_window_s": round(window, 3),
        "requests": {
            "sent": sent,
            "answered": int(ok.sum()),
            "degraded": int(degraded.sum()),
            "errors": int((~ok).sum()),
        },
        "latency_ms": _latency(latency[ok]),
        "latency_budget_ms": budget_ms,
        "throughput_rps": summary["throughput_rps"],
        "goodput_rps": summary["goodput_rps"],
        "accuracy": summary["accuracy"],
        "error_rate": summary["error_rate"],
        "errors": errors,
        "error_samples": {k: v for k, v in result.error_samples.items() if k in errors},
        "slo": {"passed": all(c["passed"] for c in checks), "checks": checks},
        "generator": _generator(sc, result, lag, window),
        "feedback": _feedback(sc, result),
        "classes": _classes(sc, klass, ok, latency, correct, checked, batch),
        "faults": [{"at_s": m.at_s, "name": m.name, "message": m.message} for m in info.marks],
        "timeline": _timeline(
            intended + latency, intended, latency, ok, good, correct, checked, lag, batch, degraded
        ),
    }
    report["warnings"] = warnings(report, isinstance(sc.load, ClosedLoad))
    return report


def _scenario(sc: Scenario, info: RunInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "file": info.source,
        "description": sc.description,
        "protocol": sc.protocol,
        "model": sc.model,
        "endpoint": sc.request.endpoint,
        "batch_size": sc.request.batch_size,
        "load": sc.load.model_dump(mode="json"),
        "mix": [c.model_dump(mode="json") for c in sc.mix],
        "seed": sc.seed,
    }


def _generator(
    sc: Scenario, result: GeneratorResult, lag: np.ndarray, window: float
) -> dict[str, Any]:
    """The generator's own lateness and CPU, and whether it kept up."""
    sent = lag.size
    lag_stats = {
        "p50": _ms(_quantile(lag, 50)) if sent else None,
        "p99": _ms(_quantile(lag, 99)) if sent else None,
        "max": _ms(float(lag.max())) if sent else None,
    }
    cpu_pct = 100.0 * result.cpu_s / (window * sc.generators)
    # CPU per request says how far one generator process could go with a core to itself; when it
    # mostly idled, wake-ups dominate and the extrapolation would be far too low.
    us_per_request = 1e6 * result.cpu_s / sent if sent and result.cpu_s > 0 else None
    busy = us_per_request is not None and cpu_pct >= 25
    closed = isinstance(sc.load, ClosedLoad)
    lag_p99 = lag_stats["p99"] or 0.0
    saturated = lag_p99 > sc.limits.max_send_lag_ms or (closed and cpu_pct >= 90)
    return {
        "processes": sc.generators,
        "send_lag_ms": lag_stats,
        "max_send_lag_ms": sc.limits.max_send_lag_ms,
        "generator_saturated": bool(saturated),
        "cpu_percent": round(cpu_pct, 1),
        "cpu_us_per_request": None if us_per_request is None else round(us_per_request, 1),
        "capacity_rps_estimate": round(sc.generators * 1e6 / us_per_request)
        if busy and us_per_request
        else None,
        "connection_waits": result.queued,
    }


def _feedback(sc: Scenario, result: GeneratorResult) -> dict[str, Any] | None:
    """Feedback posts: how many went out, were accepted, and failed by kind."""
    if sc.feedback is None:
        return None
    counts = result.feedback
    errors = {k: v for k, v in sorted(counts.items()) if k not in ("sent", "accepted")}
    return {
        "share": sc.feedback.share,
        "sent": counts.get("sent", 0),
        "accepted": counts.get("accepted", 0),
        "errors": errors,
    }


def _classes(
    sc: Scenario,
    klass: np.ndarray,
    ok: np.ndarray,
    latency: np.ndarray,
    correct: np.ndarray,
    checked: np.ndarray,
    batch: int,
) -> list[dict[str, Any]]:
    out = []
    for i, spec in enumerate(sc.mix):
        mine = klass == i
        lat = latency[mine & ok]
        samples = int((mine & checked).sum()) * batch
        out.append(
            {
                "name": spec.name,
                "requests": int(mine.sum()),
                "errors": int((mine & ~ok).sum()),
                "latency_ms": {k: v for k, v in _latency(lat).items() if k in ("p50", "p99")},
                "accuracy": round(float(correct[mine & checked].sum()) / samples, 6)
                if samples
                else None,
            }
        )
    return out


def warnings(report: dict[str, Any], closed: bool) -> list[str]:
    """Plain sentences about anything that makes the numbers less trustworthy than they look."""
    out: list[str] = []
    gen = report["generator"]
    lag = gen["send_lag_ms"]
    sent = report["requests"]["sent"]
    if gen["generator_saturated"]:
        if closed:
            out.append(
                f"generator saturated: it used {gen['cpu_percent']:.0f}% of a core per process; "
                "throughput may be the generator's limit, not the target's (add `generators`)"
            )
        else:
            cause = (
                "it is CPU-bound (lower the rate or add `generators`)"
                if gen["cpu_percent"] >= 80
                else f"it used only {gen['cpu_percent']:.0f}% of a core, so it was waiting for a "
                "CPU: the host is busy (the target may share its cores)"
            )
            out.append(
                f"generator saturated: send lag p99 {lag['p99']:.1f} ms > "
                f"{gen['max_send_lag_ms']:g} ms, so requests left late and latencies include "
                f"that delay; {cause}"
            )
    if sent and gen["connection_waits"] > 0.01 * sent:
        out.append(
            f"{gen['connection_waits']} requests waited for a free HTTP connection; that wait "
            "counts as latency (raise `connections` if the target can take more in parallel)"
        )
    if not sent:
        out.append("no requests were sent")
    for name, count in sorted(report["errors"].items(), key=lambda kv: -kv[1]):
        sample = report["error_samples"].get(name)
        out.append(f"{count} x {name}" + (f": {sample}" if sample else ""))
    feedback = report.get("feedback")
    if feedback and feedback["errors"]:
        failed = ", ".join(f"{count} x {kind}" for kind, count in feedback["errors"].items())
        out.append(f"feedback posts that were not accepted: {failed}")
    if report["accuracy"] is None and sent:
        out.append("accuracy not measured (no checked answers)")
    if not report["slo"]["checks"]:
        out.append("no SLO checks defined; the run passes whatever happened")
    if report["interrupted"]:
        out.append("interrupted (Ctrl-C): the numbers cover only part of the schedule")
    return out


def _feedback_row(feedback: dict[str, Any] | None) -> list[str]:
    if not feedback:
        return []
    failed = sum(feedback["errors"].values())
    return [
        f"| feedback posts sent / accepted / failed (share {feedback['share']:g}) | "
        f"{feedback['sent']} / {feedback['accepted']} / {failed} |"
    ]


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1 else f"{value:,.1f}".removesuffix(".0")
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def render_markdown(report: dict[str, Any]) -> str:
    """A page a person reads: verdict first, then numbers, then what to worry about."""
    sc, lat, gen = report["scenario"], report["latency_ms"], report["generator"]
    verdict = "PASSED" if report["slo"]["passed"] else "FAILED"
    target = report["target"]["url"] or report["target"]["grpc"]
    started = "started by the harness" if report["target"]["harness_started"] else "running"
    estimate = gen["capacity_rps_estimate"]
    ceiling = f" (ceiling about {estimate:,} req/s with a core per process)" if estimate else ""
    lines = [
        f"# Load test `{sc['name']}`: {verdict}",
        "",
        *([sc["description"].strip(), ""] if sc["description"].strip() else []),
        f"- scenario: `{sc['file']}`, started {report['started_at']}",
        f"- target: {target} ({started}), protocol `{sc['protocol']}`, "
        f"model `{sc['model']}`, batch {sc['batch_size']}",
        f"- load: `{sc['load']['shape']}` for {report['send_window_s']:g} s, "
        f"{gen['processes']} generator process(es)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests sent / answered / errors | {report['requests']['sent']} / "
        f"{report['requests']['answered']} / {report['requests']['errors']} |",
        f"| answers flagged degraded | {report['requests']['degraded']} |",
        f"| throughput | {_fmt(report['throughput_rps'], 'req/s')} |",
        f"| goodput (correct, within {_fmt(report['latency_budget_ms'], 'ms')}) | "
        f"{_fmt(report['goodput_rps'], 'req/s')} |",
        f"| accuracy | {_fmt(report['accuracy'])} |",
        f"| error rate | {_fmt(report['error_rate'])} |",
        f"| latency p50 / p95 / p99 / max | {_fmt(lat['p50'])} / {_fmt(lat['p95'])} / "
        f"{_fmt(lat['p99'])} / {_fmt(lat['max'], 'ms')} |",
        f"| send lag p50 / p99 / max | {_fmt(gen['send_lag_ms']['p50'])} / "
        f"{_fmt(gen['send_lag_ms']['p99'])} / {_fmt(gen['send_lag_ms']['max'], 'ms')} |",
        f"| generator CPU | {_fmt(gen['cpu_percent'], '% of a core per process')}, "
        f"{_fmt(gen['cpu_us_per_request'], 'us per request')}{ceiling} |",
        *_feedback_row(report.get("feedback")),
        "",
        "## SLO checks",
        "",
    ]
    if report["slo"]["checks"]:
        lines += ["| check | target | actual | verdict |", "|---|---|---|---|"]
        for c in report["slo"]["checks"]:
            lines.append(
                f"| {c['name']} | {c['op']} {_fmt(c['target'], c['unit'])} | "
                f"{_fmt(c['actual'], c['unit'])} | {'pass' if c['passed'] else '**FAIL**'} |"
            )
    else:
        lines.append("None defined.")
    lines += [
        "",
        "## Request classes",
        "",
        "| class | requests | errors | p50 ms | p99 ms | accuracy |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for c in report["classes"]:
        lines.append(
            f"| {c['name']} | {c['requests']} | {c['errors']} | {_fmt(c['latency_ms']['p50'])} | "
            f"{_fmt(c['latency_ms']['p99'])} | {_fmt(c['accuracy'])} |"
        )
    if report["faults"]:
        lines += ["", "## Faults and marks", ""]
        lines += [f"- {f['at_s']:g} s: `{f['name']}` {f['message']}" for f in report["faults"]]
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in report["warnings"]] or ["None."]
    lines += [
        "",
        "Plots: `latency.png`, `throughput.png`, `accuracy.png`. Raw numbers: `report.json`.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """OUT_DIR/report.json and report.md."""
    from loadtest.experiment import write_report as write

    write(out_dir, report, render_markdown(report))
