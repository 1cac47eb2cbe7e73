"""Prometheus recording rules and burn-rate alerts for the gateway's ``/metrics``, rendered from
service-level objectives (``ensemble rules``).

Each objective's error budget is what it leaves over a 30-day period (99.9 % answered: 0.001).
Burn-rate alerts follow the multi-window, multi-burn-rate method of Google's SRE workbook: a
burn rate is the bad share over a window divided by the budget (for cost: the spend per hour
divided by the budgeted spend per hour). The fast alert pages when 2 % of the period's budget
is gone in an hour (rate 14.4 on the 1 h and the 5 m window); the slow one opens a ticket when
5 % is gone in 6 hours (rate 6 on the 6 h and the 30 m window). ``deploy/prometheus/
ensemble-rules.yml`` is this module's output for the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal
from importlib.resources import files

from ensemble.metrics.histogram import LATENCY_BUCKETS_S

FAST, SLOW = Decimal("14.4"), Decimal("6")
"""Burn factors of the fast (page) and slow (ticket) alerts."""
PERIOD_HOURS = 720
"""The budgets' period: 30 days."""
TEMPLATE = "rules.yml.in"
"""The rules file with ``@@name@@`` where a value of the objectives goes (package data)."""


@dataclass(frozen=True)
class Objectives:
    """What the rules hold the gateway to; percentages are of requests (or answers)."""

    availability: Decimal = Decimal("99.9")
    """Requests answered without a server-side failure (5xx)."""
    latency: Decimal = Decimal("99")
    """Requests answered within ``latency_bound_s``."""
    latency_bound_s: float = 0.1
    """One of the request duration histogram's bucket bounds."""
    whole_answers: Decimal = Decimal("99")
    """An ensemble's answers not degraded (partial, from the fallback, short of the contract)."""
    admitted: Decimal = Decimal("99.9")
    """Requests not shed by admission control (429)."""
    spend_per_hour: Decimal = Decimal("1.0")
    """Spend in the config's currency (replica time and per-call prices)."""
    ejections_per_hour: int = 6
    """Replica ejections by outlier detection an hour that are still acceptable."""

    def problems(self) -> list[str]:
        """What is wrong with these objectives (empty: they render)."""
        found = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ("availability", "latency", "whole_answers", "admitted") and not (
                Decimal(0) < value < Decimal(100)
            ):
                found.append(f"{field.name} must be a percentage above 0 and below 100")
        if self.latency_bound_s not in LATENCY_BUCKETS_S:
            bounds = ", ".join(repr(b) for b in LATENCY_BUCKETS_S)
            found.append(
                f"latency bound {self.latency_bound_s!r} s is not a bucket bound of "
                f"ensemble_request_duration_seconds: one of {bounds}"
            )
        if self.spend_per_hour <= 0:
            found.append("spend per hour must be above 0")
        if self.ejections_per_hour < 0:
            found.append("ejections per hour must be 0 or more")
        return found


def _plain(value: Decimal) -> str:
    """A number as written by hand: 0.001, 1.44, 6, 99.9."""
    return format(value.normalize(), "f")


def _money(value: Decimal) -> str:
    """An amount with at least one decimal: 1.0, 14.4, 6.0."""
    text = _plain(value)
    return text if "." in text else f"{text}.0"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def _budget(percent: Decimal) -> Decimal:
    return (Decimal(100) - percent) / 100


def _burns(prefix: str, budget: Decimal) -> dict[str, str]:
    """A budget, and its fast and slow thresholds as percentages."""
    return {
        f"{prefix}_budget": _plain(budget),
        f"{prefix}_fast": _plain(FAST * budget * 100),
        f"{prefix}_slow": _plain(SLOW * budget * 100),
    }


def render(objectives: Objectives) -> str:
    """The rules file for ``objectives`` (ValueError naming every problem)."""
    problems = objectives.problems()
    if problems:
        raise ValueError("; ".join(problems))
    o = objectives
    spend = o.spend_per_hour
    values = {
        **_burns("avail", _budget(o.availability)),
        **_burns("lat", _budget(o.latency)),
        **_burns("deg", _budget(o.whole_answers)),
        **_burns("shed", _budget(o.admitted)),
        "avail_slo": _plain(o.availability),
        "lat_slo": _plain(o.latency),
        "lat_bound": _duration(o.latency_bound_s),
        "lat_le": repr(o.latency_bound_s),
        "deg_slo": _plain(o.whole_answers),
        "deg_budget_pct": _plain(100 - o.whole_answers),
        "shed_slo": _plain(o.admitted),
        "shed_budget_pct": _plain(100 - o.admitted),
        "spend": _money(spend),
        "spend_fast": _money(FAST * spend),
        "spend_slow": _money(SLOW * spend),
        "spend_period": _plain(spend * PERIOD_HOURS),
        "ejections": str(o.ejections_per_hour),
    }
    values["command"] = _command(o, values)
    text = (files("ensemble.metrics") / TEMPLATE).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise RuntimeError(f"{TEMPLATE} names a value the objectives do not give")
    return text


def _command(o: Objectives, v: dict[str, str]) -> str:
    """The command that renders these rules, as the file's header quotes it."""
    return (
        f"ensemble rules --availability {v['avail_slo']} --latency {v['lat_slo']} "
        f"--latency-bound {o.latency_bound_s!r} --whole-answers {v['deg_slo']} \\\n"
        f"#     --admitted {v['shed_slo']} --spend-per-hour {v['spend']} "
        f"--ejections-per-hour {v['ejections']}"
    )
