"""End-to-end benchmarks driven by a dataset manifest (``crossspec bench e2e``).

``cli`` (the parser and checks, no heavy imports), ``e2e`` (models, measurements, the run; per-round
acceptance comes from the engine's ``stats["accepted_length_histogram"]``), ``summary`` (aggregates
and tables), ``plots`` (matplotlib, imported only when plotting).
"""
