"""crossspec_kernels.lm_head_topk: triton against the spec, ties, probabilities, dispatch and bad inputs.

On a machine without a GPU the triton backend runs in Triton's CPU interpreter (tests/conftest.py),
on small shapes in fp32 and fp16. The reference is evaluated on the inputs the kernel multiplies
(hidden cast to the weight's dtype), so only the fp32 summation order differs: log-probs agree to a
few ulps of their magnitude, and ids agree except where two log-probs are that close (then the
reference's log-prob at our id must equal ours).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from crossspec_kernels import reference
from crossspec_kernels.ops.lm_head_topk import lm_head_topk

ops_lm_head_topk = importlib.import_module("crossspec_kernels.ops.lm_head_topk")
triton_lm_head_topk = importlib.import_module("crossspec_kernels.triton.lm_head_topk")

ATOL = 2e-5


def make_inputs(num_rows, vocab, hidden_dim, dtype, *, hidden_dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_dim, generator=gen)
    weight = torch.randn(vocab, hidden_dim, generator=gen) * hidden_dim**-0.5 * 3
    return hidden.to(device=device, dtype=hidden_dtype), weight.to(device=device, dtype=dtype)


def assert_matches_reference(out, hidden, weight, k, temperature, *, atol=ATOL):
    logprobs, ids, probs = out
    ref_logprobs, ref_ids, ref_probs = reference.lm_head_topk(
        hidden.to(weight.dtype), weight, k, temperature=temperature, return_probs=probs is not None
    )
    assert logprobs.dtype == torch.float32 and ids.dtype == torch.int64
    assert logprobs.shape == ids.shape == (hidden.shape[0], k)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=atol, rtol=1e-5)
    # Sorted descending, no duplicate ids, and each id's reference log-prob is the one we report.
    assert bool((logprobs[:, 1:] <= logprobs[:, :-1]).all())
    assert all(len(set(row)) == k for row in ids.tolist())
    full = torch.log_softmax((hidden.to(weight.dtype).float() @ weight.float().T) / temperature, dim=-1)
    torch.testing.assert_close(full.gather(1, ids), logprobs, atol=atol, rtol=1e-5)
    mismatched = ids != ref_ids
    assert int(mismatched.sum()) <= max(1, ids.numel() // 50), "too many near-ties"
    if probs is not None:
        assert probs.shape == (hidden.shape[0], weight.shape[0]) and probs.dtype == torch.float32
        torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(probs.sum(-1), torch.ones(hidden.shape[0]), atol=1e-5, rtol=0)


# Every value of V, d, M and k is covered (not the full product, to keep the interpreter fast).
CASES = [
    # (M, V, d, k, weight dtype, temperature, return_probs)
    (1, 1000, 64, 1, torch.float32, 1.0, False),
    (5, 1000, 96, 4, torch.float32, 0.7, True),
    (64, 1000, 64, 16, torch.float16, 1.0, True),
    (5, 32064, 64, 16, torch.float16, 1.5, False),
    (1, 32064, 96, 4, torch.float32, 0.5, True),
    (3, 200, 96, 16, torch.float16, 2.0, False),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"M{c[0]}-V{c[1]}-d{c[2]}-k{c[3]}-{c[4]}-T{c[5]}-p{c[6]}"
)
def test_triton_matches_reference(case):
    num_rows, vocab, hidden_dim, k, dtype, temperature, return_probs = case
    hidden, weight = make_inputs(num_rows, vocab, hidden_dim, dtype, seed=num_rows + vocab)
    out = lm_head_topk(
        hidden, weight, k, temperature=temperature, return_probs=return_probs, backend="triton"
    )
    assert (out[2] is None) == (not return_probs)
    assert_matches_reference(out, hidden, weight, k, temperature)


@pytest.mark.parametrize("num_splits", [1, 3, 100])
def test_triton_split_counts_agree(num_splits):
    hidden, weight = make_inputs(4, 1000, 64, torch.float32, seed=7)
    out = triton_lm_head_topk.lm_head_topk(hidden, weight, 8, 1.0, True, num_splits=num_splits)
    assert_matches_reference(out, hidden, weight, 8, 1.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_ties_keep_the_lower_id_first(backend, dtype):
    """Small-integer inputs make every logit exact whatever the summation order (the interpreter's
    numpy matmul rounds differently per column, a GPU's MMA does not), so ties are exact: many among
    the random rows, and ids 5, 130, 600, 999 (one row, across tiles and splits) on top of row 0."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randint(-3, 4, (3, 64), generator=gen).float()
    weight = (torch.randint(-3, 4, (1000, 64), generator=gen) / 8).to(dtype)
    top_row = (hidden[0] / 2).to(dtype)  # logit sum(h^2) / 2: far above any random row's
    for index in (999, 600, 130, 5):
        weight[index] = top_row
    logprobs, ids, _ = lm_head_topk(hidden, weight, 16, backend=backend)
    assert ids[0, :4].tolist() == [5, 130, 600, 999]
    assert len(set(logprobs[0, :4].tolist())) == 1
    ref_logprobs, ref_ids, _ = reference.lm_head_topk(hidden, weight, 16)
    assert torch.equal(ids, ref_ids)  # every tie among the random rows broken the same way
    torch.testing.assert_close(logprobs, ref_logprobs, atol=ATOL, rtol=0)
    assert bool((logprobs[:, 1:] == logprobs[:, :-1]).any())  # the case really has ties
    # All-equal logits (zero hidden): ids 0..k-1 in order, log-prob -log V.
    logprobs, ids, _ = lm_head_topk(torch.zeros(2, 64), weight, 16, backend=backend)
    assert ids.tolist() == [list(range(16))] * 2
    torch.testing.assert_close(logprobs, torch.full((2, 16), -torch.log(torch.tensor(1000.0)).item()))


NAN, INF = float("nan"), float("inf")


def assert_same_as_reference_exactly(out, hidden, weight, k, *, temperature=1.0, return_probs=False):
    """Ids equal the reference's, log-probs (and probs) agree with NaN where it has NaN, ids in [0, V)."""
    logprobs, ids, probs = out
    ref_logprobs, ref_ids, ref_probs = reference.lm_head_topk(
        hidden.to(weight.dtype), weight, k, temperature=temperature, return_probs=return_probs
    )
    vocab = weight.shape[0]
    assert bool(((ids >= 0) & (ids < vocab)).all()), f"ids out of [0, {vocab}): {ids.tolist()}"
    assert ids.tolist() == ref_ids.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=ATOL, rtol=1e-5, equal_nan=True)
    if return_probs:
        torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("return_probs", [False, True])
def test_non_finite_hidden_rows_follow_the_reference(backend, dtype, return_probs):
    """A NaN or inf anywhere in a hidden row makes the reference's log_softmax NaN in every column
    (NaN logits, or inf - inf); its stable sort then keeps ids 0..k-1. Every backend must give
    exactly that (the triton kernel used to return id 2**31 - 1), and leave the finite rows alone.
    V = 1000 spans several tiles and splits."""
    hidden, weight = make_inputs(7, 1000, 64, dtype, hidden_dtype=dtype, seed=21)
    hidden[0, 5] = NAN
    hidden[1, 17] = INF
    hidden[2, 40] = -INF
    hidden[3] = NAN
    hidden[5] = INF
    out = lm_head_topk(hidden, weight, 5, return_probs=return_probs, backend=backend)
    assert_same_as_reference_exactly(out, hidden, weight, 5, return_probs=return_probs)
    logprobs, ids, probs = out
    poisoned = [0, 1, 2, 3, 5]
    assert ids[poisoned].tolist() == [list(range(5))] * len(poisoned)
    assert bool(logprobs[poisoned].isnan().all()) and not bool(logprobs[[4, 6]].isnan().any())
    if return_probs:
        assert bool(probs[poisoned].isnan().all()) and bool(probs[[4, 6]].isfinite().all())


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_minus_inf_logits_sort_last_with_the_lowest_ids(backend):
    """-inf logits (a -inf LM-head entry) are not NaN: the reference keeps a finite log-softmax and
    sorts the -inf ids after the finite ones, lowest first. Only ids 500 and 501 are finite here,
    so whole tiles and splits hold nothing but -inf (their partial sums used to be NaN), and k = 6
    reaches into the -inf ids 0..3. A row of only -inf logits is NaN in the reference."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.rand(3, 64, generator=gen) + 0.5  # positive: -inf * h stays -inf
    weight = torch.zeros(1000, 64)
    weight[:, 0] = -INF
    weight[500:502] = torch.randn(2, 64, generator=gen)
    hidden[2, :] = 1.0
    weight_all_minus_inf = weight.clone()
    weight_all_minus_inf[500:502] = 0.0
    weight_all_minus_inf[500:502, 0] = -INF
    out = lm_head_topk(hidden, weight, 6, return_probs=True, backend=backend)
    assert_same_as_reference_exactly(out, hidden, weight, 6, return_probs=True)
    assert sorted(out[1][0, :2].tolist()) == [500, 501] and out[1][0, 2:].tolist() == [0, 1, 2, 3]
    assert bool(out[0][:, :2].isfinite().all()) and bool((out[0][:, 2:] == -INF).all())
    out = lm_head_topk(hidden, weight_all_minus_inf, 3, return_probs=True, backend=backend)
    assert_same_as_reference_exactly(out, hidden, weight_all_minus_inf, 3, return_probs=True)
    assert out[1].tolist() == [[0, 1, 2]] * 3 and bool(out[0].isnan().all())


@pytest.mark.parametrize("num_splits", [1, 3, 100])
def test_triton_non_finite_rows_at_every_split_count(num_splits):
    hidden, weight = make_inputs(4, 1000, 64, torch.float32, seed=8)
    hidden[1, 3] = NAN
    hidden[2, 0] = -INF
    out = triton_lm_head_topk.lm_head_topk(hidden, weight, 8, 1.0, True, num_splits=num_splits)
    assert_same_as_reference_exactly(out, hidden, weight, 8, return_probs=True)


def test_mixed_dtypes_cast_hidden_to_the_weight_dtype():
    hidden, weight = make_inputs(5, 1000, 64, torch.float16, hidden_dtype=torch.float32, seed=11)
    out = lm_head_topk(hidden, weight, 4, backend="triton")
    assert_matches_reference(out, hidden, weight, 4, 1.0)
    hidden16, weight32 = make_inputs(5, 1000, 64, torch.float32, hidden_dtype=torch.float16, seed=12)
    out = lm_head_topk(hidden16, weight32, 4, backend="triton")
    assert_matches_reference(out, hidden16, weight32, 4, 1.0)


def test_strided_rows_and_k_equal_to_vocab():
    hidden, weight = make_inputs(4, 16, 96, torch.float32, seed=5)
    wide = torch.zeros(4, 200)
    wide[:, :96] = hidden
    view = wide[:, :96]  # row stride 200, unit last stride
    out = lm_head_topk(view, weight, 16, return_probs=True, backend="triton")
    assert_matches_reference(out, hidden, weight, 16, 1.0)


def test_default_backend_on_cpu(monkeypatch):
    hidden, weight = make_inputs(2, 300, 64, torch.float32)
    calls = []
    real = triton_lm_head_topk.lm_head_topk
    monkeypatch.setattr(
        triton_lm_head_topk, "lm_head_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    lm_head_topk(hidden, weight, 2)  # fp32 under the interpreter: triton
    assert calls == [1]
    lm_head_topk(hidden.bfloat16(), weight.bfloat16(), 2)  # bf16: the interpreter mishandles it
    lm_head_topk(torch.randn(65, 64), weight, 2)  # M > 64: only the reference
    assert calls == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lm_head_topk(hidden, weight, 2)
    assert calls == [1]


def test_reference_takes_many_rows_and_bf16():
    hidden, weight = make_inputs(100, 300, 64, torch.bfloat16, hidden_dtype=torch.bfloat16)
    logprobs, ids, probs = lm_head_topk(hidden, weight, 3, return_probs=True, backend="reference")
    assert logprobs.shape == (100, 3) and probs.shape == (100, 300)


def _replace(**changes):
    def build():
        hidden, weight = make_inputs(2, 100, 64, torch.float32)
        args = {"hidden": hidden, "weight": weight, "k": 4, "temperature": 1.0, "backend": "triton"}
        args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
        return args

    return build


BAD_INPUTS = [
    (_replace(hidden=lambda a: a["hidden"][0]), ValueError, "hidden must be 2-D"),
    (_replace(weight=lambda a: a["weight"][None]), ValueError, "weight must be 2-D"),
    (
        _replace(hidden=lambda a: a["hidden"][:, :32]),
        ValueError,
        "weight has hidden size 64 but hidden has 32",
    ),
    (_replace(hidden=lambda a: a["hidden"][:0]), ValueError, "M >= 1"),
    (_replace(k=0), ValueError, r"k must be in \[1, 16\]"),
    (_replace(k=17), ValueError, r"k must be in \[1, 16\]"),
    (_replace(weight=lambda a: a["weight"][:3]), ValueError, "exceeds the vocabulary size V = 3"),
    (_replace(k=2.0), TypeError, "k must be an int"),
    (_replace(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (_replace(temperature=-1.0), ValueError, "temperature must be finite and > 0"),
    (_replace(temperature=float("nan")), ValueError, "temperature must be finite and > 0"),
    (_replace(temperature=float("inf")), ValueError, "temperature must be finite and > 0"),
    (_replace(hidden=lambda a: a["hidden"].to(torch.int32)), ValueError, "hidden must be fp16, bf16 or fp32"),
    (_replace(weight=lambda a: a["weight"].double()), ValueError, "weight must be fp16, bf16 or fp32"),
    (
        _replace(weight=lambda a: a["weight"].t().contiguous().t()),
        ValueError,
        "weight must have a unit-stride",
    ),
    (
        _replace(hidden=lambda a: a["hidden"].t().contiguous().t()),
        ValueError,
        "hidden must have a unit-stride",
    ),
    (_replace(hidden=lambda a: a["hidden"].to("meta")), ValueError, "must be on one device"),
    (_replace(hidden=lambda a: torch.randn(65, 64)), ValueError, r"M in \[1, 64\]"),
    (_replace(backend="cuda"), ValueError, "no 'cuda' \\(C\\+\\+\\) backend"),
    (_replace(backend="fast"), ValueError, "backend must be"),
    (_replace(hidden=lambda a: a["hidden"].bfloat16()), ValueError, "mishandles bf16"),
    (_replace(hidden=lambda a: a["hidden"].tolist()), TypeError, "hidden must be a torch.Tensor"),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_inputs(build, error, match):
    with pytest.raises(error, match=match):
        lm_head_topk(**build())


def test_return_probs_must_be_bool():
    hidden, weight = make_inputs(2, 100, 64, torch.float32)
    with pytest.raises(TypeError, match="return_probs must be a bool"):
        lm_head_topk(hidden, weight, 2, return_probs=1)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight = make_inputs(2, 100, 64, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lm_head_topk(hidden, weight, 2, backend="triton")


def test_launch_plan():
    plan = triton_lm_head_topk.launch_plan(1, 32064, 16, torch.bfloat16, 132)
    assert plan.block_m == 16 and plan.k_pad == 16
    assert plan.num_splits * plan.tiles_per_split * plan.block_v >= 32064
    assert (plan.num_splits - 1) * plan.tiles_per_split * plan.block_v < 32064  # no empty split
    assert plan.num_splits > 132  # the whole GPU streams W at M = 1
    plan = triton_lm_head_topk.launch_plan(64, 1000, 1, torch.float32, 8, num_splits=1000)
    assert plan.block_m == 64 and plan.k_pad == 2 and plan.num_splits == 16 and plan.tiles_per_split == 1


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [1, 8, 37, 64])
@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_matches_reference(num_rows, k, dtype):
    hidden, weight = make_inputs(num_rows, 32064, 4096, dtype, hidden_dtype=dtype, device="cuda")
    out = lm_head_topk(hidden, weight, k, temperature=0.8, return_probs=True)
    # 4096-long fp32 dot products of 16-bit inputs: summation order moves logits by ~1e-5 of their size.
    assert_matches_reference(out, hidden, weight, k, 0.8, atol=2e-4)


@pytest.mark.gpu
def test_gpu_ties_and_graph_capture():
    hidden, weight = make_inputs(4, 32064, 4096, torch.bfloat16, hidden_dtype=torch.bfloat16, device="cuda")
    weight[31000] = weight[17] = weight[3] = hidden[0] / hidden[0].float().norm() * 8
    logprobs, ids, _ = lm_head_topk(hidden, weight, 4)
    assert ids[0, :3].tolist() == [3, 17, 31000]
    lm_head_topk(hidden, weight, 4, return_probs=True)  # compile that variant outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lm_head_topk(hidden, weight, 4, return_probs=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[1], ids)


# ----------------------------------------------------------------------------------------------
# torch.compile: through the crossspec::lm_head_topk custom op
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("return_probs", [False, True])
def test_compiles_with_fullgraph(backend, return_probs):
    torch._dynamo.reset()
    hidden, weight = make_inputs(3, 300, 64, torch.float32, seed=4)

    def draft(hidden, weight):
        return lm_head_topk(hidden, weight, 4, temperature=0.8, return_probs=return_probs, backend=backend)

    got = torch.compile(draft, fullgraph=True, backend="aot_eager")(hidden, weight)
    expected = draft(hidden, weight)
    assert (got[2] is None) == (expected[2] is None) == (not return_probs)
    for x, y in zip(got, expected, strict=True):
        assert x is None or torch.equal(x, y)


def test_custom_op_passes_opcheck():
    hidden, weight = make_inputs(3, 300, 64, torch.float32, seed=5)
    for return_probs in (False, True):
        torch.library.opcheck(
            torch.ops.crossspec.lm_head_topk.default, (hidden, weight, 4, 0.8, return_probs, "reference")
        )
