"""Collect bench/bench_*.py as test modules, so `pytest bench/` runs the pytest-benchmark tests.

The main test run never sees them: pyproject.toml's testpaths is ["tests"]. Files named on the
command line are collected by pytest itself, so they are left to it here (no duplicates).
"""

import pytest


def pytest_collect_file(file_path, parent):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
