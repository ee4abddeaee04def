"""ModelRunner: one model of a generation — its hidden-state forward, its SlotCache, how it runs.

Every forward goes through the model's *base* (``model.model``: the decoder that returns
``last_hidden_state``), so a drafter never computes logits of its own and the target's LM head runs
only where the engine needs logits. A block forward writes W tokens per row behind the row's
committed slots, with RoPE positions ``committed real tokens + depth``, under one attention plan
built for the whole forward (``SlotCache.block_plan``); committing is the engine's business
(``cache.set_lengths`` / ``advance``).

Modes (``ModelRunner(step_mode=...)``):

* ``"eager"``: plain PyTorch; attention reads only the used slots.
* ``"compile"``: block forwards run through ``torch.compile(fullgraph=True, dynamic=False)``: the
  plan (mask over the whole capacity), the slot indices and the model in one graph per block
  width. The prefill stays eager (its length varies).
* ``"cuda_graph"``: block forwards are captured as one CUDA graph per block width on first use
  and replayed (static input buffers, the cache's fixed addresses).

Outputs of the three modes are identical for the same inputs (tested on CPU for eager vs compile).
"""

from __future__ import annotations

import inspect

import torch

from crossspec_kernels.runtime.checks import text_config
from crossspec_kernels.runtime.kv_cache import SlotCache

TRITON_HEAD_DIMS = (64, 80, 96, 128)  # head dims the Triton tree-attention kernel is built for


def attention_kernel(model, device: torch.device, backend: str | None) -> str | None:
    """The tree_attention backend of ``model``'s block forwards on ``device``: a forced ``backend``
    ("cuda" means triton here: tree attention has no CUDA C++ kernel), else Triton on CUDA where the
    head dim allows; None = torch SDPA."""
    if backend is not None:
        return "triton" if backend == "cuda" else backend
    config = text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return "triton" if device.type == "cuda" and head_dim in TRITON_HEAD_DIMS else None


def parameter_dtype(model: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (its cache's dtype), else ``default``."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


STEP_MODES = ("eager", "compile", "cuda_graph")
MAX_BLOCK_GRAPHS = 64  # compiled block shapes per process (widths x tree/chain x models)


def graph_capture_available(device) -> tuple[bool, str]:
    """Whether a CUDA graph can be captured on ``device`` now: ``(True, "")`` or ``(False, reason)``."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"CUDA graphs need a CUDA device, got device {str(device)!r}"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no GPU or driver visible)"
    return True, ""


class ModelRunner:
    """Args:
    model: an HF causal LM / VLM (or ``feature_drafting.HeadDecoder``, which takes ``features``).
    kernel: the ``tree_attention`` backend for block forwards, or None for torch SDPA.
    step_mode: "eager", "compile" or "cuda_graph" (see the module docstring).
    compile_backend: torch.compile backend for "compile".
    base: the module returning ``last_hidden_state`` (default ``model.model``; without one the
        model runs whole, with ``output_hidden_states``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        kernel: str | None = None,
        step_mode: str = "eager",
        compile_backend: str = "inductor",
        base: torch.nn.Module | None = None,
    ) -> None:
        self.model = model
        base = getattr(model, "model", None) if base is None else base
        # The decoder returning last_hidden_state; a model without one runs whole, with hidden states.
        self.base = base if isinstance(base, torch.nn.Module) else None
        forward = (self.base or model).forward
        self._takes_cache_position = "cache_position" in inspect.signature(forward).parameters
        self.kernel = kernel
        self.step_mode = step_mode
        self.compile_backend = compile_backend
        self.cache: SlotCache | None = None
        self._compiled: dict = {}
        self._graphs: dict = {}

    # ------------------------------------------------------------------------------------------
    def allocate(self, batch: int, capacity: int, dtype, device) -> SlotCache:
        """A cache for a request of ``batch`` rows; reused (addresses kept) when the shape repeats."""
        cache = self.cache
        if cache is None or (cache.batch, cache.capacity, cache.dtype, cache.device) != (
            batch,
            capacity,
            dtype,
            device,
        ):
            self.cache = SlotCache(text_config(self.model), batch, capacity, dtype, device)
            self._compiled, self._graphs = {}, {}
        return self.cache

    def _call(self, tokens, positions, plan, **inputs) -> torch.Tensor:
        extra = {}
        if self._takes_cache_position:  # transformers 4.57 would read the host length otherwise
            extra["cache_position"] = positions[0]
        whole = self.base is None
        if whole:  # a model without a base decoder runs whole and returns every layer's hidden states
            extra["output_hidden_states"] = True
        out = (self.model if whole else self.base)(
            input_ids=tokens,
            position_ids=positions,
            past_key_values=self.cache,
            attention_mask=plan.mask,
            use_cache=True,
            return_dict=True,
            crossspec_plan=plan,
            **extra,
            **inputs,
        )
        return out.hidden_states[-1] if whole else out.last_hidden_state

    # ------------------------------------------------------------------------------------------
    def prefill(self, inputs: dict) -> torch.Tensor:
        """The prompt (left padded; ``inputs`` as the model takes them): hidden states [B, T, d]."""
        inputs = dict(inputs)
        tokens = inputs.pop("input_ids")
        mask = inputs.pop("attention_mask", None)
        width = tokens.shape[1]
        mask = torch.ones_like(tokens) if mask is None else mask.to(torch.int64)
        cache = self.cache
        cache.start((mask == 0).sum(-1), width)
        cache.check_room(width)
        cache.prepare(width, static=False)
        plan = cache.prefill_plan(width, kernel=self.kernel)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self._call(tokens, positions, plan, **inputs)
        cache.set_lengths(torch.full_like(cache.lengths, width), [width] * cache.batch)
        return hidden

    def forward(
        self,
        tokens: torch.Tensor,
        depth: torch.Tensor,
        tree_mask: torch.Tensor | None = None,
        *,
        eager: bool = False,
        **inputs,
    ) -> torch.Tensor:
        """Write ``tokens`` [B, W] behind each row's committed slots; hidden states [B, W, d].

        Token j of row b sits at RoPE position (row's real tokens) + ``depth[b, j]`` and sees the
        committed slots plus the new tokens ``tree_mask[b, j]`` ([B, W, W] bool, None = causal).
        Nothing is committed. ``eager``: run eagerly whatever the mode (one-off shapes).
        """
        self.cache.check_room(tokens.shape[1])
        if self.step_mode == "eager" or eager:
            return self._block(tokens, depth, tree_mask, False, **inputs)
        key = (tokens.shape[1], tree_mask is None, tuple(sorted(inputs)))
        if self.step_mode == "compile":
            # One compiled function per block shape, so that no shape evicts another's graph.
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = self._compiled[key] = torch.compile(
                    self._block, fullgraph=True, dynamic=False, backend=self.compile_backend
                )
                # Every key is a graph of the same code object (``_block``): Dynamo's default limit
                # of 8 per code object would be reached by a drafter's catch-up widths alone.
                with torch._dynamo.config.patch(recompile_limit=MAX_BLOCK_GRAPHS):
                    return compiled(tokens, depth, tree_mask, True, **inputs)
            return compiled(tokens, depth, tree_mask, True, **inputs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _BlockGraph(self, tokens, depth, tree_mask, inputs)
        return graph.replay(tokens, depth, tree_mask, inputs)

    def _block(self, tokens, depth, tree_mask, static: bool, **inputs) -> torch.Tensor:
        cache = self.cache
        cache.prepare(tokens.shape[1], static=static)
        plan = cache.block_plan(tokens.shape[1], tree_mask, kernel=self.kernel, static=static)
        positions = cache.lengths[:, None] - cache.kv_start[:, None] + depth
        return self._call(tokens, positions, plan, **inputs)


class _BlockGraph:
    """One block forward captured as a CUDA graph: static inputs in, static hidden states out.

    The cache's buffers, lengths and slot indices have fixed addresses (``SlotCache``), so the
    graph reads the current lengths on every replay; only the inputs are copied in.
    """

    _WARMUP = 2

    def __init__(self, runner: ModelRunner, tokens, depth, tree_mask, inputs: dict) -> None:
        self.runner = runner
        self.tokens, self.depth = tokens.clone(), depth.clone()
        self.tree_mask = None if tree_mask is None else tree_mask.clone()
        self.inputs = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):  # warm-up outside capture (allocator, autotuning, lazy init)
            for _ in range(self._WARMUP):
                runner._block(self.tokens, self.depth, self.tree_mask, True, **self.inputs)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.hidden = runner._block(self.tokens, self.depth, self.tree_mask, True, **self.inputs)

    def replay(self, tokens, depth, tree_mask, inputs: dict) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.depth.copy_(depth)
        if tree_mask is not None:
            self.tree_mask.copy_(tree_mask)
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        self.graph.replay()
        return self.hidden
