"""CrossSpecEngine: lossless cross-modal speculative generation with prefill hiding.

One request batch, start to end:

1. Prefill hiding. The target's prefill (vision tower + LLM over the prompt) starts in a worker
   thread on the target's CUDA stream (on CPU: in the thread alone). Meanwhile the drafter, on a
   high-priority stream, prefills its own prompt (the event frames) and drafts a chain, checking
   without blocking whether the target's prefill has finished, until it has or
   ``free_token_budget`` tokens are drafted. Drafts finished before the target's prefill are
   counted as free tokens.
2. Rounds (``round.Verifier.step``): one target forward over [root + draft nodes] with the tree
   mask, ``verify`` accepts the longest agreeing path plus one correction/bonus token,
   ``compact_kv`` moves an accepted tree path next to the root; then the drafter catches up on the
   committed tokens in the first forward of its next turn and drafts a chain (``ChainDraft``) or a
   dynamic tree (``TreeDraft``).
   With a feature head (``feature_head=``: an EAGLE-style head fed by the target's own features,
   B1; by the event drafter's, L5; or by both, L5F), the event drafter drafts only during the
   target's prefill (the free tokens); from the first verification on the head drafts chains or
   trees from the features of the committed tokens (``feature_drafting``). For L5/L5F the event
   drafter keeps reading every committed token and reads each draft while the head drafts (a
   chain's steps, a tree's levels), so the head reads its real features.
3. A drafter that raises (an error, or running out of memory) never touches the output: the
   engine finishes with target-only decoding (rounds without drafts) and reports the fallback.

4. Devices: the drafter (with its adapter) may sit on another device than the target (another
   GPU, or the CPU beside a GPU). Each round its proposal crosses to the target's device and the
   verdict comes back through a ``runtime.devices.DevicePair``, which the round calls
   unconditionally (on one device it is the identity); a feature head stays with the target.

Host reads: one per round, in ``Verifier.step`` (with a CPU drafter beside a GPU target, the host
also waits on the event after the verdict's copy into pinned memory: the drafter reads it there).
Caches are ``SlotCache``s (every row has its own length, no holes); ``step_mode`` runs block
forwards eagerly, through ``torch.compile`` or as CUDA graphs (``runner.py``).

Greedy output equals ``target.generate(**target_inputs, do_sample=False)`` token for token (up to
floating-point near-ties between the one-token and the many-token forward). Sampling
(temperature > 0) draws from softmax(logits / temperature) exactly, through recursive rejection
sampling; HF's ``generate`` adds top-k 50 unless told ``top_k=0``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from crossspec_kernels import hf_attention
from crossspec_kernels.models.feature_head import FeatureHead
from crossspec_kernels.runtime import checks
from crossspec_kernels.runtime.controlled import ControlledAcceptance
from crossspec_kernels.runtime.devices import DevicePair
from crossspec_kernels.runtime.draft_config import MAX_DRAFT_NODES, ChainDraft, TreeDraft
from crossspec_kernels.runtime.drafting import DraftModel, Proposal
from crossspec_kernels.runtime.feature_drafting import (
    EVENT_FEATURE_KINDS,
    HeadDecoder,
    check_feature_head,
    feature_draft_model,
)
from crossspec_kernels.runtime.round import Verdict, Verifier
from crossspec_kernels.runtime.runner import (
    STEP_MODES,
    ModelRunner,
    attention_kernel,
    graph_capture_available,
    parameter_dtype,
)
from crossspec_kernels.runtime.sampling import SAMPLING_MODES, CoupledNoise, CoupledSampler, StreamSampler
from crossspec_kernels.runtime.stages import HostSeenMarks, StageTimer

logger = logging.getLogger(__name__)
_OP = "CrossSpecEngine"
# Modules whose forward is the target's vision encoder, timed as the "target.vision" stage.
_VISION_TOWERS = ("video_tower", "image_tower", "vision_tower")


@dataclass
class GenerateOutput:
    """``sequences`` [B, T]: the new tokens only, as ``target.generate(...)[:, prompt_len:]``, rows
    that ended early padded with the pad token. ``stats``: see :meth:`CrossSpecEngine.generate`."""

    sequences: torch.Tensor
    stats: dict = field(default_factory=dict)


class CrossSpecEngine:
    """Cross-modal speculative decoding of an HF target with an HF drafter.

    Args:
        target: a causal VLM or LM (``VideoLlavaForConditionalGeneration`` first) whose output
            embeddings are its LM head. Its language model is switched to the "crossspec"
            attention (``crossspec_kernels.hf.enable``), which computes the same attention.
        drafter: any HF model whose ``.model`` (or, without one, whose forward with
            ``output_hidden_states``) returns final hidden states: the EventGPT-style drafter, a
            LLaVA, a plain causal LM. Its own LM head never runs. None needs a "b1" ``feature_head``
            (nothing is drafted before the first verification then).
        adapter: any ``nn.Module`` mapping the drafter's final hidden state [..., d_draft] into the
            target's [..., d_target] (the package's ``BottleneckAdapter`` runs fused), or None
            (identity: hidden sizes must match).
        draft: ``ChainDraft(gamma)`` (default gamma 5) or ``TreeDraft(top_k, depth, max_nodes)``.
        free_token_budget: at most this many tokens are drafted while the target prefills. Drafting
            stops when the prefill does, so the measured window decides and this only caps the
            first verification block; 32 leaves room for the ~22 free tokens the research measured
            with EventGPT beside Video-LLaVA-7B.
        backend: forces the kernels' backend ("reference": every op's PyTorch reference; "triton";
            "cuda": verify's CUDA C++ kernel, the other ops on triton). None: on CUDA the Triton
            kernels (tree attention where the head dim allows, else torch SDPA) and the fastest
            verify; on CPU torch SDPA attention and each op's default.
        overlap: False makes the drafter wait for the target's prefill (the sequential baseline
            of the overlap benchmark); nothing is drafted for free then.
        streams: CUDA only: (drafter stream, target stream) to run on instead of the two the engine
            makes (a high-priority one and a normal one), e.g. streams of SM-partitioned green
            contexts (``crossspec_kernels.runtime.partition``).
        step_mode: how block forwards (draft steps, verification) run: "eager"; "compile"
            (``torch.compile(fullgraph=True)`` per block shape, any device); "cuda_graph" (one CUDA
            graph per block shape, replayed). Compiled and graphed steps give the eager tokens.
        compile_backend: the torch.compile backend of ``step_mode="compile"`` ("inductor").
        feature_head: a ``FeatureHead`` for this target (``models.feature_head``) of kind "b1"
            (reads the target's features), "l5" (the event drafter's: needs a ``drafter`` whose
            hidden size is the head's d_draft) or "l5f" (both); it drafts every round after the
            first, as a chain or a tree. Its attention is
            switched to "crossspec"; a head saved without its token embedding gets the target's.
        draft_vocab: the token ids the feature head may propose (e.g. the most frequent ones), or
            None (all): a smaller LM head for the drafts, verification still over the full vocabulary.
        device_pair: testing / inspection: the ``runtime.devices.DevicePair`` between the target's
            device and the drafter's (they must be the models'); e.g. ``DevicePair("cpu", "cpu",
            copy=True)`` copies every tensor that crosses even on one device. None: the models'.

    Devices. The drafter and its adapter may sit on another device than the target (and a
    feature head): another GPU, or the CPU beside a GPU; ``drafter_inputs`` then live on the
    drafter's device. Each round the drafts cross to the target's device and the verdict comes
    back through a ``DevicePair`` (``runtime.devices``); the drafter keeps a copy of the target's
    LM head weight on its device to score its drafts; a CPU drafter beside a GPU target runs its
    ops on their CPU defaults even under ``backend="cuda"`` / ``"triton"``. L5/L5F heads (which
    read the event drafter's features every step) need the drafter on the target's device.
    """

    def __init__(
        self,
        target: torch.nn.Module,
        drafter: torch.nn.Module | None,
        adapter: torch.nn.Module | None = None,
        *,
        draft: ChainDraft | TreeDraft | None = None,
        free_token_budget: int = 32,
        backend: str | None = None,
        overlap: bool = True,
        streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None,
        step_mode: str = "eager",
        compile_backend: str = "inductor",
        feature_head: FeatureHead | None = None,
        draft_vocab=None,
        device_pair: DevicePair | None = None,
    ) -> None:
        draft = ChainDraft() if draft is None else draft
        checks.check_backend(_OP, backend)
        if not isinstance(draft, (ChainDraft, TreeDraft)):
            raise ValueError(f"{_OP}: draft must be a ChainDraft or TreeDraft, got {type(draft).__name__}")
        checks.check_free_token_budget(_OP, free_token_budget, MAX_DRAFT_NODES)
        if not isinstance(overlap, bool):
            raise ValueError(f"{_OP}: overlap must be a bool, got {overlap!r}")
        if step_mode not in STEP_MODES:
            raise ValueError(f"{_OP}: step_mode must be one of {STEP_MODES}, got {step_mode!r}")
        if not isinstance(compile_backend, str) or not compile_backend:
            raise ValueError(
                f"{_OP}: compile_backend must be a torch.compile backend name, got {compile_backend!r}"
            )
        head = checks.output_embeddings(target, "target")
        self.device = head.weight.device
        if step_mode == "cuda_graph":
            available, reason = graph_capture_available(self.device)
            if not available:
                raise ValueError(f"{_OP}: step_mode='cuda_graph' needs CUDA graph capture: {reason}")
        self.drafter_device = self.device
        if drafter is None:
            if feature_head is None:
                raise ValueError(f"{_OP}: drafter=None needs a feature_head (something must draft)")
            if adapter is not None:
                raise ValueError(f"{_OP}: an adapter maps the drafter's hidden states; drafter is None")
        else:
            checks.check_drafter(drafter, adapter, target)
            self.drafter_device = checks.drafter_device(drafter, adapter, self.device)
            if step_mode == "cuda_graph":
                available, reason = graph_capture_available(self.drafter_device)
                if not available:
                    raise ValueError(
                        f"{_OP}: step_mode='cuda_graph' needs CUDA graph capture (drafter): {reason}"
                    )
        self.device_pair = _check_pair(device_pair, self.device, self.drafter_device)
        if feature_head is None and draft_vocab is not None:
            raise ValueError(f"{_OP}: draft_vocab restricts a feature head's drafts; feature_head is None")
        self.draft_vocab = None
        if feature_head is not None:
            self.draft_vocab = check_feature_head(feature_head, target, draft_vocab, drafter)
            if self.device_pair.crosses and feature_head.config.kind in EVENT_FEATURE_KINDS:
                raise ValueError(
                    f"{_OP}: feature_head of kind {feature_head.config.kind!r} reads the event drafter's "
                    f"features every draft step; it needs the drafter on the target's device {self.device}, "
                    f"got {self.device_pair!r} (use a 'b1' head, or put the drafter with the target)"
                )
        self.target = hf_attention.enable(target)
        self.drafter = None if drafter is None else hf_attention.enable(drafter)
        self.feature_head = feature_head
        if feature_head is not None:
            feature_head.eval().set_attn_implementation(hf_attention.ATTENTION_NAME)
        self.adapter = adapter
        self.draft = draft
        self.free_token_budget = free_token_budget
        self.backend = backend
        self.overlap = overlap
        self.streams = checks.check_streams(streams, self.device, self.drafter_device)
        self.lm_head = head
        # The drafter scores its drafts with the target's LM head: a copy on its own device.
        self.drafter_lm_head_weight = None if drafter is None else self.device_pair.drafter_copy(head.weight)
        self.step_mode = step_mode
        # Runners keep their caches (and compiled or captured steps) from one request to the next.
        runner = dict(step_mode=step_mode, compile_backend=compile_backend)
        self.target_runner = ModelRunner(
            target, kernel=attention_kernel(target, self.device, backend), **runner
        )
        self.drafter_runner = None
        # A CPU drafter beside a GPU target runs each op's CPU default: a forced GPU backend
        # ("cuda", "triton") is the target's.
        self.drafter_backend = backend
        if self.drafter_device.type == "cpu" and self.device.type == "cuda" and backend in ("cuda", "triton"):
            self.drafter_backend = None
        if drafter is not None:
            kernel = attention_kernel(drafter, self.drafter_device, self.drafter_backend)
            self.drafter_runner = ModelRunner(drafter, kernel=kernel, **runner)
        self.head_runner = None
        if feature_head is not None:
            decoder = HeadDecoder(feature_head)
            kernel = attention_kernel(decoder, self.device, backend)
            self.head_runner = ModelRunner(decoder, kernel=kernel, base=decoder, **runner)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        target_inputs: Mapping,
        drafter_inputs: Mapping | None,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | list[int] = 0,
        sampling: str = "rejection",
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        profile: bool | str = False,
        controlled_acceptance: ControlledAcceptance | None = None,
        on_commit=None,
    ) -> GenerateOutput:
        """Generate up to ``max_new_tokens`` tokens per row.

        Args:
            target_inputs: what ``target.generate`` takes: input_ids [B, T] (left padded),
                attention_mask, pixel_values_videos, ...
            drafter_inputs: the drafter's prompt: input_ids [B, T'] (left padded), attention_mask,
                and its event inputs (e.g. event_pixel_values); None when the engine has no drafter.
            temperature: 0 = greedy; > 0 samples softmax(logits / temperature).
            seed: keys the verification noise (Philox) and the drafter's sampling: an int in
                [0, 2^64), or one per row (a list of B ints).
            sampling: "rejection" (recursive rejection sampling, the most accepted drafts) or
                "coupled" (drafter and target share the position-keyed race noise: the output
                equals ``target.generate`` with ``runtime.sampling.CoupledSampling(seed, T, width)``
                token for token, whatever the timing, rounds or batch); see ``runtime.sampling``.
            eos_token_id: int or list; None = the target's generation_config.eos_token_id; []
                disables stopping at end of sequence.
            pad_token_id: fills rows that ended early; None = the target's generation_config
                pad_token_id, else the first eos id, else 0.
            profile: True writes a torch profiler trace to ./crossspec_trace.json; a string names
                the file. Its path is stats["trace"].
            controlled_acceptance: benchmarks only: replace each chain draft by the target's own
                token with a chosen probability (``runtime.controlled``); greedy chains only.
            on_commit: ``on_commit(row, tokens)`` after every round, with the token ids (a list)
                row ``row`` committed in it (streaming). Costs a device read per row and round.

        Returns:
            GenerateOutput(sequences [B, T], stats) with stats: acceptance_rate (accepted drafts /
            drafted depth: accepted/gamma per round for chains, accepted/depth for trees),
            mean_accepted_length (draft tokens accepted per round and row; each round also commits
            one target token), tokens_per_round, free_tokens (drafted before the target's prefill
            finished), free_tokens_accepted, ttft_ms, tokens_per_s, total_ms, stage_ms (per NVTX
            stage; target.prefill includes target.vision), rounds, fallback, fallback_reason,
            device, drafter_device, transfers / transfer_bytes / transfer_bytes_per_round (what
            crossed between the two devices through the ``DevicePair``: calls and nbytes; 0 on one
            device), step_mode, per_position_acceptance (alpha_k = P(draft at depth k accepted |
            depths < k accepted), over rounds that drafted depth k), drafters (per drafter,
            "event" and "feature": kind ("event", or the head's "b1"/"l5"/"l5f"), label (the
            research label, e.g. "L5F", or None), row_rounds, drafted depth, accepted,
            acceptance_rate),
            accepted_length_histogram (entry k: row rounds that drafted and accepted k drafts).
        """
        trace_path = None if profile is False else ("crossspec_trace.json" if profile is True else profile)
        if trace_path is not None and not isinstance(trace_path, str):
            raise ValueError(f"{_OP}.generate: profile must be a bool or a file path, got {profile!r}")
        folder = os.path.dirname(os.path.abspath(trace_path)) if trace_path is not None else None
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"{_OP}.generate: profile={profile!r}: folder {folder!r} does not exist")
        if on_commit is not None and not callable(on_commit):
            raise ValueError(f"{_OP}.generate: on_commit must be callable, got {type(on_commit).__name__}")
        run = _Run(
            self,
            target_inputs,
            drafter_inputs,
            max_new_tokens,
            (temperature, seed, sampling),
            eos_token_id,
            pad_token_id,
        )
        run.set_controlled_acceptance(controlled_acceptance)
        run.on_commit = on_commit
        profiler = contextlib.nullcontext()
        if trace_path is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities, experimental_config=_all_threads())
        with profiler as prof:
            output = run.execute()
        if trace_path is not None:
            prof.export_chrome_trace(trace_path)
            output.stats["trace"] = trace_path
        return output


# ----------------------------------------------------------------------------------------------
# One generate() call
# ----------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, engine, target_inputs, drafter_inputs, max_new_tokens, sampling, eos, pad):
        self.engine = engine
        self.target_inputs, self.drafter_inputs = checks.check_inputs(engine, target_inputs, drafter_inputs)
        self.batch = batch = self.target_inputs["input_ids"].shape[0]
        self.max_new_tokens = checks.check_int("max_new_tokens", max_new_tokens, 1)
        checks.check_positions(engine.target, self.target_inputs["input_ids"].shape[1], self.max_new_tokens)
        temperature, seed, sampling = sampling
        self.temperature = checks.check_temperature(temperature)
        self.seeds = checks.check_seeds(seed, batch)  # the same 64 bits as int64s, Philox keys
        self.sampling = checks.check_choice("sampling", sampling, SAMPLING_MODES)
        vocab = engine.lm_head.weight.shape[0]
        self.eos = checks.eos_ids(engine.target, eos, vocab)
        self.pad = checks.pad_id(engine.target, self.eos, pad, vocab)
        self.device = device = engine.device
        self.drafter_device = drafter_device = engine.drafter_device
        self.timer = StageTimer(device)
        # The drafter's stages on its own clock when it has its own device (CUDA events on it, or
        # perf_counter on the CPU); both timers' totals add up in stats["stage_ms"].
        self.drafter_timer = self.timer if drafter_device == device else StageTimer(drafter_device)
        backend = engine.backend
        # Ops without a CUDA C++ kernel run on triton when verify is forced onto "cuda".
        self._kernel_backend = "triton" if backend == "cuda" else backend

        # Room for the prompt, the generation and the widest block past it (root + nodes).
        room = self.max_new_tokens + max(engine.free_token_budget, _max_nodes(engine.draft)) + 2
        dtype = engine.lm_head.weight.dtype
        target_runner, drafter_runner = engine.target_runner, engine.drafter_runner
        target_runner.allocate(batch, self.target_inputs["input_ids"].shape[1] + room, dtype, device)
        drafter_dtype = None if engine.drafter is None else parameter_dtype(engine.drafter, dtype)
        self.verifier = Verifier(
            target_runner, engine.lm_head, self.eos, self.temperature, self.seeds, backend, self.sampling
        )
        self.drafter = self.head = None
        if engine.drafter is not None:
            drafter_runner.allocate(
                batch, self.drafter_inputs["input_ids"].shape[1] + room, drafter_dtype, drafter_device
            )
            self.drafter = DraftModel(
                drafter_runner,
                engine.adapter,
                engine.drafter_lm_head_weight,
                self.drafter_timer,
                "triton" if engine.drafter_backend == "cuda" else engine.drafter_backend,
            )
        if engine.feature_head is not None:
            head_runner = engine.head_runner
            head_dtype = parameter_dtype(engine.feature_head, dtype)
            head_runner.allocate(batch, self.target_inputs["input_ids"].shape[1] + room, head_dtype, device)
            self.head = feature_draft_model(
                engine.feature_head,
                head_runner,
                engine.lm_head.weight,
                self.timer,
                self._kernel_backend,
                engine.draft_vocab,
                events=self.drafter,
            )
            self.verifier.keep_features = self.head.reads_target_features
        self.verifier.forward = self.timer.timed("verify.forward", self.verifier.forward)
        self.verifier.accept = self.timer.timed("verify.accept", self.verifier.accept)
        self.verifier.compact = self.timer.timed("kv.compact", self.verifier.compact)

        # The event drafter's sampling noise lives on its device (a feature head's on the target's).
        self.sampler = self.head_sampler = None  # greedy
        self.drafter_noise = self.verifier.noise
        if self.verifier.noise is not None and drafter_device != device:
            seeds = torch.tensor(self.seeds, dtype=torch.int64, device=drafter_device)
            self.drafter_noise = CoupledNoise(seeds, self.temperature)
        if self.temperature > 0:
            if self.sampling == "coupled":
                self.sampler = CoupledSampler(self.drafter_noise)
                self.head_sampler = CoupledSampler(self.verifier.noise)
            else:
                self.sampler = StreamSampler(torch.Generator(drafter_device).manual_seed(self.seeds[0]))
                self.head_sampler = self.sampler
                if drafter_device != device:
                    self.head_sampler = StreamSampler(torch.Generator(device).manual_seed(self.seeds[0]))
        self.drafter_stream, self.target_stream = None, None
        # Lower number = higher priority: the drafter's small kernels go first when both are queued.
        high = torch.cuda.Stream.priority_range()[1] if torch.cuda.is_available() else 0
        if engine.streams is not None:
            self.drafter_stream, self.target_stream = engine.streams
        else:
            if device.type == "cuda":
                self.target_stream = torch.cuda.Stream(device)
            if drafter_device.type == "cuda":
                self.drafter_stream = torch.cuda.Stream(drafter_device, priority=high)
        # A feature head runs with the target: on the drafter's stream when both share a device.
        self.head_stream = self.drafter_stream
        if drafter_device != device:
            self.head_stream = None if device.type != "cuda" else torch.cuda.Stream(device, priority=high)
        # What crosses between the two sides each round (the identity on one device).
        self.pair = engine.device_pair.bind(self.drafter_stream, self.target_stream)
        self.head_pair = DevicePair(device).bind(self.head_stream, self.target_stream)
        self.event_side = self.head_side = None
        if self.drafter is not None:
            self.event_side = _Side(
                "event", self.drafter, self.pair, self.drafter_stream, self.sampler, self.drafter_noise
            )
        if self.head is not None:
            self.head_side = _Side(
                "feature", self.head, self.head_pair, self.head_stream, self.head_sampler, self.verifier.noise
            )
        self.proposing = self.event_side or self.head_side  # the side whose proposal is verified next
        self.position: torch.Tensor | None = None  # the proposing side's copy of verifier.generated
        self.free_observed: int | None = None  # free tokens counted in host time (two clocks)
        self.override = None
        self.fallback_reason = None
        self.pieces: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.lengths = [0] * batch
        self.finished = [False] * batch
        self.rounds = 0
        self.row_rounds = 0
        self.first_accepted = [0] * batch
        # Per draft depth k (index k - 1): rounds x rows that drafted depth k after accepting the
        # depths before it, and those that accepted it; per drafter: [row rounds that drafted,
        # drafted depth, accepted drafts] (the totals of acceptance_rate and mean_accepted_length).
        self.offered_at: list[int] = []
        self.accepted_at: list[int] = []
        self.by_drafter = {"event": [0, 0, 0], "feature": [0, 0, 0]}
        self.accepted_hist: list[int] = []  # row rounds that drafted, by drafts accepted
        self.drafter_finite: torch.Tensor | None = None  # of the proposal about to be verified
        self.on_commit = None
        self.proposer = "event"  # which model drafted the proposal being verified

    def set_controlled_acceptance(self, controlled: ControlledAcceptance | None) -> None:
        if controlled is None:
            return
        if not isinstance(controlled, ControlledAcceptance):
            raise ValueError(
                f"{_OP}.generate: controlled_acceptance must be a ControlledAcceptance, got {type(controlled).__name__}"
            )
        if self.temperature != 0 or not isinstance(self.engine.draft, ChainDraft):
            raise ValueError(f"{_OP}.generate: controlled_acceptance needs greedy decoding and a ChainDraft")
        if self.drafter is None or self.head is not None:
            raise ValueError(
                f"{_OP}.generate: controlled_acceptance needs an event drafter and no feature head"
            )
        controlled.check(self.batch, self.drafter.shared_vocab, self.drafter_device)
        # Draft `step` of a round proposes new token number generated + step (the drafter's copy).
        self.override = lambda token, step: controlled.apply(token, self.position + step)

    # streams ----------------------------------------------------------------------------------
    def _on(self, stream):
        return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)

    def _join(self, waiting, producer) -> None:
        """``waiting`` stream orders itself after everything queued on ``producer`` (an event);
        streams of one device (across devices the ``DevicePair`` orders the copies)."""
        if waiting is not None and producer is not None:
            waiting.wait_stream(producer)

    # the drafter, guarded ----------------------------------------------------------------------
    def _drafter_call(self, fn, *args, stream=None, **kwargs):
        """``fn`` on ``stream`` (the event drafter's stream by default); a failure means fallback."""
        if self.fallback_reason is not None:
            return None
        try:
            with self._on(self.drafter_stream if stream is None else stream):
                return fn(*args, **kwargs)
        except Exception as error:  # an OOM or any bug in the drafter: finish without it
            self.fallback_reason = f"{type(error).__name__}: {error}"
            logger.warning("crossspec: the drafter failed (%s); finishing with target-only decoding", error)
            return None

    # ------------------------------------------------------------------------------------------
    def execute(self) -> GenerateOutput:
        start = time.perf_counter()
        for stream in {self.target_stream, self.drafter_stream, self.head_stream} - {None}:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # the inputs' stream

        proposal = self._prefill_phase()
        root, first_tokens = None, None
        while True:
            verdict = self._verify(root, proposal)
            first_tokens = first_tokens or time.perf_counter()
            root = verdict.tokens.gather(1, verdict.num_accepted[:, None])[:, 0]
            self._collect(verdict, proposal, first=self.rounds == 0)
            self.rounds += 1
            if all(self.finished):
                break
            proposal = self._draft(verdict, proposal)

        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_stream(self.target_stream)
        sequences = self._sequences()
        end = time.perf_counter()
        return GenerateOutput(sequences, self._stats(start, first_tokens, end))

    def _verify(self, root, proposal: Proposal | None) -> Verdict:
        proposal, finite = self.proposing.pair.to_target((proposal, self.drafter_finite))
        proposal = Proposal.empty(self.batch, self.device) if proposal is None else proposal
        with self._on(self.target_stream):
            verdict = self.verifier.step(root, proposal, finite)
        self.drafter_finite = None
        if not verdict.drafter_finite and self.fallback_reason is None:
            self.fallback_reason = "FloatingPointError: the drafter's hidden states are not finite (NaN/inf)"
            logger.warning("crossspec: %s; finishing with target-only decoding", self.fallback_reason)
        return verdict

    def _draft(self, verdict: Verdict, proposal: Proposal | None) -> Proposal | None:
        """The drafter's turn (the feature head's, with one): read the committed tokens, then
        propose the next round's drafts."""
        if self.fallback_reason is not None:
            return None
        side = self.proposing = self.event_side if self.head is None else self.head_side
        self.proposer = side.name
        # What the drafter's turn reads of the round, on its side: the tokens, the counts, the
        # rows still generating and their positions (a feature head: the target's features too).
        # Guarded like the drafter's own work: a copy that fails on its device means fallback.
        turn = _Turn(side.model.reads(verdict), self.verifier.active, self.verifier.generated)
        turn = self._drafter_call(side.pair.to_drafter, turn, stream=side.stream)
        if turn is None:
            return None
        self.position = turn.position
        fed = 0 if proposal is None else proposal.fed
        pending = self._drafter_call(
            side.model.pending, turn.verdict, turn.active, self.verifier.active_host, fed, stream=side.stream
        )
        hidden = (
            None if pending is None else self._drafter_call(side.model.catch_up, pending, stream=side.stream)
        )
        if hidden is not None:  # read with the next round's counts (Verifier.step)
            with self._on(side.stream):  # where ``hidden`` was made
                self.drafter_finite = torch.isfinite(hidden).all()
        return (
            None
            if hidden is None
            else self._drafter_call(self._propose, side.model, hidden, stream=side.stream)
        )

    def _propose(self, model: DraftModel, hidden) -> Proposal:
        """``model`` (the proposing side's) drafts with that side's sampler or noise."""
        config, side = self.engine.draft, self.proposing
        if isinstance(config, TreeDraft):
            return model.tree(hidden, config, noise=side.noise, position=self.position)
        return model.chain(
            hidden,
            config,
            temperature=self.temperature,
            sampler=side.sampler,
            position=self.position,
            override=self.override,
        )

    # prefill hiding ---------------------------------------------------------------------------
    def _prefill_phase(self) -> Proposal | None:
        state = {}
        worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossspec-target")
        future = worker.submit(self._target_prefill, state)

        def prefill_done() -> bool:
            if not future.done():
                return False
            end = state.get("end")
            return end is None or not isinstance(end, torch.cuda.Event) or end.query()

        budget = min(self.engine.free_token_budget, self.max_new_tokens)
        if not self.engine.overlap:
            # Sequential: the target's prefill first, then a first draft as long as a round's.
            future.result()
            config = self.engine.draft
            budget = min(
                config.gamma if isinstance(config, ChainDraft) else config.depth, self.max_new_tokens
            )

        # Two clocks (the drafter on its own device): free tokens are counted in host time.
        seen = HostSeenMarks() if self.drafter_timer is not self.timer else None

        def should_stop(timestamps) -> bool:
            if seen is not None:
                seen.observe(timestamps)
            if len(timestamps) >= budget or not self.engine.overlap:
                return len(timestamps) >= budget
            if self.drafter_device.type == "cuda":
                # Keep at most two steps in flight so drafting stops soon after the prefill does.
                while len(timestamps) >= 2 and not (prefill_done() or timestamps[-2].query()):
                    time.sleep(20e-6)
            return prefill_done()

        proposal = None
        hidden = (
            None if self.drafter is None else self._drafter_call(self.drafter.prefill, self.drafter_inputs)
        )
        if hidden is not None:
            # Nothing committed yet: zeros made on the drafter's side (a copy from the target's
            # stream would wait behind the prefill queued there).
            self.position = torch.zeros(self.batch, dtype=torch.int64, device=self.drafter_device)
            proposal = self._drafter_call(
                self.drafter.chain,
                hidden,
                ChainDraft(budget),
                temperature=self.temperature,
                sampler=self.sampler,
                position=self.position,
                should_stop=should_stop,
                override=self.override,
            )
        marks = [] if proposal is None else proposal.timestamps
        while seen is not None and not seen.all_seen(marks) and not prefill_done():
            seen.observe(marks)
            time.sleep(20e-6)
        try:
            future.result()
        finally:
            worker.shutdown()
        if seen is not None:
            self.free_observed = seen.count_before(marks, state["end_host"])
        if self.head is not None:  # the head reads the prompt's features, after the target's prefill
            self._join(self.head_stream, self.target_stream)
            inputs = self.target_inputs
            mask = inputs.get("attention_mask")
            mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
            self._drafter_call(
                self.head.prefill,
                inputs["input_ids"],
                mask,
                self.verifier.prompt_hidden,
                hidden,  # an L5/L5F head's (the drafter is on the target's device then)
                stream=self.head_stream,
            )
            self.verifier.prompt_hidden = None
        # Which drafts were free is read at the end (CUDA event times need a sync).
        self.prefill_marks = (state["start"], state["end"], [] if proposal is None else proposal.timestamps)
        return proposal

    def _target_prefill(self, state: dict) -> None:
        timer = self.timer
        with contextlib.ExitStack() as stack:
            if self.target_stream is not None:
                stack.enter_context(torch.cuda.device(self.device))
                stack.enter_context(torch.cuda.stream(self.target_stream))
            stack.enter_context(_timed_towers(self.engine.target, timer))
            state["start"] = timer.mark()
            with torch.no_grad(), timer.stage("target.prefill"):
                self.verifier.prefill(self.target_inputs)
            state["end"] = timer.mark()
            if self.drafter_timer is not timer:  # two clocks: when the prefill ended, host time
                if isinstance(state["end"], torch.cuda.Event):
                    state["end"].synchronize()  # this thread has nothing else to do
                state["end_host"] = time.perf_counter()

    # bookkeeping ------------------------------------------------------------------------------
    def _collect(self, verdict: Verdict, proposal: Proposal | None, *, first: bool) -> None:
        """Keep each live row's committed tokens (up to its first end of sequence) and count them."""
        num_nodes = 0 if proposal is None else proposal.tokens.shape[1]
        # A tree's drafted depth: its levels, or fewer when max_nodes / pruning kept fewer nodes.
        depth = (
            num_nodes
            if proposal is None or proposal.parents is None
            else min(self.engine.draft.depth, num_nodes)
        )
        if depth > len(self.offered_at):
            grow = depth - len(self.offered_at)
            self.offered_at += [0] * grow
            self.accepted_at += [0] * grow
        drafter_counts = self.by_drafter[self.proposer]
        for row in range(self.batch):
            if self.finished[row]:
                continue
            accepted, eos_at = verdict.accepted[row], verdict.eos_at[row]
            self.row_rounds += 1
            if num_nodes > 0:
                for k in range(min(accepted + 1, depth)):
                    self.offered_at[k] += 1
                    self.accepted_at[k] += k < accepted
                drafter_counts[0] += 1
                drafter_counts[1] += depth
                drafter_counts[2] += accepted
                if accepted >= len(self.accepted_hist):
                    self.accepted_hist += [0] * (accepted + 1 - len(self.accepted_hist))
                self.accepted_hist[accepted] += 1
            if first:
                self.first_accepted[row] = accepted
            take = accepted + 1 if eos_at < 0 else eos_at + 1
            take = min(take, self.max_new_tokens - self.lengths[row])
            self.pieces[row].append(verdict.tokens[row, :take].clone())
            self.lengths[row] += take
            if self.on_commit is not None and take > 0:
                self.on_commit(row, self.pieces[row][-1].tolist())
            if eos_at >= 0 or self.lengths[row] >= self.max_new_tokens:
                self.finished[row] = True
                self.verifier.finish(row)

    def _drafter_names(self, name: str) -> dict:
        """What drafted a stats["drafters"] entry: kind ("event", or the head's "b1" / "l5" /
        "l5f"; None without a head) and research label (the adapter's or head's, e.g. "L5F")."""
        module = self.engine.adapter if name == "event" else self.engine.feature_head
        config = getattr(module, "config", None)
        kind = "event" if name == "event" else getattr(config, "kind", None)
        return {"kind": kind, "label": getattr(config, "label", None)}

    def _sequences(self) -> torch.Tensor:
        sequences = torch.full(
            (self.batch, max(self.lengths)), self.pad, dtype=torch.int64, device=self.device
        )
        for row, pieces in enumerate(self.pieces):
            sequences[row, : self.lengths[row]] = torch.cat(pieces)
        return sequences

    def _stats(self, start: float, first_tokens: float, end: float) -> dict:
        total_s = end - start
        generated = sum(self.lengths)
        stage_ms = self.timer.totals()  # synchronises on CUDA, so event times can be read now
        if self.drafter_timer is not self.timer:
            if self.drafter_device.type == "cuda":
                torch.cuda.synchronize(self.drafter_device)  # its events, before reading them
            for name, ms in self.drafter_timer.totals().items():
                stage_ms[name] += ms
        prefill_start, prefill_end, marks = self.prefill_marks
        if self.free_observed is not None:
            free = self.free_observed
        else:
            prefill_ms = self.timer.elapsed_ms(prefill_start, prefill_end)
            free = sum(self.timer.elapsed_ms(prefill_start, mark) <= prefill_ms for mark in marks)
        drafted_rows, drafted, accepted = (sum(column) for column in zip(*self.by_drafter.values()))
        return {
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_length": accepted / drafted_rows if drafted_rows else 0.0,
            "tokens_per_round": generated / self.row_rounds if self.row_rounds else 0.0,
            "free_tokens": free,
            "free_tokens_accepted": sum(min(a, free) for a in self.first_accepted) / self.batch,
            "ttft_ms": (first_tokens - start) * 1e3,
            "tokens_per_s": generated / total_s if total_s > 0 else math.inf,
            "total_ms": total_s * 1e3,
            "stage_ms": stage_ms,
            "rounds": self.rounds,
            "fallback": self.fallback_reason is not None,
            "fallback_reason": self.fallback_reason,
            "device": str(self.device),
            "drafter_device": str(self.drafter_device),
            # What crossed between the two devices (0 on one device): DevicePair's counts.
            "transfer_bytes": self.pair.moved_bytes,
            "transfer_bytes_per_round": self.pair.moved_bytes / self.rounds if self.rounds else 0.0,
            "transfers": self.pair.transfers,
            "step_mode": self.engine.step_mode,
            "sampling": "greedy" if self.temperature == 0 else self.sampling,
            "accepted_length_histogram": list(self.accepted_hist),
            "per_position_acceptance": [
                accepted / offered if offered else 0.0
                for accepted, offered in zip(self.accepted_at, self.offered_at)
            ],
            "drafters": {
                name: {
                    **self._drafter_names(name),
                    "row_rounds": rounds,
                    "drafted": drafted,
                    "accepted": accepted,
                    "acceptance_rate": accepted / drafted if drafted else 0.0,
                }
                for name, (rounds, drafted, accepted) in self.by_drafter.items()
            },
        }


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _max_nodes(config: ChainDraft | TreeDraft) -> int:
    return config.gamma if isinstance(config, ChainDraft) else config.max_nodes


class _Side(NamedTuple):
    """A drafting model and what it drafts with: the event drafter on its device, or a feature
    head on the target's."""

    name: str  # "event" or "feature" (stats["drafters"])
    model: DraftModel
    pair: DevicePair  # between the target and this side
    stream: torch.cuda.Stream | None
    sampler: object  # sampled chains' sampler (runtime.sampling) on this side, None when greedy
    noise: CoupledNoise | None  # coupled trees' noise on this side


class _Turn(NamedTuple):
    """What a drafter's turn reads of a round (``DevicePair.to_drafter`` moves it)."""

    verdict: Verdict  # as ``DraftModel.reads`` keeps it
    active: torch.Tensor  # [B] bool: rows still generating
    position: torch.Tensor  # [B] int64: tokens each row has committed (Verifier.generated)


def _check_pair(pair, target_device: torch.device, drafter_device: torch.device) -> DevicePair:
    if pair is None:
        return DevicePair(target_device, drafter_device)
    if not isinstance(pair, DevicePair):
        raise ValueError(
            f"{_OP}: device_pair must be a runtime.devices.DevicePair or None, got {type(pair).__name__}"
        )
    if (pair.target, pair.drafter) != (target_device, drafter_device):
        raise ValueError(
            f"{_OP}: device_pair is {pair!r}, but the target is on {target_device} and the drafter on "
            f"{drafter_device}"
        )
    return pair


def _all_threads():
    """Profile the target's prefill thread too (torch >= 2.7); None: the calling thread only."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


@contextlib.contextmanager
def _timed_towers(model: torch.nn.Module, timer: StageTimer):
    """Time the target's vision encoder(s) as "target.vision" through forward hooks."""
    towers = [
        module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in _VISION_TOWERS and module is not model
    ]
    open_ranges = []
    handles = []
    for tower in towers:
        handles.append(
            tower.register_forward_pre_hook(
                lambda *_: open_ranges.append(timer.begin("target.vision")), prepend=True
            )
        )
        handles.append(tower.register_forward_hook(lambda *_: timer.end(open_ranges.pop())))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
