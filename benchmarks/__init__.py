"""Benchmarks runnable by users (`python -m benchmarks.run`); figures are ratios measured side by side."""
