"""Benchmarks: scripts that print tables (``python -m benchmarks.run_all [--quick]``).

They are not timed unit tests: ``tests/test_benchmarks.py`` only runs each ``--quick`` mode to
prove the scripts work. Results are recorded in ``BENCHMARKS.md``.
"""
