"""CrossSpecEngine: lossless against target.generate, prefill hiding, fallback, stats, bad inputs.

Tiny random fp32 models (crossspec_kernels.testing_models). Most runs force backend="reference"
(plain PyTorch, fast on CPU); one test per draft shape runs the Triton kernels through the CPU
interpreter. The target's reference output comes from a separate instance on eager attention.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from crossspec_kernels import testing_models as tm
from crossspec_kernels.models.adapters import AdapterConfig, EagleAdapter, LinearAdapter
from crossspec_kernels.runtime import ChainDraft, ControlledAcceptance, CrossSpecEngine, TreeDraft

NEW_TOKENS = 12
DRAFTS = [
    ChainDraft(gamma=1),
    ChainDraft(gamma=4),
    TreeDraft(top_k=2, depth=3, max_nodes=6),
    TreeDraft(top_k=3, depth=2, max_nodes=12),
]


single = tm.single_row
perturbed = tm.perturbed


def drafter_and_inputs(kind: str, target_inputs: dict):
    batch = target_inputs["input_ids"].shape[0]
    if kind == "copy":  # the target itself: every draft is accepted
        return tm.tiny_video_llava(seed=0), dict(target_inputs), None
    if kind == "perturbed":  # the target with noisy weights, reading the same video
        return perturbed(tm.tiny_video_llava(seed=0), 0.6, seed=5), dict(target_inputs), None
    # An unrelated small LM with a different hidden size, behind a linear adapter; its own
    # left-padded prompt of other lengths (the event prompt stands in here).
    drafter = tm.tiny_llama(seed=7, head_dim=8)
    prompts = [
        torch.randint(3, 100, (5 + 3 * row,), generator=torch.Generator().manual_seed(row))
        for row in range(batch)
    ]
    ids, mask = tm.left_pad(prompts)
    torch.manual_seed(11)
    adapter = LinearAdapter(AdapterConfig(kind="linear", d_draft=32, d_target=64)).eval()
    return drafter, dict(input_ids=ids, attention_mask=mask), adapter


def expected(reference_model, inputs: dict, **kwargs) -> torch.Tensor:
    out = reference_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


# ----------------------------------------------------------------------------------------------
# Losslessness (greedy, fp32)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft", DRAFTS, ids=str)
@pytest.mark.parametrize("kind", ["copy", "perturbed", "adapter"])
def test_greedy_equals_target_generate_batch2_left_padded(reference_model, target, batch_inputs, kind, draft):
    want = expected(reference_model, batch_inputs)
    drafter, drafter_inputs, adapter = drafter_and_inputs(kind, batch_inputs)
    engine = CrossSpecEngine(target, drafter, adapter, draft=draft, backend="reference")
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want), (kind, draft, out.sequences, want)
    stats = out.stats
    assert not stats["fallback"]
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    if kind == "copy" and isinstance(draft, ChainDraft):
        # Every draft of an identical drafter is accepted, so a round commits gamma + 1 tokens.
        assert stats["acceptance_rate"] == 1.0
        assert stats["rounds"] < NEW_TOKENS
    if kind == "adapter":
        assert stats["rounds"] >= 2


@pytest.mark.parametrize("row", [0, 1])
def test_batch1_matches_and_rows_are_independent(reference_model, target, batch_inputs, row):
    inputs = single(batch_inputs, row)
    want = expected(reference_model, inputs)
    drafter, drafter_inputs, _ = drafter_and_inputs("perturbed", inputs)
    engine = CrossSpecEngine(target, drafter, draft=TreeDraft(2, 3, 6), backend="reference")
    out = engine.generate(inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    batched = expected(reference_model, batch_inputs)[row : row + 1]
    assert torch.equal(out.sequences, batched)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="CPU tensors reach Triton only through its interpreter (TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("draft", [ChainDraft(3), TreeDraft(2, 3, 5)], ids=str)
def test_triton_kernels_in_the_loop(batch_inputs, draft, monkeypatch):
    """backend="triton" (the CPU interpreter): tree attention (head dim 64, a size the kernel takes),
    verify, lm_head_topk and, for trees, compact_kv run their Triton kernels; output unchanged."""
    import importlib

    calls = {}
    for op in ("tree_attention", "verify", "lm_head_topk", "compact_kv"):
        module = importlib.import_module(f"crossspec_kernels.triton.{op}")
        launcher = getattr(module, op)

        def spy(*args, _launcher=launcher, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, op, spy)
    reference_model, target = (
        tm.tiny_video_llava(seed=0, head_dim=64),
        tm.tiny_video_llava(seed=0, head_dim=64),
    )
    want = expected(reference_model, batch_inputs)[:, :5]
    drafter = perturbed(tm.tiny_video_llava(seed=0, head_dim=64), 0.6, seed=5)
    out = CrossSpecEngine(target, drafter, draft=draft, backend="triton").generate(
        batch_inputs, dict(batch_inputs), max_new_tokens=5
    )
    assert torch.equal(out.sequences, want)
    expected_ops = {"tree_attention", "verify", "lm_head_topk"} | (
        {"compact_kv"} if isinstance(draft, TreeDraft) else set()
    )
    assert expected_ops <= set(calls), calls


def test_eos_stops_rows_and_pads_like_generate(reference_model, target, batch_inputs):
    free_run = expected(reference_model, batch_inputs, eos_token_id=[])
    eos = int(free_run[0, 3])  # row 0 ends at its 4th token; row 1 whenever it meets that id
    want = expected(reference_model, batch_inputs, eos_token_id=eos, pad_token_id=0)
    assert want.shape[1] <= NEW_TOKENS and (want[0, 4:] == 0).all()
    drafter, drafter_inputs, _ = drafter_and_inputs("copy", batch_inputs)
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(5), backend="reference")
    out = engine.generate(
        batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(out.sequences, want)


def test_plain_causal_lm_target(batch_inputs):
    """Any HF causal LM works as the target (here a Llama without video)."""
    target, reference_model, drafter = tm.tiny_llama(seed=3), tm.tiny_llama(seed=3), tm.tiny_llama(seed=4)
    ids, mask = tm.left_pad([torch.arange(3, 12), torch.arange(20, 24)])
    inputs = dict(input_ids=ids, attention_mask=mask)
    want = reference_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, ids.shape[1] :]
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(3), backend="reference")
    out = engine.generate(inputs, inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want)


# ----------------------------------------------------------------------------------------------
# Prefill hiding, stats, profiling
# ----------------------------------------------------------------------------------------------


def test_free_tokens_when_the_target_prefill_is_slow(reference_model, target, batch_inputs):
    """The video tower waits until the drafter has run 8 forwards: 8 drafts are ready (the budget)
    before the target's prefill ends, and all of them are free."""
    inputs = single(batch_inputs, 0)
    want = expected(reference_model, inputs)
    drafter, drafter_inputs, _ = drafter_and_inputs("copy", inputs)
    forwards, drafted = [], threading.Event()

    def count(*_):
        forwards.append(1)
        if len(forwards) == 8:  # the prompt, then 7 fed drafts: the 8th draft is scored next
            drafted.set()

    def slow_tower(*_):
        assert drafted.wait(timeout=60), "the drafter never drafted while the target prefilled"
        time.sleep(0.2)  # leaves time to score the 8th draft

    tower = target.get_submodule("model.video_tower")
    # The engine runs the drafter's decoder (``.model``): its LM head never runs.
    handles = [tower.register_forward_pre_hook(slow_tower), drafter.model.register_forward_hook(count)]
    try:
        engine = CrossSpecEngine(
            target, drafter, draft=ChainDraft(4), free_token_budget=8, backend="reference"
        )
        out = engine.generate(inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(out.sequences, want)
    stats = out.stats
    assert stats["free_tokens"] == 8
    assert stats["free_tokens_accepted"] == 8  # an identical drafter's drafts all hold
    assert stats["stage_ms"]["target.vision"] >= 200  # the tower's time includes the wait
    assert stats["stage_ms"]["target.prefill"] >= stats["stage_ms"]["target.vision"]
    assert stats["ttft_ms"] >= stats["stage_ms"]["target.prefill"]


def test_no_free_tokens_when_the_drafter_is_slower(reference_model, target, batch_inputs):
    """The drafter starts only after the target's prefill has finished: nothing is free."""
    inputs = single(batch_inputs, 0)
    drafter, drafter_inputs, _ = drafter_and_inputs("copy", inputs)
    prefilled = threading.Event()

    def wait_for_target(*_):
        assert prefilled.wait(timeout=60)
        time.sleep(0.1)

    handles = [  # the engine runs the decoders (``.model``) of both
        target.model.register_forward_hook(lambda *_: prefilled.set()),
        drafter.model.register_forward_pre_hook(wait_for_target),
    ]
    try:
        engine = CrossSpecEngine(target, drafter, draft=ChainDraft(2), backend="reference")
        out = engine.generate(inputs, drafter_inputs, max_new_tokens=4)
    finally:
        for handle in handles:
            handle.remove()
    assert out.stats["free_tokens"] == 0
    assert torch.equal(out.sequences, expected(reference_model, inputs)[:, :4])


def test_stats_are_consistent(target, batch_inputs):
    drafter, drafter_inputs, _ = drafter_and_inputs("perturbed", batch_inputs)
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(3), backend="reference")
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    stats = out.stats
    assert out.sequences.shape == (2, NEW_TOKENS)
    assert set(stats["stage_ms"]) == {
        "target.vision", "target.prefill", "draft.prefill", "draft.step", "verify.forward", "verify.accept", "kv.compact",
    }  # fmt: skip
    assert all(ms >= 0 for ms in stats["stage_ms"].values())
    assert stats["stage_ms"]["kv.compact"] == 0.0  # chains need no compaction
    # Each round commits mean_accepted_length + 1 tokens per row (up to truncation at the end).
    assert stats["tokens_per_round"] <= stats["mean_accepted_length"] + 1 + 1e-9
    assert 1 <= stats["rounds"] <= NEW_TOKENS
    assert stats["tokens_per_s"] > 0 and stats["total_ms"] >= stats["ttft_ms"] > 0


def test_profile_writes_a_trace_with_the_stages(target, batch_inputs, tmp_path):
    drafter, drafter_inputs, _ = drafter_and_inputs("perturbed", batch_inputs)
    engine = CrossSpecEngine(target, drafter, draft=TreeDraft(2, 2, 4), backend="reference")
    path = str(tmp_path / "trace.json")
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=4, profile=path)
    assert out.stats["trace"] == path
    with open(path) as trace:
        names = {event.get("name") for event in json.load(trace)["traceEvents"]}
    assert {
        "target.prefill",
        "draft.prefill",
        "draft.step",
        "verify.forward",
        "verify.accept",
        "kv.compact",
    } <= names


# ----------------------------------------------------------------------------------------------
# Fallback
# ----------------------------------------------------------------------------------------------


class Failing(torch.nn.Module):
    """Wraps a drafter; its forward raises ``error`` from the ``fail_at``-th call on."""

    def __init__(self, inner, fail_at: int, error: Exception) -> None:
        super().__init__()
        self.inner, self.fail_at, self.error, self.calls = inner, fail_at, error, 0
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def set_attn_implementation(self, value):
        self.inner.set_attn_implementation(value)

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.error
        return self.inner(**kwargs)


@pytest.mark.parametrize(
    "fail_at, error",
    [
        (1, RuntimeError("drafter bug in prefill")),
        (3, torch.OutOfMemoryError("CUDA out of memory (simulated)")),
        (6, ValueError("drafter bug in a later round")),
    ],
)
def test_drafter_failure_falls_back_to_target_decoding(reference_model, target, batch_inputs, fail_at, error):
    want = expected(reference_model, batch_inputs)
    inner, drafter_inputs, _ = drafter_and_inputs("copy", batch_inputs)
    drafter = Failing(inner, fail_at, error)
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(2), backend="reference")
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    assert out.stats["fallback"] is True
    assert type(error).__name__ in out.stats["fallback_reason"]


def test_drafter_with_nan_weights_falls_back_and_says_why(reference_model, target, batch_inputs):
    drafter, drafter_inputs, _ = drafter_and_inputs("perturbed", batch_inputs)
    with torch.no_grad():
        drafter.get_input_embeddings().weight.fill_(float("nan"))
    engine = CrossSpecEngine(target, drafter, backend="reference")
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected(reference_model, batch_inputs))
    assert out.stats["fallback"] and "not finite" in out.stats["fallback_reason"]
    assert out.stats["drafters"]["event"]["drafted"] == 0


def test_drafter_turning_nan_mid_generation_falls_back(reference_model, target, batch_inputs):
    """Finite after its prompt, NaN from its third forward on: the next round's one host read sees
    it, drafting stops and the output is still the target's."""
    drafter, drafter_inputs, _ = drafter_and_inputs("perturbed", batch_inputs)
    calls = []

    def poison(_module, _inputs, output):
        calls.append(1)
        if len(calls) >= 3:
            output.last_hidden_state.fill_(float("nan"))

    handle = drafter.model.language_model.register_forward_hook(poison)
    try:
        engine = CrossSpecEngine(target, drafter, draft=ChainDraft(2), overlap=False, backend="reference")
        out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, expected(reference_model, batch_inputs))
    assert out.stats["fallback"] and "not finite" in out.stats["fallback_reason"]
    assert 0 < out.stats["drafters"]["event"]["row_rounds"] < 2 * out.stats["rounds"]


def test_on_commit_streams_every_committed_token_and_the_histogram_adds_up(target, batch_inputs):
    drafter, drafter_inputs, _ = drafter_and_inputs("perturbed", batch_inputs)
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(3), backend="reference")
    streamed = {0: [], 1: []}
    out = engine.generate(
        batch_inputs,
        drafter_inputs,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=[],
        on_commit=lambda row, tokens: streamed[row].extend(tokens),
    )
    assert [streamed[0], streamed[1]] == out.sequences.tolist()
    histogram, events = out.stats["accepted_length_histogram"], out.stats["drafters"]["event"]
    assert sum(histogram) == events["row_rounds"]
    assert sum(k * count for k, count in enumerate(histogram)) == events["accepted"]


# ----------------------------------------------------------------------------------------------
# Sampling preserves the target's distribution
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft", [ChainDraft(2), TreeDraft(3, 2, 6)], ids=str)
def test_sampling_matches_target_distribution(draft):
    """First and second tokens over 3000 rows (independent Philox streams) vs the exact softmax."""
    pytest.importorskip("scipy")  # the chi-square helper's; CI installs it (the test extra)
    from test_verify_distribution import ChiSquare

    temperature, rows = 1.3, 3000
    target = tm.tiny_llama(seed=21)
    drafter = perturbed(tm.tiny_llama(seed=21), 0.8, seed=2)
    prompt = torch.arange(5, 13)[None]
    inputs = dict(input_ids=prompt.expand(rows, -1), attention_mask=torch.ones(rows, 8, dtype=torch.int64))
    engine = CrossSpecEngine(target, drafter, draft=draft, backend="reference")
    out = engine.generate(
        inputs, inputs, max_new_tokens=2, temperature=temperature, seed=1234, eos_token_id=[]
    )
    first, second = out.sequences[:, 0], out.sequences[:, 1]
    assert 0.0 < out.stats["acceptance_rate"] < 1.0  # both accept and reject paths ran

    with torch.no_grad():
        p_first = torch.softmax(target(prompt).logits[0, -1].double() / temperature, -1)
    fit = ChiSquare()
    fit.add(torch.bincount(first, minlength=tm.VOCAB_SIZE).numpy(), p_first.numpy(), "first token")
    common = int(torch.mode(first).values)
    chosen = second[first == common]
    with torch.no_grad():
        context = torch.cat([prompt, torch.tensor([[common]])], 1)
        p_second = torch.softmax(target(context).logits[0, -1].double() / temperature, -1)
    fit.add(torch.bincount(chosen, minlength=tm.VOCAB_SIZE).numpy(), p_second.numpy(), "second token")
    fit.check()


# ----------------------------------------------------------------------------------------------
# Hugging Face generate drop-in
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_dict", [False, True])
def test_hf_custom_generate(reference_model, target, batch_inputs, return_dict):
    from crossspec_kernels import hf

    want = reference_model.generate(**batch_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter, drafter_inputs, _ = drafter_and_inputs("perturbed", batch_inputs)
    stats = {}
    got = target.generate(
        **batch_inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        custom_generate=hf.custom_generate,
        drafter=drafter,
        drafter_inputs=drafter_inputs,
        draft=TreeDraft(2, 3, 6),
        crossspec_stats=stats,
        backend="reference",
        return_dict_in_generate=return_dict,
    )
    sequences = got.sequences if return_dict else got
    assert torch.equal(sequences, want)
    assert stats["rounds"] >= 1


def test_hf_custom_generate_refuses_what_it_cannot_honour(target, batch_inputs):
    from crossspec_kernels import hf

    drafter, drafter_inputs, _ = drafter_and_inputs("copy", batch_inputs)
    common = dict(
        custom_generate=hf.custom_generate,
        drafter=drafter,
        drafter_inputs=drafter_inputs,
        backend="reference",
    )
    with pytest.raises(ValueError, match="top_k=0"):
        target.generate(**batch_inputs, max_new_tokens=3, do_sample=True, top_k=50, **common)
    with pytest.raises(ValueError, match="RepetitionPenalty"):
        target.generate(**batch_inputs, max_new_tokens=3, repetition_penalty=1.3, **common)
    with pytest.raises(ValueError, match="drafter_inputs"):
        target.generate(**batch_inputs, max_new_tokens=3, custom_generate=hf.custom_generate, drafter=drafter)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def test_bad_engine_arguments(target):
    drafter = tm.tiny_llama(seed=1)
    narrow = tm.tiny_llama(seed=1, head_dim=8)
    with pytest.raises(ValueError, match="draft must be"):
        CrossSpecEngine(target, drafter, draft=5)
    with pytest.raises(ValueError, match="gamma"):
        ChainDraft(0)
    with pytest.raises(ValueError, match="top_k"):
        TreeDraft(top_k=17)
    with pytest.raises(ValueError, match="max_nodes"):
        TreeDraft(max_nodes=200)
    with pytest.raises(ValueError, match="candidates per round"):
        TreeDraft(top_k=16, depth=10)
    with pytest.raises(ValueError, match="adapter=None needs equal hidden sizes"):
        CrossSpecEngine(target, narrow)
    wrong = LinearAdapter(AdapterConfig(kind="linear", d_draft=48, d_target=64))
    with pytest.raises(ValueError, match="adapter maps 48 -> 64"):
        CrossSpecEngine(target, narrow, wrong)
    eagle = EagleAdapter(AdapterConfig(kind="eagle", d_draft=32, d_target=64, vocab_size=128))
    with pytest.raises(ValueError, match="EagleAdapter"):
        CrossSpecEngine(target, narrow, eagle)
    with pytest.raises(ValueError, match="adapter must be"):
        CrossSpecEngine(target, narrow, "linear")
    with pytest.raises(ValueError, match="adapter maps 32 -> 48"):
        CrossSpecEngine(target, narrow, torch.nn.Linear(32, 48))
    with pytest.raises(ValueError, match=r"adapter failed on a \[1, 32\] input"):
        CrossSpecEngine(target, narrow, torch.nn.Linear(16, 64))
    with pytest.raises(ValueError, match="step_mode must be one of"):
        CrossSpecEngine(target, drafter, step_mode="graphs")
    with pytest.raises(ValueError, match="compile_backend"):
        CrossSpecEngine(target, drafter, step_mode="compile", compile_backend="")
    with pytest.raises(ValueError, match="step_mode='cuda_graph' needs CUDA graph capture"):
        CrossSpecEngine(target, drafter, step_mode="cuda_graph")
    with pytest.raises(ValueError, match="free_token_budget"):
        CrossSpecEngine(target, drafter, free_token_budget=0)
    with pytest.raises(ValueError, match="backend"):
        CrossSpecEngine(target, drafter, backend="cudnn")


def test_any_module_adapter_is_lossless(reference_model, target, batch_inputs):
    """An adapter need not be one of ours: any nn.Module mapping [..., d_draft] to [..., d_target]
    runs (unfused), and the output is still the target's."""
    want = expected(reference_model, batch_inputs)
    drafter, drafter_inputs, _ = drafter_and_inputs("adapter", batch_inputs)
    torch.manual_seed(2)
    adapter = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 64)).eval()
    out = CrossSpecEngine(target, drafter, adapter, draft=ChainDraft(3)).generate(
        batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS
    )
    assert torch.equal(out.sequences, want)
    assert not out.stats["fallback"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t, d: (t, {**d, "input_ids": d["input_ids"][:1]}), "batch 2 but drafter_inputs has batch 1"),
        (lambda t, d: ({k: v for k, v in t.items() if k != "input_ids"}, d), r"target_inputs\['input_ids'\]"),
        (lambda t, d: (t, [d]), "drafter_inputs must be a dict"),
        (lambda t, d: ({**t, "attention_mask": t["attention_mask"].flip(1)}, d), "right-padded"),
        (
            lambda t, d: ({**t, "attention_mask": t["attention_mask"] * torch.tensor([[1], [0]])}, d),
            "a row with no real token",
        ),
        (lambda t, d: ({**t, "attention_mask": t["attention_mask"][:, 1:]}, d), "attention_mask"),
        (lambda t, d: ({**t, "input_ids": t["input_ids"] + 500}, d), r"must lie in \[0, 128\)"),
        (lambda t, d: ({**t, "input_ids": t["input_ids"].float()}, d), "int64 or int32"),
        (lambda t, d: ({**t, "past_key_values": object()}, d), "past_key_values"),
        (lambda t, d: (t, {**d, "input_ids": d["input_ids"][:, :0]}), r"drafter_inputs\['input_ids'\]"),
    ],
)
def test_bad_generate_inputs(target, batch_inputs, change, match):
    drafter = tm.tiny_llama(seed=1)
    engine = CrossSpecEngine(target, drafter, backend="reference")
    drafter_inputs = dict(input_ids=torch.randint(3, 100, (2, 6)))
    target_inputs, drafter_inputs = change(dict(batch_inputs), drafter_inputs)
    with pytest.raises(ValueError, match=match):
        engine.generate(target_inputs, drafter_inputs, max_new_tokens=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=3, temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=3, seed=-2), "seed"),
        (dict(max_new_tokens=3, eos_token_id=128), "eos_token_id"),
        (dict(max_new_tokens=3, pad_token_id=-1), "pad_token_id"),
        (dict(max_new_tokens=3, profile=3), "profile"),
        (dict(max_new_tokens=3, profile="/no/such/folder/trace.json"), "does not exist"),
        (dict(max_new_tokens=10**15), "exceeds the target's max_position_embeddings"),
        (dict(max_new_tokens=3, on_commit=5), "on_commit must be callable"),
        (dict(max_new_tokens=3, sampling="coupled", seed=[1]), "seed has 1 entries for a batch of 2"),
    ],
)
def test_bad_generate_options(target, batch_inputs, kwargs, match):
    engine = CrossSpecEngine(target, tm.tiny_llama(seed=1), backend="reference")
    with pytest.raises(ValueError, match=match):
        engine.generate(batch_inputs, dict(input_ids=torch.randint(3, 100, (2, 6))), **kwargs)


# ----------------------------------------------------------------------------------------------
# Benchmark modes: controlled acceptance, sequential (no overlap)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_controlled_acceptance(reference_model, target, batch_inputs, alpha):
    """Drafts are the target's own tokens with probability alpha: acceptance follows alpha, and the
    output is still the target's. 40 tokens x 2 rows with gamma 4 give ~100 draft decisions."""
    tokens = 40
    # The reference runs past the end: the last round drafts beyond max_new_tokens too.
    reference = reference_model.generate(**batch_inputs, max_new_tokens=tokens + 4, do_sample=False)
    reference = reference[:, batch_inputs["input_ids"].shape[1] :]
    assert reference.shape[1] == tokens + 4  # no end of sequence inside
    want = reference[:, :tokens]
    drafter, drafter_inputs, _ = drafter_and_inputs("adapter", batch_inputs)
    _, _, adapter = drafter_and_inputs("adapter", batch_inputs)
    engine = CrossSpecEngine(target, drafter, adapter, draft=ChainDraft(4), backend="reference")
    controlled = ControlledAcceptance(reference, alpha, seed=3)
    out = engine.generate(
        batch_inputs, drafter_inputs, max_new_tokens=tokens, eos_token_id=[], controlled_acceptance=controlled
    )
    assert torch.equal(out.sequences, want)
    # Per draft, P(accept | reached) = alpha; estimate it as accepted / (accepted + rejections).
    stats = out.stats
    if alpha == 0.0:
        assert stats["mean_accepted_length"] == 0.0
    elif alpha == 1.0:
        assert stats["acceptance_rate"] == 1.0
    else:
        per_round = stats["mean_accepted_length"]  # E[accepted] = sum_{i=1..4} alpha^i = 0.9375
        assert 0.55 < per_round < 1.45, per_round


def test_controlled_acceptance_rejects_what_it_cannot_control(target, batch_inputs):
    drafter, drafter_inputs, adapter = drafter_and_inputs("adapter", batch_inputs)
    reference = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="alpha"):
        ControlledAcceptance(reference, 1.5)
    with pytest.raises(ValueError, match="reference must be an int64"):
        ControlledAcceptance(reference.float(), 0.5)
    tree = CrossSpecEngine(target, drafter, adapter, draft=TreeDraft(2, 2, 4), backend="reference")
    with pytest.raises(ValueError, match="greedy decoding and a ChainDraft"):
        tree.generate(
            batch_inputs,
            drafter_inputs,
            max_new_tokens=3,
            controlled_acceptance=ControlledAcceptance(reference, 0.5),
        )
    chain = CrossSpecEngine(target, drafter, adapter, draft=ChainDraft(2), backend="reference")
    with pytest.raises(ValueError, match="batch 1"):
        chain.generate(
            batch_inputs,
            drafter_inputs,
            max_new_tokens=3,
            controlled_acceptance=ControlledAcceptance(reference[:1], 0.5),
        )


def test_sequential_mode_drafts_nothing_for_free(reference_model, target, batch_inputs):
    want = expected(reference_model, batch_inputs)
    drafter, drafter_inputs, _ = drafter_and_inputs("copy", batch_inputs)
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(3), overlap=False, backend="reference")
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    assert out.stats["free_tokens"] == 0
    assert out.stats["acceptance_rate"] == 1.0  # an identical drafter, first round included


def test_streams_need_cuda(target):
    with pytest.raises(ValueError, match="streams are for CUDA models"):
        CrossSpecEngine(target, tm.tiny_llama(seed=1), streams=(None, None))
    with pytest.raises(ValueError, match="overlap must be a bool"):
        CrossSpecEngine(target, tm.tiny_llama(seed=1), overlap="yes")
