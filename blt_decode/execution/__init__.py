"""Execution: the per-slot decode state and the runners that execute sessions' primitive calls on it."""
