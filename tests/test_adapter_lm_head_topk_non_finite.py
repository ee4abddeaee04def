"""adapter_lm_head_topk on non-finite drafter hidden rows: every backend gives the reference's answer.

A NaN or inf in a drafter hidden row makes the adapted row, and so the reference's log_softmax,
NaN in every column; the reference's stable sort then keeps ids 0..k-1. The triton path (fused
bottleneck kernel, then the lm_head_topk kernels) used to return id 2**31 - 1 there, which the
engine then fed to the target's embedding. Finite rows of the same batch must be unaffected.
"""

from __future__ import annotations

import pytest
import torch

from crossspec_kernels.models.adapters import AdapterConfig, BottleneckAdapter, LinearAdapter
from crossspec_kernels.ops.adapter_projection import adapter_lm_head_topk

NAN, INF = float("nan"), float("inf")
VOCAB, K = 300, 6
POISONED, FINITE = [0, 1, 2, 4], [3, 5]


def make_adapter(kind, d_draft, d_target, dtype):
    torch.manual_seed(0)
    if kind == "none":
        return None
    if kind == "linear":
        adapter = LinearAdapter(AdapterConfig("linear", d_draft, d_target))
    else:
        adapter = BottleneckAdapter(AdapterConfig("bottleneck", d_draft, d_target, rank=16, bias=True))
        with torch.no_grad():
            adapter.up.weight.mul_(4.0)
    return adapter.to(dtype=dtype).eval()


def non_finite_hidden(d_draft, dtype):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, d_draft, generator=gen)
    hidden[0, 7] = NAN
    hidden[1, 3] = INF
    hidden[2, 20] = -INF
    hidden[4] = NAN
    return hidden.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["bottleneck", "linear", "none"])
def test_non_finite_rows_give_the_reference_ids_on_every_backend(kind, dtype):
    d_draft, d_target = (64, 64) if kind == "none" else (48, 64)
    adapter = make_adapter(kind, d_draft, d_target, dtype)
    hidden = non_finite_hidden(d_draft, dtype)
    weight = (torch.randn(VOCAB, d_target, generator=torch.Generator().manual_seed(2)) * 0.3).to(dtype)
    results = {
        backend: adapter_lm_head_topk(hidden, adapter, weight, K, return_probs=True, backend=backend)
        for backend in ("triton", "reference")
    }
    (lp_t, ids_t, probs_t), (lp_r, ids_r, probs_r) = results["triton"], results["reference"]
    for ids in (ids_t, ids_r):
        assert bool(((ids >= 0) & (ids < VOCAB)).all()), f"ids out of [0, {VOCAB}): {ids.tolist()}"
    # Non-finite rows: exactly the reference's answer, ids 0..k-1 with NaN log-probs and probs.
    assert ids_t[POISONED].tolist() == ids_r[POISONED].tolist() == [list(range(K))] * len(POISONED)
    for logprobs, probs in ((lp_t, probs_t), (lp_r, probs_r)):
        assert bool(logprobs[POISONED].isnan().all()) and bool(probs[POISONED].isnan().all())
        assert bool(logprobs[FINITE].isfinite().all()) and bool(probs[FINITE].isfinite().all())
    # Finite rows: as in the fused-vs-unfused tests (fp16 adapters round differently per backend).
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lp_t[FINITE], lp_r[FINITE], rtol=0, atol=atol)
    gaps = (lp_r[FINITE, :-1] - lp_r[FINITE, 1:]).abs()
    clear = torch.ones(len(FINITE), K, dtype=torch.bool)  # ids without a near-tie must agree
    clear[:, :-1] &= gaps > 4 * atol
    clear[:, 1:] &= gaps > 4 * atol
    assert bool(clear.any()) and torch.equal(ids_t[FINITE][clear], ids_r[FINITE][clear])
