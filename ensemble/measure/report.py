"""`ensemble profile`'s outputs: the printed table, and the CSV, Markdown and PNG files."""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path

from ensemble.measure.rows import ProfileRow

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


def format_splits(rows: Sequence[ProfileRow]) -> str:
    """Split members' ways of running: each part's compute, the bytes that cross, what the
    split policy expects of a one-row call under the configured link (its choice marked *),
    and the measured p50 through that path; empty without split members."""
    split_rows = [r for r in rows if r.split is not None]
    if not split_rows:
        return ""
    head = [
        "member",
        "split",
        "head ms",
        "tail ms",
        "sent B",
        "back B",
        "expected ms",
        "p50 ms",
        "chosen",
    ]
    body = []
    for r in split_rows:
        f = r.split
        assert f is not None
        body.append(
            [
                r.member,
                f.option,
                f"{f.head_ms:.3f}",
                f"{f.tail_ms:.3f}",
                str(f.sent_bytes),
                str(f.returned_bytes),
                f"{f.expected_ms:.3f}",
                _cell(r, "p50_ms"),
                "*" if f.chosen else "",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
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
    """``profile.csv``, ``profile.md`` and ``profile.png`` (with matplotlib, the `plot` extra)
    in ``out_dir``; returns their paths."""
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
    if importlib.util.find_spec("matplotlib") is None:  # the slim install: no plot
        return paths[:2]
    from ensemble.measure.plot import pareto_plot

    pareto_plot(rows, paths[2], title)
    return paths
