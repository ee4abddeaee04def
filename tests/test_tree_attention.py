"""crossspec_kernels.tree_attention: the spec against SDPA, triton against the spec, mask packing,
dispatch and bad inputs.

On a machine without a GPU the triton backend runs in Triton's CPU interpreter (tests/conftest.py),
on small shapes in fp32 and fp16. Tolerances for fp16 (and bf16 on a GPU) follow the flash-attention
tests: our error against an fp32 reference computed from the same low-precision inputs may be at most
twice the error of PyTorch's own attention (matmul + softmax) run in that low precision, plus a
small floor.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from crossspec_kernels import reference
from crossspec_kernels.ops.tree_attention import (
    pack_tree_mask,
    run_tree_attention,
    tree_attention,
    unpack_tree_mask,
)
from crossspec_kernels.testing import ancestor_mask, random_parents

# The module itself (for monkeypatching): once ops/__init__.py exports the function under the same
# name, attribute access on the package would give the function.
ops_tree_attention = importlib.import_module("crossspec_kernels.ops.tree_attention")

FP32_ATOL = 2e-5  # fp32 everywhere: only summation order differs from the reference


# ----------------------------------------------------------------------------------------------
# Input builders
# ----------------------------------------------------------------------------------------------


def random_tree_masks(batch: int, num_nodes: int, seed: int) -> torch.Tensor:
    """[B, Q, Q]: a different random valid tree (parent < child) per request."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([ancestor_mask(random_parents(num_nodes, gen)) for _ in range(batch)])


def make_qkv(batch, q_heads, kv_heads, num_queries, kv_len, head_dim, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, num_queries, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def spread_kv_start(batch: int, num_queries: int, kv_len: int, device="cpu") -> torch.Tensor:
    """Different left padding per row, from none to all of the prefix: 0, ..., L - Q."""
    prefix = kv_len - num_queries
    return torch.tensor([prefix * b // max(batch - 1, 1) for b in range(batch)], device=device)


def fp32_reference(q, k, v, tree_mask, kv_start, scale=None, kv_end=None):
    """The spec evaluated from the (possibly low-precision) inputs, output kept in fp32."""
    return reference.tree_attention(
        q.float(), k.float(), v.float(), tree_mask, kv_start=kv_start, kv_end=kv_end, scale=scale
    )


def torch_low_precision(q, k, v, tree_mask, kv_start, scale=None, kv_end=None):
    """PyTorch's own attention in q's dtype (matmul, masked softmax, matmul): the error yardstick."""
    batch, q_heads, num_queries, head_dim = q.shape
    group = q_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    keys = k.repeat_interleave(group, dim=1)
    values = v.repeat_interleave(group, dim=1)
    visible = reference.tree_visibility(
        batch, num_queries, k.shape[2], tree_mask, kv_start, q.device, kv_end=kv_end
    )
    scores = (q @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ values


def assert_close_to_spec(out, q, k, v, tree_mask, kv_start, scale=None, kv_end=None):
    expected = fp32_reference(q, k, v, tree_mask, kv_start, scale, kv_end)
    assert out.dtype == q.dtype and out.shape == q.shape
    error = (out.float() - expected).abs().max().item()
    if q.dtype == torch.float32:
        assert error <= FP32_ATOL, f"fp32 error {error:.3g}"
        return
    torch_error = (
        (torch_low_precision(q, k, v, tree_mask, kv_start, scale, kv_end).float() - expected)
        .abs()
        .max()
        .item()
    )
    assert error <= 2 * torch_error + 1e-4, f"{q.dtype} error {error:.3g} vs PyTorch's own {torch_error:.3g}"


# ----------------------------------------------------------------------------------------------
# The spec: reference.tree_attention equals SDPA with a dense mask built here by hand
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_heads,kv_heads,num_queries,kv_len,head_dim,shared,scale",
    [(4, 4, 7, 50, 64, False, None), (8, 2, 16, 40, 80, True, 0.3), (6, 3, 5, 5, 32, False, None)],
)
def test_reference_matches_sdpa_with_dense_mask(
    q_heads, kv_heads, num_queries, kv_len, head_dim, shared, scale
):
    batch = 3
    q, k, v = make_qkv(batch, q_heads, kv_heads, num_queries, kv_len, head_dim, torch.float64)
    trees = random_tree_masks(batch, num_queries, seed=1)
    tree_mask = trees[0] if shared else trees
    kv_start = spread_kv_start(batch, num_queries, kv_len)
    prefix = kv_len - num_queries
    dense = torch.zeros(batch, num_queries, kv_len, dtype=torch.bool)
    for b in range(batch):
        dense[b, :, int(kv_start[b]) : prefix] = True
        dense[b, :, prefix:] = trees[0] if shared else trees[b]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], scale=scale, enable_gqa=True)
    got = reference.tree_attention(q, k, v, tree_mask, kv_start=kv_start, scale=scale)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)  # the spec computes in fp32
    # No mask at all means causal among the new tokens.
    dense[:, :, prefix:] = torch.ones(num_queries, num_queries, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], scale=scale, enable_gqa=True)
    got = reference.tree_attention(q, k, v, None, kv_start=kv_start, scale=scale)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)  # the spec computes in fp32


# ----------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) against the spec
# ----------------------------------------------------------------------------------------------

FP16, FP32 = torch.float16, torch.float32
# A subset of Q x L x GQA x D x dtype x mask that holds every value of every axis, several times.
# "tree": a different random tree per request [B, Q, Q]; "shared": one tree [Q, Q]; "causal": None.
CASES = [
    # Q, L, Hq, Hkv, D, dtype, mask
    (1, 1, 2, 2, 64, FP32, "tree"),
    (7, 7, 8, 2, 80, FP16, "tree"),
    (37, 37, 2, 2, 128, FP16, "causal"),
    (64, 64, 8, 2, 64, FP32, "tree"),  # 256 query rows per kv head: two row blocks
    (1, 65, 8, 2, 128, FP16, "tree"),
    (37, 65, 2, 2, 80, FP32, "shared"),
    (64, 65, 2, 2, 128, FP16, "tree"),
    (7, 301, 2, 2, 64, FP16, "causal"),
    (37, 301, 8, 2, 80, FP16, "tree"),  # 148 rows: a full and a partial row block
    (64, 301, 8, 2, 128, FP32, "tree"),
    (1, 1031, 2, 2, 80, FP32, "causal"),
    (7, 1031, 8, 2, 128, FP32, "tree"),
    (37, 1031, 2, 2, 64, FP16, "tree"),
    (64, 1031, 8, 2, 64, FP16, "shared"),
]


def case_id(case) -> str:
    num_queries, kv_len, q_heads, kv_heads, head_dim, dtype, mask = case
    return f"Q{num_queries}-L{kv_len}-H{q_heads}x{kv_heads}-D{head_dim}-{str(dtype)[6:]}-{mask}"


def case_inputs(case, seed=0, device="cpu"):
    num_queries, kv_len, q_heads, kv_heads, head_dim, dtype, mask = case
    batch = 3
    q, k, v = make_qkv(batch, q_heads, kv_heads, num_queries, kv_len, head_dim, dtype, seed, device)
    trees = random_tree_masks(batch, num_queries, seed).to(device)
    tree_mask = {"tree": trees, "shared": trees[0], "causal": None}[mask]
    return q, k, v, tree_mask, spread_kv_start(batch, num_queries, kv_len, device)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case):
    q, k, v, tree_mask, kv_start = case_inputs(case)
    out = tree_attention(q, k, v, tree_mask, kv_start=kv_start, backend="triton")
    assert_close_to_spec(out, q, k, v, tree_mask, kv_start)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 17])
def test_triton_split_counts_agree(num_splits):
    """Forced split counts (the heuristic picks one on its own): merging by log-sum-exp is exact."""
    from crossspec_kernels.triton.tree_attention import tree_attention as launch

    q, k, v, tree_mask, kv_start = case_inputs((7, 1031, 8, 2, 64, FP32, "tree"), seed=3)
    # Row 0 sees the whole prefix; row 2 has only its tree, so most of its splits see nothing.
    out = launch(q, k, v, pack_tree_mask(tree_mask), kv_start, 64**-0.5, num_splits=num_splits)
    assert_close_to_spec(out, q, k, v, tree_mask, kv_start)


def test_triton_no_padding_custom_scale_int_kv_start():
    q, k, v, tree_mask, _ = case_inputs((7, 130, 4, 2, 96, FP32, "tree"), seed=5)
    out = tree_attention(q, k, v, tree_mask, scale=0.05, backend="triton")
    assert_close_to_spec(out, q, k, v, tree_mask, None, scale=0.05)
    out = tree_attention(q, k, v, tree_mask, kv_start=100, backend="triton")
    assert_close_to_spec(out, q, k, v, tree_mask, torch.full((3,), 100))


def test_triton_strided_cache_views():
    """HF caches are views: a preallocated [B, H, Lmax, D] buffer sliced to L, a [B, L, H, D] buffer
    transposed, a query that is a transpose of [B, Q, H, D]. Only the head dim is unit-stride."""
    batch, q_heads, kv_heads, num_queries, kv_len, head_dim, max_len = 2, 4, 2, 9, 200, 64, 257
    q, k, v = make_qkv(batch, q_heads, kv_heads, num_queries, kv_len, head_dim, FP16, seed=7)
    k_buffer = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=FP16)
    k_buffer[:, :, :kv_len] = k
    v_buffer = torch.zeros(batch, max_len, kv_heads, head_dim, dtype=FP16)
    v_buffer[:, :kv_len] = v.transpose(1, 2)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_view, v_view = k_buffer[:, :, :kv_len], v_buffer[:, :kv_len].transpose(1, 2)
    assert not (q_strided.is_contiguous() or k_view.is_contiguous() or v_view.is_contiguous())
    tree_mask = random_tree_masks(batch, num_queries, seed=7)
    kv_start = torch.tensor([3, 150], dtype=torch.int32)
    out = tree_attention(q_strided, k_view, v_view, tree_mask, kv_start=kv_start, backend="triton")
    expected = tree_attention(q, k, v, tree_mask, kv_start=kv_start, backend="triton")
    assert torch.equal(out, expected)
    assert_close_to_spec(out, q, k, v, tree_mask, kv_start)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kv_len", [7, 20])
def test_rows_that_see_nothing_are_zero(backend, kv_len):
    batch, num_queries = 2, 7
    q, k, v = make_qkv(batch, 4, 2, num_queries, kv_len, 64, FP32, seed=9)
    tree_mask = random_tree_masks(batch, num_queries, seed=9)
    tree_mask[0, 2] = False
    tree_mask[1, 5] = False
    tree_mask[1, 0] = False
    kv_start = torch.full((batch,), kv_len - num_queries)  # the whole prefix is padding
    out = tree_attention(q, k, v, tree_mask, kv_start=kv_start, backend=backend)
    assert out.isfinite().all()
    blind = torch.zeros(batch, num_queries, dtype=torch.bool)
    blind[0, 2] = blind[1, 5] = blind[1, 0] = True
    assert (out.transpose(1, 2)[blind] == 0).all()
    assert (out.transpose(1, 2)[~blind].abs().sum(-1) > 0).all()
    assert_close_to_spec(out, q, k, v, tree_mask, kv_start)


# ----------------------------------------------------------------------------------------------
# Per-row cache lengths (kv_end): one call over a fixed-capacity cache
# ----------------------------------------------------------------------------------------------


def ragged_bounds(batch: int, num_queries: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end) per row: the full cache, a middle length with padding, only the tree."""
    ends = [kv_len, (kv_len + num_queries) // 2, num_queries]
    starts = [0, (ends[1] - num_queries) // 3, 0]
    return torch.tensor(starts[:batch]), torch.tensor(ends[:batch])


def truncated(fn, q, k, v, tree_mask, kv_start, kv_end, **kwargs) -> torch.Tensor:
    """Row by row, attention over the row's own cache cut at kv_end[b]: what kv_end must equal."""
    rows = []
    for b in range(q.shape[0]):
        end = int(kv_end[b])
        mask = tree_mask if tree_mask is None or tree_mask.dim() == 2 else tree_mask[b : b + 1]
        rows.append(
            fn(
                q[b : b + 1],
                k[b : b + 1, :, :end],
                v[b : b + 1, :, :end],
                mask,
                kv_start=kv_start[b : b + 1],
                **kwargs,
            )
        )
    return torch.cat(rows)


def test_reference_kv_end_matches_sdpa_with_dense_mask():
    batch, num_queries, kv_len = 3, 5, 30
    q, k, v = make_qkv(batch, 4, 2, num_queries, kv_len, 32, torch.float64, seed=2)
    trees = random_tree_masks(batch, num_queries, seed=2)
    kv_start, kv_end = ragged_bounds(batch, num_queries, kv_len)
    dense = torch.zeros(batch, num_queries, kv_len, dtype=torch.bool)
    for b in range(batch):
        start, end = int(kv_start[b]), int(kv_end[b])
        dense[b, :, start : end - num_queries] = True
        dense[b, :, end - num_queries : end] = trees[b]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], enable_gqa=True)
    got = reference.tree_attention(q, k, v, trees, kv_start=kv_start, kv_end=kv_end)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    expected = truncated(reference.tree_attention, q, k, v, trees, kv_start, kv_end)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)  # fp32 sums over another L


KV_END_CASES = [
    # Q, L, Hq, Hkv, D, dtype, mask
    (7, 301, 8, 2, 64, FP32, "tree"),
    (37, 130, 2, 2, 80, FP16, "shared"),
    (1, 1031, 4, 2, 128, FP32, "causal"),
    (64, 200, 8, 2, 64, FP16, "tree"),
]


@pytest.mark.parametrize("case", KV_END_CASES, ids=case_id)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_triton_kv_end_matches_reference(case, num_splits):
    from crossspec_kernels.triton.tree_attention import tree_attention as launch

    q, k, v, tree_mask, _ = case_inputs(case, seed=4)
    num_queries, kv_len = q.shape[2], k.shape[2]
    kv_start, kv_end = ragged_bounds(3, num_queries, kv_len)
    # Stale slots past a row's end (a fixed-capacity cache) are never read: NaN there changes nothing.
    stale_k, stale_v = k.clone(), v.clone()
    for b in range(3):
        stale_k[b, :, int(kv_end[b]) :] = float("nan")
        stale_v[b, :, int(kv_end[b]) :] = float("nan")
    packed = None if tree_mask is None else pack_tree_mask(tree_mask)
    out = launch(
        q, stale_k, stale_v, packed, kv_start, q.shape[-1] ** -0.5, kv_end=kv_end, num_splits=num_splits
    )
    assert out.isfinite().all()
    assert_close_to_spec(out, q, k, v, tree_mask, kv_start, kv_end=kv_end)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kv_end_equals_truncated_caches(backend):
    q, k, v, tree_mask, _ = case_inputs((7, 90, 4, 2, 64, FP32, "tree"), seed=6)
    kv_start, kv_end = ragged_bounds(3, 7, 90)
    out = tree_attention(q, k, v, tree_mask, kv_start=kv_start, kv_end=kv_end, backend=backend)
    expected = truncated(tree_attention, q, k, v, tree_mask, kv_start, kv_end, backend=backend)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)
    # kv_end = L is the default.
    full = torch.full((3,), 90)
    assert torch.equal(
        tree_attention(q, k, v, tree_mask, kv_start=kv_start, kv_end=full, backend=backend),
        tree_attention(q, k, v, tree_mask, kv_start=kv_start, backend=backend),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_run_tree_attention_is_the_op_without_checks(backend):
    q, k, v, tree_mask, kv_start = case_inputs((7, 60, 4, 2, 64, FP32, "tree"), seed=8)
    kv_end = torch.tensor([60, 40, 30])
    kv_start = torch.tensor([0, 3, 23])
    for mask in (tree_mask, pack_tree_mask(tree_mask), pack_tree_mask(tree_mask[0])[0], None):
        expected = tree_attention(q, k, v, mask, kv_start=kv_start, kv_end=kv_end, scale=0.2, backend=backend)
        out = run_tree_attention(q, k, v, mask, kv_start, kv_end, 0.2, backend)
        assert torch.equal(out, expected)


def test_launch_plan_is_computed_once_per_shape(monkeypatch):
    from crossspec_kernels.triton import tree_attention as triton_tree_attention

    calls = []
    real = triton_tree_attention.choose_num_splits
    monkeypatch.setattr(
        triton_tree_attention, "choose_num_splits", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    triton_tree_attention._launch_plan.cache_clear()
    q, k = torch.empty(2, 8, 5, 128), torch.empty(2, 2, 777, 128)
    plans = {triton_tree_attention.launch_plan(q, k) for _ in range(3)}
    assert len(plans) == 1 and calls == [1]


# ----------------------------------------------------------------------------------------------
# Packed masks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_queries", [1, 31, 32, 33, 64, 100, 128])
def test_pack_round_trip(num_queries):
    gen = torch.Generator().manual_seed(num_queries)
    mask = torch.rand(3, num_queries, num_queries, generator=gen) < 0.5
    packed = pack_tree_mask(mask)
    assert packed.dtype == torch.int32 and packed.shape == (3, num_queries, math.ceil(num_queries / 32))
    assert torch.equal(unpack_tree_mask(packed, num_queries), mask)
    shared = pack_tree_mask(mask[0])
    assert shared.shape == (1, num_queries, math.ceil(num_queries / 32))
    assert torch.equal(shared[0], packed[0])


def test_pack_bit_layout():
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[0, 0] = True  # word 0, bit 0
    mask[1, 31] = True  # word 0, bit 31: the sign bit
    mask[2, 32] = True  # word 1, bit 0
    mask[3, 39] = True  # word 1, bit 7
    mask[4] = True  # every bit of both words below Q; nothing above
    packed = pack_tree_mask(mask)[0]
    assert packed[0].tolist() == [1, 0]
    assert packed[1].tolist() == [-(2**31), 0]
    assert packed[2].tolist() == [0, 1]
    assert packed[3].tolist() == [0, 1 << 7]
    assert packed[4].tolist() == [-1, (1 << 8) - 1]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_mask_gives_the_same_result(backend):
    q, k, v, tree_mask, kv_start = case_inputs((37, 100, 4, 2, 64, FP32, "tree"), seed=11)
    dense = tree_attention(q, k, v, tree_mask, kv_start=kv_start, backend=backend)
    packed = pack_tree_mask(tree_mask)
    assert torch.equal(tree_attention(q, k, v, packed, kv_start=kv_start, backend=backend), dense)
    # A shared tree: bool [Q, Q], packed [1, Q, W] and packed [Q, W] all mean the same.
    shared = tree_attention(q, k, v, tree_mask[1], kv_start=kv_start, backend=backend)
    for packed_shared in (pack_tree_mask(tree_mask[1]), pack_tree_mask(tree_mask[1])[0]):
        assert torch.equal(tree_attention(q, k, v, packed_shared, kv_start=kv_start, backend=backend), shared)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def test_default_backend_on_cpu(monkeypatch):
    """Under the interpreter (as in these tests) CPU tensors go to triton, unless the head dim is
    one the kernel does not take; then the reference runs."""
    from crossspec_kernels.ops._dispatch import triton_interpreting

    q, k, v = make_qkv(1, 2, 2, 3, 10, 64, FP32)
    calls = []
    real_reference = reference.tree_attention
    monkeypatch.setattr(
        reference, "tree_attention", lambda *a, **kw: calls.append(1) or real_reference(*a, **kw)
    )
    tree_attention(q, k, v)
    assert calls == ([] if triton_interpreting() else [1])
    q, k, v = make_qkv(1, 2, 2, 3, 10, 48, FP32)
    tree_attention(q, k, v)
    assert calls[-1:] == [1]


# ----------------------------------------------------------------------------------------------
# Bad inputs -> named errors
# ----------------------------------------------------------------------------------------------


def _good():
    q, k, v = make_qkv(2, 4, 2, 5, 12, 64, FP32)
    return dict(q=q, k=k, v=v)


def _call(**changes):
    args = _good()
    args.update(changes)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return tree_attention(q, k, v, **args)


BAD_INPUTS = [
    (
        "q 3-D",
        dict(q=torch.randn(4, 5, 64)),
        ValueError,
        r"q must be 4-D \[B, Hq, Q, D\], got shape \(4, 5, 64\)",
    ),
    ("k 5-D", dict(k=torch.randn(2, 2, 12, 64, 1)), ValueError, r"k must be 4-D"),
    ("k v shapes", dict(v=torch.randn(2, 2, 13, 64)), ValueError, r"k and v must have the same shape"),
    ("batch", dict(k=torch.randn(3, 2, 12, 64), v=torch.randn(3, 2, 12, 64)), ValueError, r"batch 3 but q"),
    ("head dim", dict(q=torch.randn(2, 4, 5, 32)), ValueError, r"head dim 64 but q has head dim 32"),
    ("gqa", dict(q=torch.randn(2, 3, 5, 64)), ValueError, r"Hq = 3 must be a positive multiple of kv heads"),
    (
        "Q too big",
        dict(q=torch.randn(2, 4, 129, 64)),
        ValueError,
        r"Q \(tree nodes\) must be in \[1, 128\], got 129",
    ),
    ("L < Q", dict(q=torch.randn(2, 4, 13, 64)), ValueError, r"L = 12 must be >= Q = 13"),
    (
        "int dtype",
        dict(q=torch.ones(2, 4, 5, 64, dtype=torch.int32)),
        ValueError,
        r"q must be fp16, bf16 or fp32",
    ),
    ("dtype mix", dict(k=torch.randn(2, 2, 12, 64, dtype=FP16)), ValueError, r"share a dtype"),
    ("device mix", dict(k=torch.randn(2, 2, 12, 64, device="meta")), ValueError, r"one device"),
    ("stride", dict(v=torch.randn(2, 2, 64, 12).transpose(-1, -2)), ValueError, r"v must have a unit-stride"),
    ("not a tensor", dict(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
    (
        "mask shape",
        dict(tree_mask=torch.ones(5, 4, dtype=torch.bool)),
        ValueError,
        r"bool tree_mask must be \[Q, Q\]",
    ),
    ("mask batch", dict(tree_mask=torch.ones(3, 5, 5, dtype=torch.bool)), ValueError, r"bool tree_mask"),
    ("mask dtype", dict(tree_mask=torch.ones(5, 5)), ValueError, r"must be bool \(dense\) or int32"),
    (
        "packed shape",
        dict(tree_mask=torch.ones(5, 2, dtype=torch.int32)),
        ValueError,
        r"packed \(int32\) tree_mask",
    ),
    ("packed batch", dict(tree_mask=torch.ones(3, 5, 1, dtype=torch.int32)), ValueError, r"packed \(int32\)"),
    (
        "kv_start shape",
        dict(kv_start=torch.zeros(3, dtype=torch.int64)),
        ValueError,
        r"kv_start must be a \[B\] = \[2\]",
    ),
    ("kv_start dtype", dict(kv_start=torch.zeros(2)), ValueError, r"kv_start must be an integer tensor"),
    (
        "kv_start range",
        dict(kv_start=torch.tensor([0, 8])),
        ValueError,
        r"\[0, L - Q\] = \[0, 7\], got \[0, 8\]",
    ),
    (
        "kv_start negative",
        dict(kv_start=-1),
        ValueError,
        r"kv_start must be in \[0, L - Q\] = \[0, 7\], got -1",
    ),
    ("kv_start type", dict(kv_start=1.5), TypeError, r"kv_start must be an int"),
    ("kv_end shape", dict(kv_end=torch.full((3,), 12)), ValueError, r"kv_end must be a \[B\] = \[2\]"),
    ("kv_end dtype", dict(kv_end=torch.full((2,), 12.0)), ValueError, r"kv_end must be an integer tensor"),
    ("kv_end device", dict(kv_end=torch.full((2,), 12, device="meta")), ValueError, r"kv_end is on meta"),
    (
        "kv_end below Q",
        dict(kv_end=torch.tensor([12, 4])),
        ValueError,
        r"kv_end values must be in \[Q, L\] = \[5, 12\], got \[12, 4\]",
    ),
    ("kv_end past L", dict(kv_end=13), ValueError, r"kv_end must be in \[Q, L\] = \[5, 12\], got 13"),
    ("kv_end type", dict(kv_end=12.0), TypeError, r"kv_end must be an int, a \[B\] tensor or None"),
    (
        "kv_start past kv_end - Q",
        dict(kv_start=torch.tensor([0, 3]), kv_end=torch.tensor([12, 7])),
        ValueError,
        r"kv_start must be <= kv_end - Q in every row .* got kv_start \[0, 3\] and kv_end \[12, 7\]",
    ),
    ("scale", dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ("backend cuda", dict(backend="cuda"), ValueError, r"no 'cuda' \(C\+\+\) backend"),
    ("backend name", dict(backend="flash"), ValueError, r"backend must be 'triton', 'reference' or None"),
    (
        "triton head dim",
        dict(
            q=torch.randn(2, 4, 5, 48),
            k=torch.randn(2, 2, 12, 48),
            v=torch.randn(2, 2, 12, 48),
            backend="triton",
        ),
        ValueError,
        r"supports head dims \(64, 80, 96, 128\), got D = 48",
    ),
]


@pytest.mark.parametrize("changes,error,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_pack_tree_mask_bad_inputs():
    with pytest.raises(ValueError, match=r"pack_tree_mask: tree_mask must be bool"):
        pack_tree_mask(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"\[Q, Q\] or \[B, Q, Q\], got shape \(4, 5\)"):
        pack_tree_mask(torch.ones(4, 5, dtype=torch.bool))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(ops_tree_attention, "triton_interpreting", lambda: False)
    monkeypatch.setattr("crossspec_kernels.ops._dispatch.triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"needs TRITON_INTERPRET=1"):
        _call(backend="triton")


# ----------------------------------------------------------------------------------------------
# Split heuristic (host arithmetic only)
# ----------------------------------------------------------------------------------------------


def test_split_heuristic():
    from crossspec_kernels.triton.tree_attention import choose_num_splits, split_length

    h100 = 132
    # Batch 1, Vicuna-7B (32 kv heads), long cache: split until every SM has work.
    splits = choose_num_splits(1, 32, 64, 4096, 128, 2, h100, block_m=64)
    assert 32 * splits >= h100 and splits <= 8
    # Enough (batch, head) groups to fill the GPU already: no split, no merge.
    assert choose_num_splits(8, 32, 16, 4096, 128, 2, h100, block_m=16) == 1
    # Short caches are never cut below a few tiles per split.
    assert choose_num_splits(1, 8, 4, 300, 128, 2, h100, block_m=16) == 1
    # GQA 32/8 with a 64-node tree: 256 query rows share a kv head, partial outputs are expensive,
    # but at 16K positions eight programs cannot stream the cache alone.
    assert 1 < choose_num_splits(1, 8, 256, 16384, 128, 2, h100) < 16
    for kv_len in (1, 63, 64, 65, 1031, 16384):
        for splits in (1, 2, 7, 64):
            for block_n in (32, 64):
                length = split_length(kv_len, splits, block_n)
                assert length % block_n == 0 and length * splits >= kv_len


def test_launch_plan_fits_the_kernel():
    from crossspec_kernels.triton.tree_attention import launch_plan

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for q_heads, kv_heads, num_queries in ((32, 32, 1), (32, 8, 64), (8, 8, 128), (40, 8, 37)):
            q = torch.empty(1, q_heads, num_queries, 128, dtype=dtype)
            k = torch.empty(1, kv_heads, 5000, 128, dtype=dtype)
            plan = launch_plan(q, k)
            rows = q_heads // kv_heads * num_queries
            assert plan.block_m >= 16 and plan.block_m * plan.num_row_blocks >= rows
            assert plan.split_len % plan.block_n == 0 and plan.num_splits * plan.split_len >= 5000
            assert (plan.num_splits - 1) * plan.split_len < 5000  # no split is empty by construction
            assert launch_plan(q, k, num_splits=10**6).num_splits <= -(-5000 // plan.block_n)


# ----------------------------------------------------------------------------------------------
# GPU: real shapes, bf16, CUDA graphs
# ----------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, Hq, Hkv, Q, L, D, dtype
    (1, 32, 32, 64, 2048, 128, torch.bfloat16),
    (1, 32, 32, 1, 16384, 128, torch.bfloat16),
    (4, 32, 32, 16, 4096, 128, torch.bfloat16),
    (1, 32, 8, 64, 16384, 128, torch.bfloat16),
    (4, 32, 8, 32, 4096, 128, torch.bfloat16),
    (2, 32, 8, 128, 3000, 128, torch.bfloat16),
    (3, 16, 16, 37, 1031, 80, torch.float16),
    (2, 12, 4, 7, 2000, 96, torch.float16),
    (2, 8, 2, 33, 999, 64, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,q_heads,kv_heads,num_queries,kv_len,head_dim,dtype", GPU_CASES)
def test_gpu_triton_matches_reference(batch, q_heads, kv_heads, num_queries, kv_len, head_dim, dtype):
    q, k, v = make_qkv(batch, q_heads, kv_heads, num_queries, kv_len, head_dim, dtype, device="cuda")
    tree_mask = random_tree_masks(batch, num_queries, seed=2).cuda()
    kv_start = spread_kv_start(batch, num_queries, kv_len, "cuda")
    out = tree_attention(q, k, v, pack_tree_mask(tree_mask), kv_start=kv_start)  # default: triton
    assert_close_to_spec(out, q, k, v, tree_mask, kv_start)
    out = tree_attention(q, k, v, None, backend="triton")
    assert_close_to_spec(out, q, k, v, None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3, 40])
def test_gpu_forced_splits(num_splits):
    from crossspec_kernels.triton.tree_attention import tree_attention as launch

    q, k, v = make_qkv(2, 32, 8, 64, 5000, 128, torch.bfloat16, device="cuda")
    tree_mask = random_tree_masks(2, 64, seed=4).cuda()
    kv_start = torch.tensor([0, 1234], device="cuda")
    out = launch(q, k, v, pack_tree_mask(tree_mask), kv_start, 128**-0.5, num_splits=num_splits)
    assert_close_to_spec(out, q, k, v, tree_mask, kv_start)


@pytest.mark.gpu
def test_gpu_large_offsets():
    """Cache tensors past 2**31 elements: the last head's offsets overflow int32."""
    batch, kv_heads, kv_len, head_dim = 1, 8, (1 << 21) + 64, 128
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GiB of GPU memory")
    k = torch.zeros(batch, kv_heads, kv_len, head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    v[:, :, -8:] = 1.0  # only the tree tail carries values, at the far end of the buffer
    v[:, :-1, -8:] = 2.0  # ... and only the last head's are ones
    q = torch.randn(batch, 8, 8, head_dim, dtype=torch.bfloat16, device="cuda")
    kv_start = torch.tensor([kv_len - 8], device="cuda")  # everything before the tree is padding
    assert k[0, -1, -1].data_ptr() - k.data_ptr() > 2**31 * k.element_size()
    out = tree_attention(q, k, v, None, kv_start=kv_start).float()
    torch.testing.assert_close(out[:, -1], torch.ones_like(out[:, -1]))
    torch.testing.assert_close(out[:, :-1], torch.full_like(out[:, :-1], 2.0))


@pytest.mark.gpu
def test_gpu_is_graph_capturable():
    batch, q_heads, kv_heads, num_queries, kv_len, head_dim = 2, 32, 8, 32, 4096, 128
    q, k, v = make_qkv(batch, q_heads, kv_heads, num_queries, kv_len, head_dim, torch.bfloat16, device="cuda")
    tree_mask = random_tree_masks(batch, num_queries, seed=6).cuda()
    packed = pack_tree_mask(tree_mask)
    kv_start = torch.tensor([0, 100], device="cuda")
    tree_attention(q, k, v, packed, kv_start=kv_start)  # warm up: compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed_in_graph = pack_tree_mask(tree_mask)
        captured = tree_attention(q, k, v, packed_in_graph, kv_start=kv_start)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        kv_start.copy_(torch.tensor([step * 7, 100 + step], device="cuda"))
        tree_mask.copy_(random_tree_masks(batch, num_queries, seed=20 + step).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_spec(captured, q, k, v, tree_mask, kv_start)


# ----------------------------------------------------------------------------------------------
# torch.compile: through the crossspec::tree_attention custom op
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiles_with_fullgraph(backend):
    """No value is read and nothing is traced into while compiling: fullgraph=True holds."""
    torch._dynamo.reset()
    q, k, v, tree_mask, _ = case_inputs((7, 60, 4, 2, 64, FP32, "tree"), seed=10)
    args = (q, k, v, pack_tree_mask(tree_mask), torch.tensor([0, 3, 0]), torch.tensor([60, 40, 7]))

    def attend(q, k, v, packed, kv_start, kv_end):
        out = tree_attention(q, k, v, packed, kv_start=kv_start, kv_end=kv_end, scale=0.2, backend=backend)
        return out * 2

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), attend(*args))


def test_custom_op_passes_opcheck():
    q, k, v, tree_mask, _ = case_inputs((7, 60, 4, 2, 64, FP32, "tree"), seed=12)
    kv_start, kv_end = torch.tensor([0, 3, 0]), torch.tensor([60, 40, 7])
    for mask in (pack_tree_mask(tree_mask), None):
        torch.library.opcheck(
            torch.ops.crossspec.tree_attention.default, (q, k, v, mask, kv_start, kv_end, 0.2, "reference")
        )


# ----------------------------------------------------------------------------------------------
# Non-finite inputs: one semantics on every backend
# ----------------------------------------------------------------------------------------------


def _poison(case: str, q, k, v):
    """Row 0 has 2 padding slots; its query 1 (a chain: causal) sees slots 2..L-Q+1."""
    if case == "query":
        q[0, 0, 1] = float("nan")  # only query 1 of head 0 is NaN
    elif case == "visible_key":
        k[0, 0, 3] = float("nan")  # a prefix slot every query of row 0 sees
    elif case == "hidden_value":
        v[0, 0, 0] = float("nan")  # a left-padding slot nobody sees
    elif case == "future_node_value":
        v[0, 0, -1] = float("inf")  # the last node: only the last query sees it
    return q, k, v


NAN_CASES = ["query", "visible_key", "hidden_value", "future_node_value"]


@pytest.mark.parametrize("case", NAN_CASES)
def test_reference_non_finite_semantics(case):
    q, k, v = make_qkv(2, 2, 1, 3, 8, 8, torch.float32, seed=5)
    q, k, v = _poison(case, q, k, v)
    out = reference.tree_attention(q, k, v, kv_start=torch.tensor([2, 0]))
    nan = out.isnan().any(-1)  # [B, Hq, Q]
    want = torch.zeros_like(nan)
    if case == "query":
        want[0, 0, 1] = True
    elif case == "visible_key":
        want[0, :, :] = True  # both heads read kv head 0
    elif case == "future_node_value":
        want[0, :, 2] = True
    assert torch.equal(nan, want), (case, nan)
    assert torch.isfinite(out[~nan]).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("case", NAN_CASES)
def test_triton_non_finite_semantics_match_the_reference(case):
    q, k, v = make_qkv(2, 2, 1, 3, 8, 64, torch.float32, seed=5)
    q, k, v = _poison(case, q, k, v)
    kv_start = torch.tensor([2, 0])
    want = reference.tree_attention(q, k, v, kv_start=kv_start)
    got = tree_attention(q, k, v, kv_start=kv_start, backend="triton")
    assert torch.equal(got.isnan(), want.isnan()), case
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=FP32_ATOL, rtol=1e-5)
