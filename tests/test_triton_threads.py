"""Triton launches from two threads at once give the reference's results.

The engine's ``overlap=True`` runs the drafter and the target on two threads, so their Triton
kernels launch concurrently. Triton's CPU interpreter patches ``triton.language`` module-wide per
launch and is not thread-safe; without crossspec_kernels/triton/_launch.py's lock these launches
fail ("Did you forget to add @triton.jit ?", "x >= grid_dim[0]") or mix up each other's programs.
On a GPU the kernels are compiled and the same test checks plain concurrent launches.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("triton")

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import triton_interpreting
from crossspec_kernels.ops.lm_head_topk import lm_head_topk
from crossspec_kernels.ops.tree_attention import tree_attention
from crossspec_kernels.triton import _launch

if torch.cuda.is_available() and not triton_interpreting():
    DEVICE = "cuda"
elif triton_interpreting():
    DEVICE = "cpu"
else:  # CPU only and no interpreter: the triton backend cannot run at all
    DEVICE = None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="triton needs a GPU or TRITON_INTERPRET=1")

ITERATIONS = 12


def _attention_case(seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 5, 64, generator=gen)
    k = torch.randn(1, 2, 37, 64, generator=gen)
    v = torch.randn(1, 2, 37, 64, generator=gen)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    mask[3, 1] = False
    expected = reference.tree_attention(q, k, v, mask)
    inputs = [t.to(DEVICE) for t in (q, k, v, mask)]
    return lambda: tree_attention(*inputs[:3], inputs[3], backend="triton"), expected


def _lm_head_case(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 64, generator=gen)
    weight = torch.randn(300, 64, generator=gen) * 0.4
    expected = reference.lm_head_topk(hidden, weight, 4)
    hidden, weight = hidden.to(DEVICE), weight.to(DEVICE)
    return lambda: lm_head_topk(hidden, weight, 4, backend="triton"), expected


def _run_concurrently(cases):
    """Each case in its own thread, ITERATIONS launches each, all starting together."""
    barrier = threading.Barrier(len(cases))
    errors, results = [], [[] for _ in cases]

    def worker(index, launch):
        try:
            barrier.wait(timeout=60)
            for _ in range(ITERATIONS):
                results[index].append(launch())
        except Exception as error:  # reported below, with the thread it came from
            errors.append((index, repr(error)))

    threads = [threading.Thread(target=worker, args=(i, launch)) for i, (launch, _) in enumerate(cases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a launching thread hung"
    assert not errors, f"concurrent triton launches failed: {errors}"
    assert all(len(r) == ITERATIONS for r in results)
    return results


def test_two_threads_launching_tree_attention_match_the_reference():
    cases = [_attention_case(0), _attention_case(1)]
    results = _run_concurrently(cases)
    for (_, expected), outputs in zip(cases, results):
        for out in outputs:
            torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=1e-5)


def test_two_threads_launching_different_ops_match_the_reference():
    """The engine's shape of concurrency: the target's attention next to the drafter's LM-head top-k."""
    cases = [_attention_case(2), _lm_head_case(3)]
    results = _run_concurrently(cases)
    for out in results[0]:
        torch.testing.assert_close(out.cpu(), cases[0][1], atol=2e-5, rtol=1e-5)
    ref_logprobs, ref_ids, _ = cases[1][1]
    for logprobs, ids, _ in results[1]:
        torch.testing.assert_close(logprobs.cpu(), ref_logprobs, atol=2e-5, rtol=1e-5)
        assert torch.equal(ids.cpu(), ref_ids)


def test_the_lock_is_only_taken_under_the_interpreter(monkeypatch):
    def launcher(x):
        return x + 1

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _launch.interpreter_serialized(launcher) is launcher  # compiled kernels: no wrapper, no cost
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    serialized = _launch.interpreter_serialized(launcher)
    assert serialized is not launcher and serialized.__wrapped__ is launcher and serialized(1) == 2
    with _launch.INTERPRETER_LOCK:  # reentrant: a launcher holding it may call another
        assert serialized(2) == 3
