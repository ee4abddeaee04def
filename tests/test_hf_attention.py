"""crossspec_kernels.hf: the "crossspec" attention inside tiny HF Llama and Video-LLaVA models.

Every comparison runs the same weights and inputs through "crossspec" and through HF's own "eager"
(and "sdpa") attention. Tree forwards are checked against eager given a dense 4-D additive mask built
here by hand, and that mask against the meaning of a tree (a node's logits are those of the plain
sequence prefix + its root path). A spy on the attention op proves the kernel path really ran, so
these tests cannot pass by everything falling back to SDPA.

Runs on transformers 5.x and 4.57 alike: .ci/run also runs this file on 4.57.6 in a second venv.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from crossspec_kernels import hf, hf_attention  # noqa: E402
from crossspec_kernels.testing_models import (  # noqa: E402
    left_pad,
    tiny_llama,
    tiny_video,
    tiny_video_llava,
    video_prompt,
)

ATOL = 2e-5  # fp32: both sides are fp32 softmax attention, they differ by summation order only
# Weights 5x larger than HF's default init give O(1) logits and peaky attention, so a masking
# mistake moves logits by far more than ATOL.
INIT = dict(initializer_range=0.1)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()
    hf.register()  # idempotent


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records every call that reaches the attention op (the kernel path) from the HF glue."""
    calls = []
    op = hf_attention._tree_attention_op

    def spy(q, k, v, tree_mask=None, **kwargs):
        kv_start = kwargs.get("kv_start")
        calls.append(dict(queries=q.shape[2], kv=k.shape[2], tree=tree_mask is not None, kv_start=kv_start))
        return op(q, k, v, tree_mask, **kwargs)

    monkeypatch.setattr(hf_attention, "_tree_attention_op", spy)
    return calls


def implementation(model, name: str):
    """A deep copy of ``model`` whose language model runs attention ``name``."""
    clone = copy.deepcopy(model)
    if "text_config" in clone.config.sub_configs:
        clone.set_attn_implementation({"text_config": name})
    else:
        clone.set_attn_implementation(name)
    return clone


def llama():
    return tiny_llama(seed=0, **INIT)


def video_llava():
    return tiny_video_llava(seed=0, **INIT)


MODELS = {"llama": llama, "video_llava": video_llava}


def batch_inputs(kind: str, lengths=(9, 5), seed: int = 0) -> dict:
    """Left-padded prefill inputs: random text (llama) or text + 8-frame video + text (video_llava)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "llama":
        sequences = [torch.randint(3, 100, (n,), generator=gen) for n in lengths]
        input_ids, attention_mask = left_pad(sequences)
        return dict(input_ids=input_ids, attention_mask=attention_mask)
    sequences = [video_prompt(2, n, seed=seed + row) for row, n in enumerate(lengths)]
    input_ids, attention_mask = left_pad(sequences)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values_videos=tiny_video(len(lengths), seed=seed),
    )


def prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """What generate() uses: the count of real tokens before each position."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max |diff| = {err:.3g} > {atol}"


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def test_register_is_idempotent_and_routes_only_the_text_model():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    hf.register()
    assert AttentionInterface()[hf.ATTENTION_NAME] is hf.crossspec_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[hf.ATTENTION_NAME] is hf.crossspec_mask

    model = hf.enable(copy.deepcopy(video_llava()))
    assert model.config.text_config._attn_implementation == "crossspec"
    assert model.model.language_model.config._attn_implementation == "crossspec"
    assert model.config.vision_config._attn_implementation == "eager"
    assert model.model.video_tower.config._attn_implementation == "eager"
    assert hf.enable(copy.deepcopy(llama())).config._attn_implementation == "crossspec"


# ----------------------------------------------------------------------------------------------
# (a) plain causal forwards: prefill + decode with a KV cache, batch 2 with left padding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "video_llava"])
def test_causal_prefill_and_decode_match_eager_and_sdpa(kind, kernel_calls):
    base = MODELS[kind]()
    models = {name: implementation(base, name) for name in ("eager", "sdpa", "crossspec")}
    inputs = batch_inputs(kind)
    mask = inputs["attention_mask"]
    real = mask.bool()
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randint(3, 100, (2, 1), generator=gen) for _ in range(3)]

    logits = {}
    with torch.no_grad():
        for name, model in models.items():
            out = model(**inputs, position_ids=prefill_positions(mask), use_cache=True)
            per_step, cache, step_mask = [out.logits[real]], out.past_key_values, mask
            for token in steps:
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                out = model(
                    input_ids=token,
                    attention_mask=step_mask,
                    position_ids=step_mask.sum(-1, keepdim=True) - 1,
                    past_key_values=cache,
                )
                per_step.append(out.logits[:, -1])
                cache = out.past_key_values
            logits[name] = per_step
    for step, (ours, eager, sdpa) in enumerate(zip(logits["crossspec"], logits["eager"], logits["sdpa"])):
        assert_close(ours, eager, f"{kind} step {step} vs eager")
        assert_close(ours, sdpa, f"{kind} step {step} vs sdpa")

    # The left-padded prefill has padding among its new tokens: dense SDPA. Each decode step of each
    # layer reaches the kernel with kv_start = the row's padding.
    decode_calls = [call for call in kernel_calls if call["queries"] == 1]
    layers = base.config.get_text_config().num_hidden_layers
    assert len(decode_calls) == len(steps) * layers
    pad = (~real).sum(-1)
    for call in decode_calls:
        assert call["kv_start"] is not None and torch.equal(call["kv_start"].cpu(), pad)


def test_unpadded_prefill_runs_the_kernel(kernel_calls):
    base = video_llava()
    inputs = batch_inputs("video_llava", lengths=(4,))
    del inputs["attention_mask"]
    with torch.no_grad():
        expected = implementation(base, "eager")(**inputs).logits
        ours = implementation(base, "crossspec")(**inputs).logits
    assert_close(ours, expected, "video_llava prefill without padding")
    queries = inputs["input_ids"].shape[1]
    assert [call["queries"] for call in kernel_calls] == [queries] * base.config.text_config.num_hidden_layers
    assert not any(call["tree"] or call["kv_start"] is not None for call in kernel_calls)


def test_generate_matches_eager():
    base = llama()
    inputs = batch_inputs("llama", lengths=(7, 3), seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = implementation(base, "eager").generate(**inputs, **kwargs)
        ours = implementation(base, "crossspec").generate(**inputs, **kwargs)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("padded", [False, True])
def test_long_prefill_delegates_to_sdpa(padded, kernel_calls):
    base = llama()
    lengths = (
        (hf.MAX_KERNEL_QUERIES + 22, hf.MAX_KERNEL_QUERIES + 3) if padded else (hf.MAX_KERNEL_QUERIES + 22,)
    )
    inputs = batch_inputs("llama", lengths=lengths, seed=5)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = implementation(base, "eager")(**inputs).logits
        ours = implementation(base, "crossspec")(**inputs).logits
    assert_close(ours[real], expected[real], "long prefill")
    assert kernel_calls == []


def test_padding_holes_and_static_cache_take_the_dense_path(kernel_calls):
    base = llama()
    eager, ours = implementation(base, "eager"), implementation(base, "crossspec")
    inputs = batch_inputs("llama", lengths=(9, 6), seed=7)
    inputs["attention_mask"][1, 5] = 0  # a hole after the left padding: not expressible as kv_start
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        assert_close(ours(**inputs).logits[real], eager(**inputs).logits[real], "mask with a hole")

        def static_run(model):
            cache = transformers.StaticCache(config=model.config, max_cache_len=32)
            ids = inputs["input_ids"][:1]
            first = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            step = model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True).logits
            return torch.cat([first, step], dim=1)

        assert_close(static_run(ours), static_run(eager), "static cache prefill + decode")
    assert kernel_calls == []  # static cache: the new tokens are not the last kv slots


# ----------------------------------------------------------------------------------------------
# (b) tree verification: prefix in the cache, Q tree tokens, position ids by depth
# ----------------------------------------------------------------------------------------------

# Root (the last committed token) then draft nodes; parents[i] < i, the root's is -1.
PARENTS = [
    [-1, 0, 0, 1, 1, 2, 3, 0],
    [-1, 0, 1, 2, 0, 4, 4, 2],
]


def tree_tensors(parents: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tree_mask [B, Q, Q] bool: ancestor-or-self, depth [B, Q] int64)."""
    batch, nodes = len(parents), len(parents[0])
    mask = torch.zeros(batch, nodes, nodes, dtype=torch.bool)
    depth = torch.zeros(batch, nodes, dtype=torch.int64)
    for b, row in enumerate(parents):
        for i, parent in enumerate(row):
            mask[b, i, i] = True
            if parent >= 0:
                mask[b, i] |= mask[b, parent]
                depth[b, i] = depth[b, parent] + 1
    return mask, depth


def dense_additive_mask(prefix_mask: torch.Tensor, tree: torch.Tensor) -> torch.Tensor:
    """The [B, 1, Q, P + Q] additive mask eager attention needs for a tree step, built by hand."""
    batch, nodes = tree.shape[0], tree.shape[1]
    prefix = prefix_mask.bool()[:, None, :].expand(batch, nodes, prefix_mask.shape[1])
    allowed = torch.cat([prefix, tree], dim=-1)[:, None]
    zeros = torch.zeros(allowed.shape, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)


def tree_step(model, inputs: dict, tree_tokens, tree, depth, *, how: str):
    """Prefill the prefix, then one forward over the tree; returns the tree's logits [B, Q, V]."""
    mask = inputs["attention_mask"]
    with torch.no_grad():
        cache = model(**inputs, position_ids=prefill_positions(mask), use_cache=True).past_key_values
        positions = mask.sum(-1, keepdim=True) + depth  # prefix_len (real tokens) + depth
        step = dict(input_ids=tree_tokens, position_ids=positions, past_key_values=cache)
        full_mask = torch.cat([mask, torch.ones_like(tree_tokens)], dim=1)
        if how == "dense":
            return model(**step, attention_mask=dense_additive_mask(mask, tree)).logits
        if how == "keyword":
            return model(**step, attention_mask=full_mask, crossspec_tree_mask=tree).logits
        if how == "context":
            with hf.tree_mask(tree):
                return model(**step, attention_mask=full_mask).logits
        if how == "kv_start":  # sync-free: no 2-D mask, the padding as a keyword
            kv_start = (mask == 0).sum(-1)
            return model(**step, crossspec_kv_start=kv_start, crossspec_tree_mask=tree).logits
        if how == "no_tree":
            return model(**step, attention_mask=full_mask).logits
        raise AssertionError(how)


@pytest.mark.parametrize("kind", ["llama", "video_llava"])
def test_tree_verification_matches_eager_with_dense_mask(kind, kernel_calls):
    base = MODELS[kind]()
    inputs = batch_inputs(kind, lengths=(6, 3), seed=11)
    tree, depth = tree_tensors(PARENTS)
    tree_tokens = torch.randint(3, 100, depth.shape, generator=torch.Generator().manual_seed(2))
    expected = tree_step(implementation(base, "eager"), inputs, tree_tokens, tree, depth, how="dense")
    ours_model = implementation(base, "crossspec")

    kernel_calls.clear()
    ours = tree_step(ours_model, inputs, tree_tokens, tree, depth, how="keyword")
    assert_close(ours, expected, f"{kind} tree step (keyword)")
    tree_calls = [call for call in kernel_calls if call["tree"]]
    assert len(tree_calls) == base.config.get_text_config().num_hidden_layers
    assert all(call["queries"] == len(PARENTS[0]) and call["kv_start"] is not None for call in tree_calls)

    assert_close(
        tree_step(ours_model, inputs, tree_tokens, tree, depth, how="context"), ours, "context manager"
    )
    assert_close(
        tree_step(ours_model, inputs, tree_tokens, tree, depth, how="kv_start"), ours, "kv_start keyword"
    )
    # The tree matters: without it the same forward is plain causal attention, far from eager's.
    causal = tree_step(ours_model, inputs, tree_tokens, tree, depth, how="no_tree")
    assert (causal - expected).abs().max() > 100 * ATOL


def test_dense_tree_mask_means_the_root_path():
    """Node i's logits are those of the plain causal sequence prefix + (root ... i) in eager."""
    base = implementation(llama(), "eager")
    inputs = batch_inputs("llama", lengths=(5,), seed=13)
    tree, depth = tree_tensors(PARENTS[:1])
    tree_tokens = torch.randint(3, 100, depth.shape, generator=torch.Generator().manual_seed(4))
    tree_logits = tree_step(base, inputs, tree_tokens, tree, depth, how="dense")
    with torch.no_grad():
        for node in range(tree.shape[1]):
            path = tree[0, node].nonzero().flatten()  # ancestors-or-self, in depth order
            ids = torch.cat([inputs["input_ids"][0], tree_tokens[0, path]])[None]
            sequential = base(input_ids=ids).logits[0, -1]
            assert_close(tree_logits[0, node], sequential, f"node {node} vs its root path")


def test_tree_without_padding_or_attention_mask():
    base = llama()
    inputs = batch_inputs("llama", lengths=(7,), seed=17)
    tree, depth = tree_tensors(PARENTS[1:])
    tree_tokens = torch.randint(3, 100, depth.shape, generator=torch.Generator().manual_seed(6))
    expected = tree_step(implementation(base, "eager"), inputs, tree_tokens, tree, depth, how="dense")
    ours = tree_step(implementation(base, "crossspec"), inputs, tree_tokens, tree[0], depth, how="kv_start")
    assert_close(ours, expected, "[Q, Q] tree, no attention mask")


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors reach Triton only through its interpreter (TRITON_INTERPRET=1)",
)
def test_triton_backend_through_hf(kernel_calls):
    """Head dim 64, backend forced to the op's Triton kernel (run by the interpreter on CPU)."""
    base = tiny_llama(seed=0, head_dim=64, **INIT)
    inputs = batch_inputs("llama", lengths=(6, 3), seed=19)
    tree, depth = tree_tensors(PARENTS)
    tree_tokens = torch.randint(3, 100, depth.shape, generator=torch.Generator().manual_seed(8))
    expected = tree_step(implementation(base, "eager"), inputs, tree_tokens, tree, depth, how="dense")
    hf.register(backend="triton")
    try:
        ours = tree_step(implementation(base, "crossspec"), inputs, tree_tokens, tree, depth, how="keyword")
    finally:
        hf.register()
    assert_close(ours, expected, "tree step through Triton, head dim 64", atol=1e-4)
    assert sum(call["tree"] for call in kernel_calls) == base.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_step_on_gpu(dtype):
    """On CUDA the op runs its Triton kernel; its error is bounded by eager's own in that dtype."""
    base = tiny_llama(seed=0, head_dim=64, **INIT)
    inputs = {name: t.cuda() for name, t in batch_inputs("llama", lengths=(6, 3), seed=29).items()}
    tree, depth = tree_tensors(PARENTS)
    tree, depth = tree.cuda(), depth.cuda()
    tree_tokens = torch.randint(3, 100, depth.shape, generator=torch.Generator().manual_seed(9)).cuda()
    exact = tree_step(implementation(base, "eager").cuda(), inputs, tree_tokens, tree, depth, how="dense")
    eager = implementation(base, "eager").to("cuda", dtype)
    ours = implementation(base, "crossspec").to("cuda", dtype)
    eager_err = (tree_step(eager, inputs, tree_tokens, tree, depth, how="dense").float() - exact).abs().max()
    ours_err = (tree_step(ours, inputs, tree_tokens, tree, depth, how="keyword").float() - exact).abs().max()
    assert ours_err <= 2 * eager_err + 1e-3, f"{dtype}: crossspec error {ours_err:.3g}, eager {eager_err:.3g}"


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.ones(8, 8), "must be a bool tensor"),
        (torch.ones(7, 7, dtype=torch.bool), r"must be \[Q, Q\] or \[B, Q, Q\]"),
        (torch.ones(3, 8, 8, dtype=torch.bool), r"must be \[Q, Q\] or \[B, Q, Q\]"),
        ([[True]], "must be a bool tensor"),
    ],
)
def test_bad_tree_masks_raise(bad, match):
    model = implementation(llama(), "crossspec")
    inputs = batch_inputs("llama", lengths=(6, 3), seed=23)
    tree, depth = tree_tensors(PARENTS)
    tree_tokens = torch.randint(3, 100, depth.shape)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        model(input_ids=tree_tokens, past_key_values=cache, crossspec_tree_mask=bad)


def test_attention_function_rejects_bad_masks():
    module = torch.nn.Module()
    q, kv = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 10, 16)
    with pytest.raises(ValueError, match=r"2-D attention_mask must be \[B, L\]"):
        hf.crossspec_attention_forward(module, q, kv, kv, torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask must be None"):
        hf.crossspec_attention_forward(module, q, kv, kv, torch.ones(2, 3, 10, dtype=torch.bool))
    module.is_causal = False
    with pytest.raises(ValueError, match="needs a causal"):
        hf.crossspec_attention_forward(
            module, q, kv, kv, None, crossspec_tree_mask=torch.ones(3, 3, dtype=torch.bool)
        )
