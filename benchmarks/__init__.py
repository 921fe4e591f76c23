"""The benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md) and ``pytest benchmarks/``.

Modules: ``shapes`` (what is timed), ``providers`` (the implementations compared), ``correctness`` (the
float64 gate), ``timing`` (how a call is measured), ``suite`` (running the cases), ``report`` (table,
JSON, CSV, plot), ``__main__`` (the command line).
"""
