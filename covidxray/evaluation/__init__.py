"""Predictions -> metrics with uncertainty, the baseline, shortcut probes and figures."""
