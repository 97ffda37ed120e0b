"""Benchmarks and model evaluations (dev only, not installed).

``python -m bench.run`` is the benchmark harness (results in bench/RESULTS.md);
``bench/evaluate_churn.py`` and ``bench/evaluate_clv.py`` judge the models.
"""
