"""Conformance suites: every registered policy of a kind through the same contract."""
