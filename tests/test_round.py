"""The round as one graph: compiled block forwards, compiled engine steps, one host read per round.

Tiny random fp32 models on CPU. torch.compile uses the ``aot_eager`` backend (traces the whole
graph like inductor, without generating C++), so these tests check what compile needs (no graph
breaks, no recompiles, identical outputs) in seconds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crossspec_kernels import testing_models as tm
from crossspec_kernels.hf_attention import enable
from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft
from crossspec_kernels.runtime.runner import ModelRunner

NEW_TOKENS = 10


def _model_and_prompt(kind: str):
    if kind == "llama":
        gen = torch.Generator().manual_seed(0)
        ids, mask = tm.left_pad(
            [torch.randint(3, 120, (9,), generator=gen), torch.randint(3, 120, (5,), generator=gen)]
        )
        return (lambda: tm.tiny_llama(seed=0)), dict(input_ids=ids, attention_mask=mask)
    ids, mask = tm.left_pad([tm.video_prompt(3, 5, seed=0), tm.video_prompt(1, 2, seed=1)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=tm.tiny_video(2, seed=3))
    return (lambda: tm.tiny_video_llava(seed=0)), inputs


def _greedy_decode(runner: ModelRunner, head, inputs: dict, steps: int) -> torch.Tensor:
    batch = inputs["input_ids"].shape[0]
    hidden = runner.prefill(inputs)
    token = head(hidden[:, -1]).argmax(-1)
    tokens = [token]
    zero, one = torch.zeros(batch, 1, dtype=torch.int64), torch.ones(batch, dtype=torch.int64)
    for _ in range(steps - 1):
        hidden = runner.forward(token[:, None], zero)
        runner.cache.advance(one, [1] * batch)
        token = head(hidden[:, -1]).argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("kind", ["llama", "video_llava"])
def test_compiled_block_forward_equals_generate_and_eager(kind):
    """fullgraph compile of the HF model with "crossspec" attention: left-padded batch 2, greedy
    decode equal to target.generate, a tree-masked block equal to eager, and no recompile."""
    build, inputs = _model_and_prompt(kind)
    reference = build()
    want = reference.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    want = want[:, inputs["input_ids"].shape[1] :]
    model = enable(build())
    head = model.get_output_embeddings()
    batch, width = inputs["input_ids"].shape
    runners = {}
    for mode in ("eager", "compile"):
        runner = runners[mode] = ModelRunner(model, step_mode=mode, compile_backend="aot_eager")
        runner.allocate(batch, width + NEW_TOKENS + 4, torch.float32, torch.device("cpu"))
    torch._dynamo.reset()
    with torch.no_grad():
        with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for all decode steps
            assert torch.equal(_greedy_decode(runners["compile"], head, inputs, NEW_TOKENS), want)
        assert torch.equal(_greedy_decode(runners["eager"], head, inputs, NEW_TOKENS), want)
        # A 3-node tree block (root child, its child, a sibling) behind the committed tokens.
        tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
        depth = torch.tensor([[0, 1, 0], [0, 1, 0]])
        tree = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool).expand(batch, -1, -1)
        eager = runners["eager"].forward(tokens, depth, tree)
        compiled = runners["compile"].forward(tokens, depth, tree)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("draft", [ChainDraft(gamma=3), TreeDraft(top_k=2, depth=2, max_nodes=4)], ids=str)
def test_compiled_engine_equals_eager_engine(draft):
    """step_mode="compile": every block forward compiled, same tokens as the eager engine and as
    target.generate (greedy, left-padded batch 2, a perturbed copy of the target as drafter)."""
    build, inputs = _model_and_prompt("video_llava")
    want = build().generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    want = want[:, inputs["input_ids"].shape[1] :]
    drafter = tm.tiny_video_llava(seed=0)
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.mul_(1.05)
    results = {}
    for mode in ("eager", "compile"):
        engine = CrossSpecEngine(build(), drafter, draft=draft, step_mode=mode, compile_backend="aot_eager")
        out = engine.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS, eos_token_id=[])
        assert out.stats["step_mode"] == mode
        results[mode] = out.sequences
    assert torch.equal(results["eager"], want)
    assert torch.equal(results["compile"], want)


# ----------------------------------------------------------------------------------------------
# Host reads per round
# ----------------------------------------------------------------------------------------------

_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
}


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's values on the host (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_host_reads():
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        reads.count += 1
        return tolist(tensor)

    torch.Tensor.tolist = counted_tolist
    try:
        with reads:
            yield reads
    finally:
        torch.Tensor.tolist = tolist


def _reads_and_rounds(engine, inputs, max_new_tokens, temperature) -> tuple[int, int]:
    with counting_host_reads() as reads:
        out = engine.generate(
            inputs,
            dict(inputs),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=3,
            eos_token_id=[],
        )
    return reads.count, out.stats["rounds"]


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("draft", [ChainDraft(gamma=3), TreeDraft(top_k=2, depth=2, max_nodes=4)], ids=str)
def test_one_host_read_per_round(draft, temperature):
    """Reads in a longer generation minus reads in a shorter one = the extra rounds, exactly: the
    round reads only the accepted counts (end-of-sequence positions ride along in the same read)."""
    build, inputs = _model_and_prompt("video_llava")
    drafter = tm.tiny_video_llava(seed=0)
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.mul_(1.05)
    engine = CrossSpecEngine(build(), drafter, draft=draft, overlap=False)
    _reads_and_rounds(engine, inputs, 4, temperature)  # warm-up: lazy initialisation reads nothing later
    short_reads, short_rounds = _reads_and_rounds(engine, inputs, 4, temperature)
    long_reads, long_rounds = _reads_and_rounds(engine, inputs, 4 + 12, temperature)
    assert long_rounds > short_rounds
    assert long_reads - short_reads == long_rounds - short_rounds, (
        short_reads,
        short_rounds,
        long_reads,
        long_rounds,
    )


def test_slot_cache_compact_equals_compact_kv():
    """The engine's sync-free CPU compaction moves exactly what ``compact_kv`` (the spec) moves."""
    from crossspec_kernels.ops.compact_kv import compact_kv
    from crossspec_kernels.runtime.kv_cache import SlotCache

    config = tm.tiny_llama(seed=0).config
    cache = SlotCache(config, 3, 16, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    for buffer in cache.tensors():
        buffer.copy_(torch.randn(buffer.shape, generator=gen))
    expected = [buffer.clone() for buffer in cache.tensors()]
    path = torch.tensor([[1, 3, -1, -1], [0, 1, 2, 3], [-1, -1, -1, -1]])
    num_accepted = torch.tensor([2, 4, 0])
    tree_start = torch.tensor([5, 2, 9])
    compact_kv(expected, path, num_accepted, tree_start, backend="reference")
    cache.compact(path, num_accepted, tree_start)
    for got, want in zip(cache.tensors(), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("draft", [ChainDraft(gamma=3), TreeDraft(top_k=2, depth=2, max_nodes=4)], ids=str)
def test_cuda_graph_engine_equals_target_generate(draft):
    """step_mode="cuda_graph": every block forward replayed from a captured graph, same tokens."""
    build, inputs = _model_and_prompt("video_llava")
    inputs = {name: value.cuda() for name, value in inputs.items()}
    want = (
        build()
        .cuda()
        .generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
    )
    want = want[:, inputs["input_ids"].shape[1] :]
    drafter = tm.tiny_video_llava(seed=0).cuda()
    engine = CrossSpecEngine(build().cuda(), drafter, draft=draft, step_mode="cuda_graph")
    for _ in range(2):  # the second call replays graphs captured by the first
        out = engine.generate(inputs, dict(inputs), max_new_tokens=NEW_TOKENS, eos_token_id=[])
        assert torch.equal(out.sequences, want)
        assert not out.stats["fallback"]
