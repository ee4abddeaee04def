"""GraphedGreedyDecoder: static-cache greedy decoding (eager on CPU, CUDA-graph replay on a GPU).

The eager path (``use_graph=False``) runs the exact step that gets captured, so on CPU it is checked
against ``model.generate(do_sample=False)`` token for token, and checked for host syncs by running
the decode loop under a dispatch mode that raises on every op that reads a tensor on the host.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crossspec_kernels.runtime.cuda_graphs import GraphedGreedyDecoder, graph_capture_available
from crossspec_kernels.testing_models import PAD_TOKEN_ID, left_pad, tiny_llama

# Ops whose result the host has to wait for: .item(), bool(t), int(t), data-dependent shapes.
_HOST_READ_OPS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
}


class _NoHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _HOST_READ_OPS:
            raise AssertionError(f"host read inside decode: {name}")
        self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (length,), generator=gen) for length in lengths]


def _reference(model, input_ids, attention_mask, new_tokens):
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,  # the decoder does not stop at EOS; min_new_tokens would mask EOS instead
        pad_token_id=PAD_TOKEN_ID,
    )
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return out[:, input_ids.shape[1] :]


def _run(decoder, input_ids, attention_mask, chunks):
    first = decoder.prefill(input_ids, attention_mask)
    return torch.cat([first[:, None]] + [decoder.decode(steps) for steps in chunks], 1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


# ----------------------------------------------------------------------------------------------
# correctness of the static-cache step (CPU, eager)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths, chunks, slack",
    [
        ([7], [20], 0),  # the cache exactly full at the end
        ([1], [1, 4, 11], 5),  # one-token prompt, decode in pieces
        ([13, 5], [6, 9], 3),  # left padding: row 1 has 8 pad tokens
        ([4, 9, 9], [17], 0),
    ],
)
def test_eager_equals_generate(model, lengths, chunks, slack):
    input_ids, attention_mask = left_pad(_prompts(lengths, seed=len(lengths)))
    steps = sum(chunks)
    decoder = GraphedGreedyDecoder(
        model,
        batch_size=len(lengths),
        max_length=input_ids.shape[1] + steps + slack,
        device="cpu",
        use_graph=False,
    )
    tokens = _run(decoder, input_ids, attention_mask, chunks)
    expected = _reference(model, input_ids, attention_mask, steps + 1)
    assert tokens.shape == (len(lengths), steps + 1)
    assert torch.equal(tokens, expected)
    assert decoder.length == input_ids.shape[1] + steps


def test_no_attention_mask_equals_generate(model):
    input_ids = torch.stack(_prompts([6, 6], seed=3))
    decoder = GraphedGreedyDecoder(model, batch_size=2, max_length=24, device="cpu", use_graph=False)
    tokens = _run(decoder, input_ids, None, [12])
    assert torch.equal(tokens, _reference(model, input_ids, torch.ones_like(input_ids), 13))


def test_sdpa_attention_equals_generate():
    model = tiny_llama(seed=1, attn_implementation="sdpa")
    input_ids, attention_mask = left_pad(_prompts([9, 3], seed=5))
    decoder = GraphedGreedyDecoder(model, batch_size=2, max_length=30, device="cpu", use_graph=False)
    assert torch.equal(
        _run(decoder, input_ids, attention_mask, [15]), _reference(model, input_ids, attention_mask, 16)
    )


def test_reset_reuses_buffers(model):
    """A second request after reset() decodes from scratch on the same buffers (a graph's addresses)."""
    decoder = GraphedGreedyDecoder(model, batch_size=2, max_length=32, device="cpu", use_graph=False)
    buffers = [
        decoder.static_input_ids,
        decoder.static_position_ids,
        decoder.static_cache_position,
        decoder.static_output_token,
        decoder.static_padding,
    ]
    pointers = [buffer.data_ptr() for buffer in buffers]
    cache_pointers = [layer.keys.data_ptr() for layer in decoder.cache.layers]
    for seed, lengths in ((0, [11, 6]), (1, [3, 8])):
        input_ids, attention_mask = left_pad(_prompts(lengths, seed=seed))
        tokens = _run(decoder, input_ids, attention_mask, [10])
        assert torch.equal(tokens, _reference(model, input_ids, attention_mask, 11))
        decoder.reset()
        assert decoder.length == 0
    assert [buffer.data_ptr() for buffer in buffers] == pointers
    assert [layer.keys.data_ptr() for layer in decoder.cache.layers] == cache_pointers


def test_decode_has_no_host_reads(model):
    input_ids, attention_mask = left_pad(_prompts([8, 5], seed=2))
    decoder = GraphedGreedyDecoder(model, batch_size=2, max_length=20, device="cpu", use_graph=False)
    decoder.prefill(input_ids, attention_mask)
    mode = _NoHostReads()
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy

    def refuse(*args, **kwargs):
        raise AssertionError("host read inside decode: tolist/numpy")

    torch.Tensor.tolist, torch.Tensor.numpy = refuse, refuse
    try:
        with mode:
            decoder.decode(4)
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = tolist, numpy
    assert "aten::argmax" in mode.seen  # the mode saw the step's ops: the check is live

    with pytest.raises(AssertionError, match="_local_scalar_dense"), _NoHostReads():
        decoder.static_output_token[0].item()


def test_decode_zero_steps(model):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=4, device="cpu", use_graph=False)
    decoder.prefill(torch.tensor([[5, 6, 7, 8]]))  # the prompt fills the cache: only the first token
    assert decoder.decode(0).shape == (1, 0)
    assert decoder.remaining == 0


def test_dtype_defaults_to_model(model):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=8, device="cpu", use_graph=False)
    assert decoder.dtype == torch.float32
    assert all(layer.keys.dtype == torch.float32 for layer in decoder.cache.layers)
    assert all(layer.keys.shape == (1, 2, 8, 16) for layer in decoder.cache.layers)


# ----------------------------------------------------------------------------------------------
# guards
# ----------------------------------------------------------------------------------------------


def test_capture_unavailable_on_cpu(model):
    available, reason = graph_capture_available("cpu")
    assert not available
    assert "CUDA device" in reason
    with pytest.raises(RuntimeError, match="use_graph=True.*CUDA device"):
        GraphedGreedyDecoder(model, batch_size=1, max_length=8, device="cpu")
    assert graph_capture_available("not-a-device")[0] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reason")
def test_capture_unavailable_without_gpu():
    available, reason = graph_capture_available("cuda")
    assert not available
    assert "is_available" in reason or "CUDA support" in reason


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, "2"])
def test_bad_batch_size(model, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        GraphedGreedyDecoder(model, batch_size=batch_size, max_length=8, device="cpu", use_graph=False)


@pytest.mark.parametrize("max_length", [0, -3, 2.0, None])
def test_bad_max_length(model, max_length):
    with pytest.raises(ValueError, match="max_length"):
        GraphedGreedyDecoder(model, batch_size=1, max_length=max_length, device="cpu", use_graph=False)


def test_decode_past_max_length(model):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=10, device="cpu", use_graph=False)
    decoder.prefill(torch.tensor([[5, 6, 7, 8]]))
    decoder.decode(4)
    with pytest.raises(ValueError, match=r"max_length=10.*8 cache slots used, 2 left"):
        decoder.decode(3)
    assert decoder.decode(2).shape == (1, 2)  # the refused call changed nothing


def test_prompt_longer_than_max_length(model):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=3, device="cpu", use_graph=False)
    with pytest.raises(ValueError, match="max_length=3"):
        decoder.prefill(torch.tensor([[5, 6, 7, 8]]))


def test_prefill_twice_needs_reset(model):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=10, device="cpu", use_graph=False)
    decoder.prefill(torch.tensor([[5, 6, 7]]))
    with pytest.raises(RuntimeError, match="reset"):
        decoder.prefill(torch.tensor([[5, 6, 7]]))
    decoder.reset()
    decoder.prefill(torch.tensor([[5, 6, 7]]))


def test_decode_before_prefill(model):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=10, device="cpu", use_graph=False)
    with pytest.raises(RuntimeError, match="before prefill"):
        decoder.decode(1)


@pytest.mark.parametrize("num_steps", [-1, 1.0, None])
def test_bad_num_steps(model, num_steps):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=10, device="cpu", use_graph=False)
    decoder.prefill(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="num_steps"):
        decoder.decode(num_steps)


def test_model_without_forward_arguments():
    class NotCausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask=None):
            return self.linear(input_ids)

    with pytest.raises(ValueError, match="model.forward must take.*lacks position_ids, past_key_values"):
        GraphedGreedyDecoder(NotCausalLM().eval(), batch_size=1, max_length=8, device="cpu", use_graph=False)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        GraphedGreedyDecoder(lambda x: x, batch_size=1, max_length=8, device="cpu", use_graph=False)


def test_training_mode_is_refused():
    model = tiny_llama(seed=0)
    model.train()
    with pytest.raises(ValueError, match=r"eval mode \(model.eval\(\)\)"):
        GraphedGreedyDecoder(model, batch_size=1, max_length=8, device="cpu", use_graph=False)
    model.eval()
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=8, device="cpu", use_graph=False)
    model.model.layers[0].train()  # a submodule switched later: caught at prefill
    with pytest.raises(ValueError, match=r"eval mode.*model.layers.0"):
        decoder.prefill(torch.tensor([[5, 6]]))
    model.eval()
    decoder.prefill(torch.tensor([[5, 6]]))
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        decoder.decode(1)


@pytest.mark.parametrize(
    "mask, message",
    [
        ([[1, 1, 1, 0]], "left padding only"),  # right padding
        ([[0, 1, 0, 1]], "left padding only"),  # a hole
        ([[0, 0, 0, 0]], "left padding only"),  # no real token
        ([[0, 2, 1, 1]], "only 0 and 1"),
        ([[1, 1, 1]], r"attention_mask must be \[B, T\]"),
    ],
)
def test_bad_attention_mask(model, mask, message):
    decoder = GraphedGreedyDecoder(model, batch_size=1, max_length=10, device="cpu", use_graph=False)
    with pytest.raises(ValueError, match=message):
        decoder.prefill(torch.tensor([[5, 6, 7, 8]]), torch.tensor(mask))


def test_bad_input_ids(model):
    decoder = GraphedGreedyDecoder(model, batch_size=2, max_length=10, device="cpu", use_graph=False)
    with pytest.raises(ValueError, match="input_ids has batch 1.*batch_size=2"):
        decoder.prefill(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="input_ids must be a 2-D"):
        decoder.prefill(torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        decoder.prefill(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"T=0"):
        decoder.prefill(torch.zeros(2, 0, dtype=torch.int64))


def test_dtype_must_match_model(model):
    with pytest.raises(ValueError, match=r"dtype must match the model's parameters \(torch.float32\)"):
        GraphedGreedyDecoder(
            model, batch_size=1, max_length=8, device="cpu", dtype=torch.float16, use_graph=False
        )


def test_model_on_another_device(model):
    with pytest.raises(ValueError, match="expected device meta"):
        GraphedGreedyDecoder(model, batch_size=1, max_length=8, device="meta", use_graph=False)


def test_sliding_window_is_refused():
    model = tiny_llama(seed=0)
    model.config.sliding_window = 4
    with pytest.raises(ValueError, match="sliding-window"):
        GraphedGreedyDecoder(model, batch_size=1, max_length=8, device="cpu", use_graph=False)


def test_flash_attention_is_refused():
    model = tiny_llama(seed=0)
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' does not take a 4-D additive mask"):
        GraphedGreedyDecoder(model, batch_size=1, max_length=8, device="cpu", use_graph=False)


# ----------------------------------------------------------------------------------------------
# GPU: graph replay
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_model():
    return tiny_llama(seed=0).to("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("lengths, chunks", [([7], [20]), ([13, 5], [6, 9]), ([1, 10, 4], [1, 30])])
def test_graph_equals_eager_and_generate(cuda_model, lengths, chunks):
    input_ids, attention_mask = left_pad(_prompts(lengths, seed=len(lengths)))
    input_ids, attention_mask = input_ids.cuda(), attention_mask.cuda()
    steps = sum(chunks)
    settings = dict(batch_size=len(lengths), max_length=input_ids.shape[1] + steps, device="cuda")
    graphed = GraphedGreedyDecoder(cuda_model, **settings)
    assert graphed.graph is not None
    eager = GraphedGreedyDecoder(cuda_model, **settings, use_graph=False)
    expected = _reference(cuda_model, input_ids, attention_mask, steps + 1)
    for _ in range(2):  # the second round checks that reset() leaves the captured graph valid
        replayed = _run(graphed, input_ids, attention_mask, chunks)
        assert torch.equal(replayed, _run(eager, input_ids, attention_mask, chunks))
        assert torch.equal(replayed, expected)
        graphed.reset()
        eager.reset()


@pytest.mark.gpu
def test_graph_bf16_equals_eager():
    model = tiny_llama(seed=2).to("cuda", torch.bfloat16)
    input_ids, attention_mask = left_pad(_prompts([9, 4], seed=7))
    input_ids, attention_mask = input_ids.cuda(), attention_mask.cuda()
    settings = dict(batch_size=2, max_length=40, device="cuda")
    replayed = _run(GraphedGreedyDecoder(model, **settings), input_ids, attention_mask, [25])
    eager = _run(GraphedGreedyDecoder(model, **settings, use_graph=False), input_ids, attention_mask, [25])
    assert torch.equal(replayed, eager)


@pytest.mark.gpu
def test_graph_decode_has_no_host_sync(cuda_model):
    input_ids, attention_mask = left_pad(_prompts([8, 3], seed=4))
    decoder = GraphedGreedyDecoder(cuda_model, batch_size=2, max_length=40, device="cuda")
    decoder.prefill(input_ids.cuda(), attention_mask.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = decoder.decode(16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (2, 16)
    # The check is live: a sync under the same mode raises.
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            tokens[0, 0].item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_graph_capture_available_on_gpu():
    assert graph_capture_available("cuda") == (True, "")
    graph = torch.cuda.CUDAGraph()
    scratch = torch.zeros(4, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        scratch.add_(1)
        inside = graph_capture_available("cuda")
    assert inside[0] is False
    assert "capture" in inside[1]


@pytest.mark.gpu
def test_graph_replay_timing_report(cuda_model, record_property):
    """Reports eager vs replayed per-step time for the tiny model; asserts nothing about speed."""
    input_ids = torch.stack(_prompts([16], seed=9)).cuda()
    steps, rounds = 64, 5
    timings = {}
    for use_graph in (False, True):
        decoder = GraphedGreedyDecoder(
            cuda_model, batch_size=1, max_length=16 + steps, device="cuda", use_graph=use_graph
        )
        samples = []
        for _ in range(rounds):
            decoder.reset()
            decoder.prefill(input_ids)
            torch.cuda.synchronize()
            start = time.perf_counter()
            decoder.decode(steps)
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) / steps * 1e3)
        timings["graph" if use_graph else "eager"] = sorted(samples)[rounds // 2]
    record_property("ms_per_step", timings)
    print(f"tiny_llama decode ms/step (median of {rounds} x {steps} steps): {timings}")
    assert timings["eager"] > 0 and timings["graph"] > 0
