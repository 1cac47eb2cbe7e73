"""Load-test harness: open- and closed-loop OIP load, SLO checks, fault injection, reports."""

from __future__ import annotations
