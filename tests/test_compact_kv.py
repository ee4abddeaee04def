"""crossspec_kernels.compact_kv: triton vs the reference, in-place overlap, HF caches end to end, bad inputs."""

from __future__ import annotations

import types

import pytest
import torch

from crossspec_kernels import reference
from crossspec_kernels.ops.compact_kv import compact_kv
from crossspec_kernels.testing import ancestor_mask

# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def random_path(counts: list[int], num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    """[B, N] increasing accepted node ids, -1 padded: the shape of verify().path."""
    path = torch.full((len(counts), num_nodes), -1, dtype=torch.int64)
    for row, count in enumerate(counts):
        path[row, :count] = torch.randperm(num_nodes, generator=generator)[:count].sort().values
    return path


def strided_caches(batch, heads, kv_len, head_dim, dtype, generator):
    """Buffers and [B, H, L, D] views of them in the layouts HF caches and engines produce.

    Returns (buffers, make_views): make_views(buffers) rebuilds the same views over other buffers,
    so the reference and the kernel can run on identical copies and the whole buffers (including
    memory around the views) can be compared.
    """
    shape = (batch, heads, kv_len, head_dim)

    def randn(*size):
        return torch.randn(*size, generator=generator).to(dtype)

    buffers = [
        randn(*shape),  # contiguous
        randn(*shape),
        randn(batch, kv_len, heads, head_dim),  # [B, L, H, D] transposed: HF's projection layout
        randn(batch, heads, kv_len + 5, head_dim + 16),  # a window of a larger preallocated cache
        randn(2, *shape),  # keys and values of one layer in one allocation
        randn(batch * heads * kv_len * head_dim + 1),  # misaligned by one element: scalar loads
    ]

    def make_views(bufs):
        return [
            bufs[0],
            bufs[1],
            bufs[2].transpose(1, 2),
            bufs[3][:, :, 2 : 2 + kv_len, 8 : 8 + head_dim],
            bufs[4][0],
            bufs[4][1],
            bufs[5][1:].view(shape),
        ]

    return buffers, make_views


def run_both(buffers, make_views, path, num_accepted, tree_start, **kwargs):
    expected = [b.clone() for b in buffers]
    reference.compact_kv(make_views(expected), path, num_accepted, tree_start)
    got = [b.clone() for b in buffers]
    compact_kv(make_views(got), path, num_accepted, tree_start, **kwargs)
    return got, expected


def assert_buffers_equal(got, expected):
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g, e), f"buffer {index} differs at {(g != e).nonzero()[:5].tolist()}"


# ----------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_triton_matches_reference(dtype, heads, head_dim):
    generator = torch.Generator().manual_seed(heads * 1000 + head_dim)
    batch, num_nodes, kv_len = 3, 7, 29
    buffers, make_views = strided_caches(batch, heads, kv_len, head_dim, dtype, generator)
    counts = [0, num_nodes, 3]  # nothing accepted, everything accepted, a partial path
    path = random_path(counts, num_nodes, generator)
    path[2, :3] = torch.tensor([1, 2, 5])  # a path that overlaps its own destinations
    tree_start = torch.tensor([2, 0, kv_len - 1 - num_nodes])  # incl. the last legal start
    got, expected = run_both(buffers, make_views, path, torch.tensor(counts), tree_start, backend="triton")
    assert_buffers_equal(got, expected)
    # The views moved something (a test that compares two no-ops proves nothing).
    assert not torch.equal(got[0], buffers[0])


@pytest.mark.parametrize("block_n", [1, 2, 4])
def test_chunks_cross_overlapping_paths(block_n):
    """Paths longer than one chunk, whose sources are other rows' destinations."""
    from crossspec_kernels.triton.compact_kv import compact_kv as triton_compact_kv

    generator = torch.Generator().manual_seed(block_n)
    batch, heads, kv_len, head_dim = 4, 2, 23, 16  # N = 9 nodes
    caches = [torch.randn(batch, heads, kv_len, head_dim, generator=generator) for _ in range(3)]
    path = torch.tensor(
        [
            [1, 2, 3, 4, 5, 6, 7, 8, -1],  # every source is the next row's destination
            [0, 1, 2, 5, 6, 7, 8, -1, -1],  # in place at first, then shifted
            [2, 4, 6, 8, -1, -1, -1, -1, -1],
            [0, 1, 2, 3, 4, 5, 6, 7, 8],  # a fully accepted chain: nothing moves
        ]
    )
    num_accepted = torch.tensor([8, 7, 4, 9])
    tree_start = torch.tensor([0, 5, 13, 3])
    expected = [c.clone() for c in caches]
    reference.compact_kv(expected, path, num_accepted, tree_start)
    triton_compact_kv(caches, path, num_accepted, tree_start, block_n=block_n)
    assert_buffers_equal(caches, expected)


def test_head_dim_over_one_block():
    """D = 320 runs as a 256-wide block and a masked 64-wide one."""
    generator = torch.Generator().manual_seed(6)
    caches = [torch.randn(2, 1, 9, 320, generator=generator) for _ in range(2)]
    path, num_accepted = torch.tensor([[1, 2, 4, -1, -1], [3, -1, -1, -1, -1]]), torch.tensor([3, 1])
    expected = [c.clone() for c in caches]
    reference.compact_kv(expected, path, num_accepted, torch.tensor([3, 1]))
    compact_kv(caches, path, num_accepted, torch.tensor([3, 1]), backend="triton")
    assert_buffers_equal(caches, expected)


class CountingLaunches:
    """Stands in for the Triton kernel and counts launches (grid[2] = tensors per launch)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_launch_per_group_of_alike_tensors(monkeypatch):
    from crossspec_kernels.triton import compact_kv as triton_module

    counter = CountingLaunches(triton_module._compact_kv_kernel)
    monkeypatch.setattr(triton_module, "_compact_kv_kernel", counter)
    generator = torch.Generator().manual_seed(9)
    buffers, make_views = strided_caches(2, 2, 11, 16, torch.float32, generator)
    path, num_accepted = torch.tensor([[0, 2, -1], [1, -1, -1]]), torch.tensor([2, 1])
    got, expected = run_both(buffers, make_views, path, num_accepted, 3, backend="triton")
    assert_buffers_equal(got, expected)
    # contiguous and aligned (4 tensors), contiguous but misaligned, transposed, windowed
    assert sorted(grid[2] for grid in counter.grids) == [1, 1, 1, 4]
    assert all(grid[:2] == (2, 2) for grid in counter.grids)  # (heads, rows)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_overlapping_path_by_hand(backend):
    """path = [1, 2]: node 1 moves to slot 0 while node 2, which moves to slot 1, sits in slot 2.

    Written out by hand, so this also checks the reference."""
    tree_start = 3
    cache = torch.arange(10, dtype=torch.float32).repeat_interleave(4).view(1, 1, 10, 4).clone()
    compact_kv(
        [cache], torch.tensor([[1, 2, -1, -1]]), torch.tensor([2]), tree_start, backend=backend, crop=False
    )
    # Root at 3; nodes 0..3 at 4..7. Slot 4 <- node 1 (pos 5), slot 5 <- node 2 (pos 6).
    assert cache[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 6, 6, 7, 8, 9]


def test_rejected_slots_do_not_reach_the_committed_rows():
    """Rejected slots hold NaN: the committed rows must come from accepted slots only."""
    cache = torch.randn(2, 3, 12, 8)
    tree_start, path = 2, torch.tensor([[1, 3, -1, -1, -1], [-1] * 5])
    num_accepted = torch.tensor([2, 0])
    for node in (0, 2, 4):
        cache[0, :, tree_start + 1 + node] = float("nan")
    cache[1, :, tree_start + 1 :] = float("nan")
    accepted = cache[0, :, [tree_start + 2, tree_start + 4]].clone()
    compact_kv([cache], path, num_accepted, tree_start, backend="triton")
    assert torch.equal(cache[0, :, tree_start + 1 : tree_start + 3], accepted)
    assert not cache[:, :, : tree_start + 1].isnan().any()


def test_default_backend_under_the_interpreter_is_triton(monkeypatch):
    from crossspec_kernels.triton import compact_kv as triton_module

    calls = []
    original = triton_module.compact_kv
    monkeypatch.setattr(triton_module, "compact_kv", lambda *a, **k: calls.append(1) or original(*a, **k))
    cache = torch.randn(1, 1, 6, 4)
    compact_kv([cache], torch.tensor([[1, -1]]), torch.tensor([1]), 0)
    assert calls == [1]
    # bf16 on CPU: the interpreter mishandles it, so the default is the reference.
    bf16 = torch.randn(1, 1, 6, 4).bfloat16()
    expected = bf16.clone()
    reference.compact_kv([expected], torch.tensor([[1, -1]]), torch.tensor([1]), 0)
    compact_kv([bf16], torch.tensor([[1, -1]]), torch.tensor([1]), 0)
    assert calls == [1] and torch.equal(bf16, expected)


def test_int32_inputs_and_scalar_tensor_tree_start():
    generator = torch.Generator().manual_seed(3)
    caches = [torch.randn(2, 2, 10, 8, generator=generator) for _ in range(2)]
    path, num_accepted = torch.tensor([[0, 2, 3, -1], [1, -1, -1, -1]]), torch.tensor([3, 1])
    expected = [c.clone() for c in caches]
    reference.compact_kv(expected, path, num_accepted, 4)
    compact_kv(caches, path.int(), num_accepted.int(), torch.tensor(4, dtype=torch.int32), backend="triton")
    assert_buffers_equal(caches, expected)


def test_nothing_to_do():
    cache = torch.randn(2, 2, 5, 4)
    before = cache.clone()
    compact_kv([cache], torch.empty(2, 0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 4)
    compact_kv([cache], torch.full((2, 3), -1), torch.zeros(2, dtype=torch.int64), 1)
    assert torch.equal(cache, before)


# ----------------------------------------------------------------------------------------------
# Hugging Face caches, end to end on a tiny Llama
# ----------------------------------------------------------------------------------------------

# parents of the draft tree; node 0 -> 2 -> 4 is a root-to-leaf path, nodes 1, 3, 5 are side branches.
PARENTS = [-1, -1, 0, 1, 2, 0]


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers, transformers.LlamaForCausalLM(config).eval()


def depths(parents):
    depth = []
    for parent in parents:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    return depth


def ancestors_or_self(parents):
    """[N+1, N+1] bool over (root, nodes): slot i may attend slot j."""
    return ancestor_mask(torch.tensor([-1] + [parent + 1 for parent in parents]))


def verification_forward(model, cache, root, drafts, tree_start, kv_len):
    """The target's tree forward: root + N draft nodes at tree_start.., tree-masked, positions by depth.

    kv_len: the key length the model attends over (cache length + N + 1; a static cache's size)."""
    batch, num_nodes = drafts.shape
    tree = ancestors_or_self(PARENTS)
    allowed = torch.zeros(batch, 1, num_nodes + 1, kv_len, dtype=torch.bool)
    allowed[..., :tree_start] = True
    allowed[..., tree_start : tree_start + num_nodes + 1] = tree
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    positions = tree_start + torch.tensor([0] + [d + 1 for d in depths(PARENTS)])
    with torch.no_grad():
        model(
            torch.cat([root, drafts], dim=1),
            past_key_values=cache,
            attention_mask=mask,
            position_ids=positions.expand(batch, -1),
            cache_position=torch.arange(tree_start, tree_start + num_nodes + 1),
            use_cache=True,
        )


def last_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits[:, -1]


def cache_tensors(cache):
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dynamic_cache_end_to_end(tiny_llama, backend, monkeypatch):
    transformers, model = tiny_llama
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 97, (1, 11), generator=generator)
    root = torch.randint(0, 97, (1, 1), generator=generator)
    drafts = torch.randint(0, 97, (1, len(PARENTS)), generator=generator)
    tree_start = prefix.shape[1]

    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(prefix, past_key_values=cache, use_cache=True)
    verification_forward(model, cache, root, drafts, tree_start, tree_start + len(PARENTS) + 1)
    before = [t.clone() for t in cache_tensors(cache)]

    path, num_accepted = torch.tensor([[0, 2, 4, -1, -1, -1]]), torch.tensor([3])
    committed = torch.cat([prefix, root, drafts[:, [0, 2, 4]]], dim=1)
    from crossspec_kernels.triton import compact_kv as triton_module

    counter = CountingLaunches(triton_module._compact_kv_kernel)
    monkeypatch.setattr(triton_module, "_compact_kv_kernel", counter)
    compact_kv(cache, path, num_accepted, tree_start, backend=backend)
    # All 3 layers' keys and values in one launch (the reference launches nothing).
    assert [grid[2] for grid in counter.grids] == ([6] if backend == "triton" else [])

    # The cache is the reference's result, cropped to the committed length ...
    assert cache.get_seq_length() == committed.shape[1]
    reference.compact_kv(before, path, num_accepted, tree_start)
    for got, expected in zip(cache_tensors(cache), before, strict=True):
        assert torch.equal(got, expected[:, :, : committed.shape[1]])
    # ... equals the cache of a plain forward over the committed tokens ...
    fresh = transformers.DynamicCache()
    with torch.no_grad():
        model(committed, past_key_values=fresh, use_cache=True)
    for got, expected in zip(cache_tensors(cache), cache_tensors(fresh), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # ... and decoding continues exactly as from scratch.
    bonus = torch.tensor([[5]])
    continued = last_logits(model, bonus, past_key_values=cache)
    from_scratch = last_logits(model, torch.cat([committed, bonus], dim=1))
    torch.testing.assert_close(continued, from_scratch, rtol=1e-4, atol=1e-4)


def test_dynamic_cache_without_compaction_diverges(tiny_llama):
    """Control for the test above: cropping alone (rejected slots left in place) changes the logits."""
    transformers, model = tiny_llama
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 97, (1, 11), generator=generator)
    root = torch.randint(0, 97, (1, 1), generator=generator)
    drafts = torch.randint(0, 97, (1, len(PARENTS)), generator=generator)
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(prefix, past_key_values=cache, use_cache=True)
    verification_forward(model, cache, root, drafts, 11, 11 + len(PARENTS) + 1)
    cache.crop(-(len(PARENTS) - 3))
    committed = torch.cat([prefix, root, drafts[:, [0, 2, 4]]], dim=1)
    bonus = torch.tensor([[5]])
    stale = last_logits(model, bonus, past_key_values=cache)
    assert (stale - last_logits(model, torch.cat([committed, bonus], dim=1))).abs().max() > 1e-3


def test_ragged_batch_is_not_cropped_and_masks_continue_it(tiny_llama):
    """Rows accept different counts: the cache keeps length L, and the caller masks each row's tail."""
    transformers, model = tiny_llama
    generator = torch.Generator().manual_seed(2)
    batch, tree_start, num_nodes = 2, 9, len(PARENTS)
    prefix = torch.randint(0, 97, (batch, tree_start), generator=generator)
    root = torch.randint(0, 97, (batch, 1), generator=generator)
    drafts = torch.randint(0, 97, (batch, num_nodes), generator=generator)
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(prefix, past_key_values=cache, use_cache=True)
    verification_forward(model, cache, root, drafts, tree_start, tree_start + num_nodes + 1)
    kv_len = tree_start + 1 + num_nodes

    path = torch.tensor([[0, 2, 4, -1, -1, -1], [1, 3, -1, -1, -1, -1]])
    num_accepted = torch.tensor([3, 2])
    compact_kv(cache, path, num_accepted, tree_start, backend="triton")
    assert cache.get_seq_length() == kv_len  # ragged: not cropped

    committed_len = tree_start + 1 + num_accepted  # [B]
    bonus = torch.tensor([[5], [7]])
    attention_mask = torch.ones(batch, kv_len + 1, dtype=torch.long)
    for row in range(batch):
        attention_mask[row, int(committed_len[row]) : kv_len] = 0  # the stale tail of each row
    continued = last_logits(
        model,
        bonus,
        past_key_values=cache,
        attention_mask=attention_mask,
        position_ids=committed_len[:, None],
    )
    for row in range(batch):
        committed = torch.cat([prefix[row], root[row], drafts[row, path[row, : num_accepted[row]]]])
        from_scratch = last_logits(model, torch.cat([committed, bonus[row]])[None])
        torch.testing.assert_close(continued[row : row + 1], from_scratch, rtol=1e-4, atol=1e-4)


def test_static_cache_end_to_end(tiny_llama):
    """transformers 5.x StaticCache: tensors compacted in place, the length counter set."""
    transformers, model = tiny_llama
    if not hasattr(
        transformers.StaticCache(config=model.config, max_cache_len=8).layers[0], "cumulative_length"
    ):
        pytest.skip("StaticLayer without cumulative_length (transformers < 5)")
    generator = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 97, (1, 10), generator=generator)
    root = torch.randint(0, 97, (1, 1), generator=generator)
    drafts = torch.randint(0, 97, (1, len(PARENTS)), generator=generator)
    max_len = 32
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        model(prefix, past_key_values=cache, use_cache=True)
    verification_forward(model, cache, root, drafts, 10, max_len)
    keys = cache.layers[0].keys
    compact_kv(cache, torch.tensor([[0, 2, -1, -1, -1, -1]]), torch.tensor([2]), 10, backend="triton")
    assert cache.layers[0].keys is keys  # same buffers, moved in place
    assert int(cache.get_seq_length()) == 13
    committed = torch.cat([prefix, root, drafts[:, [0, 2]]], dim=1)
    bonus = torch.tensor([[5]])
    continued = last_logits(model, bonus, past_key_values=cache)
    from_scratch = last_logits(model, torch.cat([committed, bonus], dim=1))
    torch.testing.assert_close(continued, from_scratch, rtol=1e-4, atol=1e-4)


def test_crop_false_keeps_the_length(tiny_llama):
    transformers, model = tiny_llama
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)), past_key_values=cache, use_cache=True)
    compact_kv(cache, torch.tensor([[1, -1, -1]]), torch.tensor([1]), 2, crop=False)
    assert cache.get_seq_length() == 8
    compact_kv(cache, torch.tensor([[1, -1, -1]]), torch.tensor([1]), 2)
    assert cache.get_seq_length() == 4


def test_legacy_key_cache_lists():
    """transformers < 4.56 keeps key_cache/value_cache lists and crops by cache.crop()."""
    generator = torch.Generator().manual_seed(5)
    keys = [torch.randn(1, 2, 9, 8, generator=generator) for _ in range(2)]
    values = [torch.randn(1, 2, 9, 8, generator=generator) for _ in range(2)]
    crops = []
    legacy = types.SimpleNamespace(key_cache=keys, value_cache=values, crop=crops.append)
    expected = [t.clone() for t in keys + values]
    path, num_accepted = torch.tensor([[1, 3, -1, -1]]), torch.tensor([2])
    reference.compact_kv(expected, path, num_accepted, 2)
    compact_kv(legacy, path, num_accepted, 2, backend="triton")
    assert_buffers_equal(keys + values, expected)
    assert crops == [5 - 9]  # remove the 4 positions past the committed length 5


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def _good():
    return dict(
        caches=[torch.randn(3, 2, 12, 8) for _ in range(4)],
        path=torch.tensor([[0, 2, -1, -1], [1, 2, 3, -1], [-1, -1, -1, -1]]),
        num_accepted=torch.tensor([2, 3, 0]),
        tree_start=3,
    )


def _caches(*tensors):
    return [*tensors, torch.randn(3, 2, 12, 8)]


_BUFFER = torch.randn(3, 2, 14, 8)

BAD_INPUTS = [
    (dict(caches=torch.randn(3, 2, 12, 8)), {}, TypeError, "got a single tensor"),
    (dict(caches=_caches("k")), {}, TypeError, "caches\\[0\\] must be a torch.Tensor"),
    (dict(caches=42), {}, TypeError, "or a Hugging Face cache"),
    (dict(caches=[]), {}, ValueError, "caches is empty"),
    (dict(caches=_caches(torch.randn(3, 12, 8))), {}, ValueError, "caches\\[0\\] must be 4-D"),
    (dict(caches=[torch.zeros(3, 2, 12, 8, dtype=torch.int8)]), {}, ValueError, "must be fp32, fp16 or bf16"),
    (
        dict(caches=[torch.randn(3, 2, 12, 8), torch.randn(3, 2, 12, 8).half()]),
        {},
        ValueError,
        "caches\\[1\\] is torch.float16 but caches\\[0\\] is torch.float32",
    ),
    (dict(caches=_caches(torch.randn(2, 2, 12, 8))), {}, ValueError, "has batch 2 but path has batch 3"),
    (dict(caches=_caches(torch.randn(3, 2, 12, 8, device="meta"))), {}, ValueError, "is on meta"),
    (
        dict(caches=_caches(torch.randn(3, 2, 8, 12).transpose(2, 3))),
        {},
        ValueError,
        "unit-stride last dim",
    ),
    (dict(caches=_caches(torch.randn(3, 2, 4, 8))), {}, ValueError, "L = 4 positions, too few"),
    (dict(caches=_caches(torch.randn(3, 2, 6, 8))), {}, ValueError, "tree_start = 3 out of range.*L = 6"),
    (dict(caches=[torch.randn(3, 2, 12, 8)] * 2), {}, ValueError, r"caches\[0\] and caches\[1\] overlap"),
    (
        # Two views of one buffer that share rows (overlapping, different start addresses).
        dict(caches=[_BUFFER[:, :, :12], _BUFFER[:, :, 2:]]),
        {},
        ValueError,
        "overlap in memory",
    ),
    (dict(path=torch.tensor([0, 2, -1, -1])), {}, ValueError, "path must be 2-D"),
    (dict(path=torch.zeros(3, 4)), {}, ValueError, "path must be int64 or int32"),
    (dict(path=[[0, 2]]), {}, TypeError, "path must be a torch.Tensor"),
    (
        dict(num_accepted=torch.tensor([2, 3])),
        {},
        ValueError,
        "num_accepted must have shape \\[B\\] = \\[3\\]",
    ),
    (dict(num_accepted=torch.tensor([2.0, 3, 0])), {}, ValueError, "num_accepted must be int64 or int32"),
    (
        dict(num_accepted=torch.zeros(3, dtype=torch.int64, device="meta")),
        {},
        ValueError,
        "num_accepted is on",
    ),
    (
        dict(num_accepted=torch.tensor([2, 5, 0])),
        {},
        ValueError,
        "num_accepted\\[1\\] = 5 must be in \\[0, N = 4\\]",
    ),
    (dict(num_accepted=torch.tensor([2, 3, -1])), {}, ValueError, "num_accepted\\[2\\] = -1"),
    (dict(tree_start=8), {}, ValueError, "tree_start = 8 out of range"),
    (dict(tree_start=-1), {}, ValueError, "tree_start = -1 out of range"),
    (dict(tree_start=torch.tensor([3, 0, 9])), {}, ValueError, "tree_start\\[2\\] = 9 out of range"),
    (dict(tree_start=1.5), {}, TypeError, "tree_start must be an int or a tensor"),
    (dict(tree_start=torch.tensor([3.0])), {}, ValueError, "tree_start tensor must be int64 or int32"),
    (dict(tree_start=torch.tensor([3, 3])), {}, ValueError, "tree_start must be an int or a \\[B\\]"),
    (dict(tree_start=torch.tensor(3, device="meta")), {}, ValueError, "tree_start is on meta"),
    (
        dict(path=torch.tensor([[0, 4, -1, -1], [1, 2, 3, -1], [-1] * 4])),
        {},
        ValueError,
        "path\\[0, 1\\] = 4 must be a node id in \\[0, 4\\)",
    ),
    (
        dict(path=torch.tensor([[0, 2, -1, -1], [1, -1, 3, -1], [-1] * 4])),
        {},
        ValueError,
        "path\\[1, 1\\] = -1 must be a node id",
    ),
    (
        dict(path=torch.tensor([[2, 0, -1, -1], [1, 2, 3, -1], [-1] * 4])),
        {},
        ValueError,
        "path\\[0\\] must be strictly increasing",
    ),
    ({}, dict(backend="cuda"), ValueError, "no backend='cuda'"),
    ({}, dict(backend="flash"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("override,kwargs,error,message", BAD_INPUTS)
def test_bad_inputs_raise_named_errors(override, kwargs, error, message):
    inputs = dict(_good(), **override)
    caches = inputs["caches"] if isinstance(inputs["caches"], list) else []
    checked = [(c, c.clone()) for c in caches if isinstance(c, torch.Tensor) and c.device.type == "cpu"]
    with pytest.raises(error, match=message):
        compact_kv(**inputs, **kwargs)
    for cache, before in checked:  # nothing moved before the error
        assert torch.equal(cache, before)


def test_good_inputs_pass():
    """The base case of the table above is valid, so each row fails for its own reason."""
    compact_kv(**_good())


def test_hf_caches_that_cannot_be_compacted(tiny_llama):
    transformers, _ = tiny_llama
    path, num_accepted = torch.tensor([[0, -1]]), torch.tensor([1])
    with pytest.raises(ValueError, match="caches is empty"):
        compact_kv(transformers.DynamicCache(), path, num_accepted, 0)
    sliding = transformers.cache_utils.DynamicSlidingWindowLayer(sliding_window=4)
    sliding.update(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4))
    with pytest.raises(ValueError, match="cache layer 0 is a DynamicSlidingWindowLayer"):
        compact_kv(types.SimpleNamespace(layers=[sliding]), path, num_accepted, 0)
    empty = transformers.cache_utils.DynamicLayer()
    with pytest.raises(ValueError, match="cache layer 0 \\(DynamicLayer\\) holds no"):
        compact_kv(types.SimpleNamespace(layers=[empty]), path, num_accepted, 0)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        compact_kv(**_good(), backend="triton")


def test_triton_interpreter_refuses_bf16():
    inputs = dict(_good(), caches=[torch.randn(3, 2, 12, 8).bfloat16()])
    with pytest.raises(ValueError, match="mishandles bf16"):
        compact_kv(**inputs, backend="triton")


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(dtype):
    generator = torch.Generator().manual_seed(7)
    batch, heads, kv_len, head_dim, num_nodes = 3, 8, 2087, 80, 37
    buffers, make_views = strided_caches(batch, heads, kv_len, head_dim, dtype, generator)
    buffers = [b.cuda() for b in buffers]
    path = random_path([0, num_nodes, 11], num_nodes, generator).cuda()
    num_accepted = torch.tensor([0, num_nodes, 11], device="cuda")
    tree_start = torch.tensor([5, 2049, 1000], device="cuda")
    got, expected = run_both(buffers, make_views, path, num_accepted, tree_start, backend="triton")
    torch.cuda.synchronize()
    assert_buffers_equal(got, expected)


@pytest.mark.gpu
def test_gpu_overlap_race_many_heads():
    """Long overlapping paths over many programs and 128-dim heads: a missing barrier shows here."""
    torch.manual_seed(8)
    batch, heads, kv_len, head_dim, num_nodes = 4, 32, 700, 128, 64
    caches = [torch.randn(batch, heads, kv_len, head_dim, device="cuda", dtype=torch.half) for _ in range(64)]
    path = torch.full((batch, num_nodes), -1, dtype=torch.int64)
    path[0, :63] = torch.arange(1, 64)
    path[1, :32] = torch.arange(1, 64, 2)
    path[2, :40] = torch.cat([torch.arange(0, 8), torch.arange(32, 64)])
    num_accepted = torch.tensor([63, 32, 40, 0])
    for _ in range(3):
        expected = [c.clone() for c in caches]
        reference.compact_kv(expected, path.cuda(), num_accepted.cuda(), 600)
        compact_kv(caches, path.cuda(), num_accepted.cuda(), 600, backend="triton")
        torch.cuda.synchronize()
        assert_buffers_equal(caches, expected)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_with_static_tensors():
    caches = [torch.randn(2, 4, 64, 64, device="cuda") for _ in range(4)]
    path = torch.tensor([[1, 2, -1], [-1, -1, -1]], device="cuda")
    num_accepted = torch.tensor([2, 0], device="cuda")
    tree_start = torch.tensor([10, 20], device="cuda")
    compact_kv(caches, path, num_accepted, tree_start, backend="triton")  # builds the pointer table
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compact_kv(caches, path, num_accepted, tree_start, backend="triton")
    expected = [c.clone() for c in caches]
    reference.compact_kv(expected, path, num_accepted, tree_start)
    graph.replay()
    torch.cuda.synchronize()
    assert_buffers_equal(caches, expected)


# ----------------------------------------------------------------------------------------------
# torch.compile: through the crossspec::compact_kv custom op
# ----------------------------------------------------------------------------------------------


def compile_case():
    gen = torch.Generator().manual_seed(5)
    caches = [torch.randn(3, 2, 12, 64, generator=gen) for _ in range(4)]
    path = random_path([3, 0, 5], 6, gen)
    return caches, path, torch.tensor([3, 0, 5]), torch.tensor([2, 4, 0])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiles_with_fullgraph(backend):
    torch._dynamo.reset()

    def commit(caches, path, num_accepted, tree_start):
        compact_kv(caches, path, num_accepted, tree_start, backend=backend)
        return tree_start + 1 + num_accepted

    caches, *args = compile_case()
    expected = [c.clone() for c in caches]
    lengths = commit(expected, *args)
    compiled = torch.compile(commit, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(caches, *args), lengths)
    assert_buffers_equal(caches, expected)  # the caches were compacted in place


def test_crop_under_compile_is_refused():
    torch._dynamo.reset()
    layer = types.SimpleNamespace(keys=torch.zeros(1, 2, 8, 16), values=torch.zeros(1, 2, 8, 16))
    cache = types.SimpleNamespace(layers=[layer])  # what compact_kv reads of an HF cache

    @torch.compile(fullgraph=True, backend="aot_eager")
    def commit(path, num_accepted):
        compact_kv(cache, path, num_accepted, 2)

    with pytest.raises(Exception, match="crop=True reads the committed lengths"):
        commit(torch.tensor([[0, -1]]), torch.tensor([1]))


def test_custom_op_passes_opcheck():
    caches, path, num_accepted, tree_start = compile_case()
    torch.library.opcheck(
        torch.ops.crossspec.compact_kv.default, (caches, path, num_accepted, tree_start, "reference")
    )
