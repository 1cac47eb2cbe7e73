"""`ensemble rules`: the Prometheus rules rendered from objectives, numbers as an operator would
write them, the shipped file the defaults' rendering, bad objectives refused with reasons."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from ensemble.cli import main
from ensemble.metrics.rules import Objectives, render

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "prometheus" / "ensemble-rules.yml"


def rules(text: str) -> dict[str, dict[str, object]]:
    groups = yaml.safe_load(text)["groups"]
    return {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}


def test_the_shipped_rules_are_the_defaults_rendering() -> None:
    assert SHIPPED.read_text() == render(Objectives())
    assert main(["rules", "--check", str(SHIPPED)]) == 0


def test_objectives_set_the_thresholds_bound_and_texts() -> None:
    text = render(
        Objectives(
            availability=Decimal("99.95"),
            latency=Decimal("95"),
            latency_bound_s=0.25,
            whole_answers=Decimal("90"),
            admitted=Decimal("99"),
            spend_per_hour=Decimal("2.5"),
            ejections_per_hour=3,
        )
    )
    found = rules(text)
    fast = found["EnsembleErrorBudgetFastBurn"]
    assert "> (14.4 * 0.0005)" in str(fast["expr"])
    assert "More than 0.72 % " in str(fast["annotations"])  # type: ignore[index]
    assert "(SLO 99.95 %)" in str(fast["annotations"])
    assert 'le="0.25"' in str(found["ensemble:request_slow:ratio_rate1h"]["expr"])
    slow = found["EnsembleLatencyBudgetSlowBurn"]
    assert "> (6 * 0.05)" in str(slow["expr"])
    assert "took over 250 ms" in str(slow["annotations"])
    assert "(SLO 95 % within 250 ms)" in str(slow["annotations"])
    assert "> (14.4 * 0.1)" in str(found["EnsembleDegradedAnswersFastBurn"]["expr"])
    assert "(budget 10 %)" in str(found["EnsembleDegradedAnswersFastBurn"]["annotations"])
    assert "(budget 1 %)" in str(found["EnsembleSheddingLoadSlowBurn"]["annotations"])
    cost = found["EnsembleCostBudgetFastBurn"]
    assert "> (14.4 * 2.5)" in str(cost["expr"])
    assert "more than 36.0 an hour" in str(cost["annotations"])
    assert "> 3\n" in str(found["EnsembleReplicaEjections"]["expr"])
    assert "--latency-bound 0.25" in text.splitlines()[2]  # the command that made it
    assert "@@" not in text


@pytest.mark.parametrize(
    ("objectives", "reason"),
    [
        (Objectives(availability=Decimal(100)), "availability must be a percentage"),
        (Objectives(latency=Decimal(0)), "latency must be a percentage"),
        (Objectives(latency_bound_s=0.2), "not a bucket bound"),
        (Objectives(spend_per_hour=Decimal(0)), "spend per hour must be above 0"),
        (Objectives(ejections_per_hour=-1), "ejections per hour"),
    ],
)
def test_bad_objectives_are_refused_with_a_reason(objectives: Objectives, reason: str) -> None:
    assert any(reason in problem for problem in objectives.problems())
    with pytest.raises(ValueError, match=reason):
        render(objectives)


def test_the_command_writes_checks_and_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rules.yml"
    assert main(["rules", "--availability", "99.5", "--out", str(out)]) == 0
    assert out.read_text() == render(Objectives(availability=Decimal("99.5")))
    assert main(["rules", "--availability", "99.5", "--check", str(out)]) == 0
    assert main(["rules", "--check", str(out)]) == 1  # the defaults differ
    assert main(["rules", "--check", str(tmp_path / "missing.yml")]) == 1
    assert main(["rules", "--latency-bound", "0.3"]) == 2
    assert "not a bucket bound" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["rules", "--latency", "ninety"])
    assert exit_.value.code == 2
    assert "not a number: 'ninety'" in capsys.readouterr().err
    assert main(["rules"]) == 0
    assert capsys.readouterr().out == render(Objectives())
