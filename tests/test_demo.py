"""`crossspec demo` end to end, as README's first command runs it (subprocess, default settings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from test_build import subprocess_env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed ``crossspec`` as a user runs it: without TRITON_INTERPRET (CPU ops on PyTorch)."""
    script = Path(sys.executable).parent / "crossspec"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "crossspec_kernels.cli"]
    env = {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_runs_end_to_end_and_is_lossless(tmp_path):
    path = tmp_path / "demo.json"
    result = run_cli("demo", "--json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "TINY RANDOM models" in out and "not speed claims" in out  # honest labels
    rows = re.findall(r"^(chain|tree) .*$", out, re.M)
    assert len(rows) == 3
    payload = json.loads(path.read_text())
    runs = payload["runs"]
    assert [run["identical"] for run in runs] == [True, True, True]
    for run in runs:
        stats = run["stats"]
        assert 0.0 <= stats["acceptance_rate"] <= 1.0
        assert not stats["fallback"]
        assert set(stats["stage_ms"]) >= {"target.prefill", "draft.step", "verify.forward", "kv.compact"}
    # Whether training helps depends on the random tiny models (it does not on every transformers
    # version's initialisation); the demo reports both numbers, the test checks they are real.
    top1 = payload["adapter_top1_held_out"]
    assert 0.0 <= top1["identity"] <= 1.0 and 0.0 <= top1["trained"] <= 1.0


def test_demo_rejects_bad_arguments():
    result = run_cli("demo", "--train-clips", "1")
    assert result.returncode == 2
    assert "argument --train-clips: must be >= 2" in result.stderr
    assert "Traceback" not in result.stderr
    if not torch.cuda.is_available():
        result = run_cli("demo", "--device", "cuda")
        assert result.returncode != 0 and "no CUDA device" in result.stderr
        assert "Traceback" not in result.stderr
