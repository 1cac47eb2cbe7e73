"""`ensemble profile`'s pure parts: the Pareto front, costs, and the table/CSV/Markdown files."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ensemble.measure.report import (
    CSV_COLUMNS,
    format_csv,
    format_markdown,
    format_table,
    read_csv,
    write_outputs,
)
from ensemble.measure.rows import ProfileRow, cost_per_1k, dominates, mark_pareto, pareto_front


def row(member: str, tier: str, accuracy: float | None, p50: float | None) -> ProfileRow:
    r = ProfileRow(member, tier, "inprocess", True, 1, "-", accuracy, "test (test.npz, n=360)")
    r.p50_ms, r.p99_ms = p50, None if p50 is None else p50 * 2
    r.throughput_rps, r.calls, r.rss_mb, r.file_mb, r.cost_per_1k = 1000.0, 40, 1.5, 0.25, 0.01
    return r


def test_pareto_front_keeps_exactly_the_undominated_points() -> None:
    points: list[tuple[float | None, float | None]] = [
        (0.90, 1.0),  # fastest: front
        (0.95, 2.0),  # front
        (0.94, 3.0),  # dominated by (0.95, 2.0)
        (0.97, 5.0),  # most accurate: front
        (0.97, 6.0),  # same accuracy, slower: dominated
        (0.90, 1.0),  # a tie with the first: neither dominates the other
        (None, 0.5),  # unmeasured: never on the front, dominates nothing
        (0.99, None),
    ]
    assert pareto_front(points) == [True, True, False, True, False, True, False, False]


def test_pareto_front_of_random_points_matches_the_definition() -> None:
    import random

    rng = random.Random(1)
    for _ in range(50):
        pts: list[tuple[float | None, float | None]] = [
            (rng.choice([0.9, 0.95, 0.97]), rng.choice([1.0, 2.0, 3.0])) for _ in range(6)
        ]
        flags = pareto_front(pts)
        assert any(flags)
        for (a, fa), (b, _) in itertools.permutations(zip(pts, flags, strict=True), 2):
            assert a[0] is not None and a[1] is not None and b[0] is not None and b[1] is not None
            strictly_better = b[0] >= a[0] and b[1] <= a[1] and b != a
            if fa:
                assert not strictly_better


def test_mark_pareto_and_dominates_agree() -> None:
    rows = [row("a", "edge", 0.96, 0.3), row("b", "cloud", 0.97, 40.0), row("c", "edge", 0.95, 1)]
    mark_pareto(rows)
    assert [r.pareto for r in rows] == [True, True, False]
    assert dominates(rows[0], rows[2]) and not dominates(rows[1], rows[0])


def test_cost_adds_amortised_replica_hours_to_the_per_request_price() -> None:
    assert cost_per_1k(0.00001, 0.0, 1, 500.0) == pytest.approx(0.01)
    # 0.36 per replica-hour, 2 replicas, 10 calls/s: 0.72 / 36,000 calls = 2e-5 per call.
    assert cost_per_1k(0.0, 0.36, 2, 10.0) == pytest.approx(0.02)
    assert cost_per_1k(0.0, 0.36, 1, 0.0) is None
    assert cost_per_1k(0.001, 0.0, 1, 0.0) == pytest.approx(1.0)


def test_table_markdown_and_csv_hold_every_row(tmp_path: Path) -> None:
    rows = [row("logreg", "edge", 0.9694, 0.278), row("svm", "cloud", None, None)]
    rows[1].accuracy_source, rows[1].notes = "none", ["no ready replica"]
    rows[1].throughput_rps = rows[1].cost_per_1k = None
    mark_pareto(rows)
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["member", "tier", "backend"] and len(lines) == 4
    assert "0.9694" in lines[2] and lines[2].rstrip().endswith("*")
    md = format_markdown(rows).splitlines()
    assert md[0].startswith("| member | tier |") and len(md) == 4
    assert all(line.count("|") == md[0].count("|") for line in md)

    paths = write_outputs(rows, tmp_path / "out", "test.yaml")
    assert [p.name for p in paths] == ["profile.csv", "profile.md", "profile.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parsed = read_csv(paths[0])
    assert list(parsed[0]) == list(CSV_COLUMNS)
    assert parsed[0]["member"] == "logreg" and float(parsed[0]["accuracy"]) == 0.9694
    assert parsed[0]["pareto"] == "1" and parsed[1]["pareto"] == "0"
    assert parsed[1]["p50_ms"] == "" and parsed[1]["notes"] == "no ready replica"
    assert format_csv(rows) == paths[0].read_text()


def test_card_accuracy_is_marked_in_the_table() -> None:
    r = row("m", "edge", 0.97, 1.0)
    r.accuracy_source = "card (test_accuracy)"
    assert "0.9700*" in format_table([r])
