"""Greedy decoding of the drafter with one decode step captured as a CUDA graph.

A drafter's decode step is a few dozen small kernels; for a small model the GPU finishes them faster
than Python and the HF modules can launch them, so the step is launch-bound. Capturing the step once
and replaying it removes the launch cost. What that needs, and how it is done here:

* Fixed addresses. The KV cache is a transformers ``StaticCache`` of ``max_length`` slots, allocated
  up front (``early_initialization``). The step reads and writes only static buffers: the input
  token [B, 1], the RoPE position [B, 1], the cache slot [1], the padding mask [B, max_length] and
  the output token [B]. ``reset`` zeroes them in place, so one captured graph serves every request.
* No host values that change between steps. The step advances its own counters on the device
  (token ← argmax, position += 1, slot += 1; transformers 5.x's ``StaticLayer`` keeps its write
  index as a device counter too), and the attention mask is built on the device from the slot
  counter: an additive float [B, 1, 1, max_length] mask, which transformers passes to attention as
  it is (its own mask code is skipped, and with it the host reads it does for padding).
* No host syncs. Nothing in the step reads a device value on the host (``.item()``, ``bool()``,
  ``.tolist()``); a CPU test runs the step on the meta device, where any such read raises.

Decisions (the brief left them open):

* A model in training mode is refused (``ValueError``): dropout in a replayed greedy step is never
  what a drafter wants, and it would make the graph and eager paths disagree.
* Left padding is supported through ``attention_mask`` [B, T] (1 = real token), as ``generate``
  takes it: positions count real tokens only, padded slots stay hidden. Right padding or holes are
  refused (``ValueError``): the tokens a decode step appends would sit after a row's gap.
* Attention must take a 4-D additive mask: "eager", "sdpa" and crossspec's "crossspec" do; the
  flash/flex/paged implementations are refused. Sliding-window or chunked layers are refused (the
  mask assumes slot = absolute position).
* The decoder runs a fixed number of steps; stopping at an end-of-sequence token is the caller's
  business (a drafter's chain simply ends).

transformers 4.57 writes the cache at the ``cache_position`` it is given; 5.x has no such forward
argument and writes at the layer's device counter. Both start at the prompt length after the
prefill and advance by one per step, so slot counter, cache and mask agree in both versions.
"""

from __future__ import annotations

import inspect
import threading

import torch

_OP = "GraphedGreedyDecoder"
_REQUIRED_FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "use_cache")
# Attention implementations that ignore (or reject) a 4-D additive mask.
_UNSUPPORTED_ATTENTION_PREFIXES = ("flash", "flex", "paged", "sdpa_paged", "kernels-community")
_WARMUP_STEPS = 2
_capture_lock = threading.Lock()


def graph_capture_available(device) -> tuple[bool, str]:
    """Whether a CUDA graph can be captured on ``device`` now: ``(True, "")`` or ``(False, reason)``."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        return False, f"not a device: {device!r} ({error})"
    if device.type != "cuda":
        return False, f"CUDA graphs need a CUDA device, got device {str(device)!r}"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return False, "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no GPU or driver visible)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not 0 <= index < torch.cuda.device_count():
        return False, f"device index {index} out of range: {torch.cuda.device_count()} CUDA device(s)"
    with torch.cuda.device(index):
        if torch.cuda.is_current_stream_capturing():
            return False, "another CUDA graph capture is running on the current stream"
    if _capture_lock.locked():
        return False, "another GraphedGreedyDecoder is capturing its graph"
    return True, ""


class GraphedGreedyDecoder:
    """Greedy decoding of an HF causal LM with a static KV cache, one decode step as a CUDA graph.

    The model is LlamaForCausalLM-like: ``forward(input_ids, attention_mask, position_ids,
    past_key_values, [cache_position,] use_cache) -> .logits``, in eval mode, on ``device``.

    Args:
        model: the causal LM (not moved or cast here).
        batch_size: rows per request, fixed for the decoder's lifetime (B).
        max_length: cache slots: prompt length (with its left padding) plus decoded steps.
        device: where the model lives; CUDA for ``use_graph=True``.
        dtype: the KV cache dtype; None = the model's parameter dtype (the only one accepted).
        use_graph: capture the step as a CUDA graph (at construction) and replay it; False runs the
            same step eagerly (any device; how the CPU tests check it).

    Usage::

        decoder = GraphedGreedyDecoder(drafter, batch_size=B, max_length=T + n, device="cuda")
        first = decoder.prefill(input_ids, attention_mask)   # [B]    eager, fills the cache
        rest = decoder.decode(n)                             # [B, n] graph replays, no host sync
        decoder.reset()                                      # ready for the next prompt

    Attributes: ``static_input_ids`` [B, 1], ``static_position_ids`` [B, 1], ``static_cache_position``
    [1], ``static_output_token`` [B], ``static_padding`` [B, max_length] (the graph's fixed buffers),
    ``cache`` (the StaticCache), ``graph`` (the captured ``torch.cuda.CUDAGraph``, None when eager),
    ``length`` / ``remaining`` (host-side slot counts).

    ``cat([first[:, None], rest], 1)`` equals ``model.generate(input_ids, attention_mask=...,
    do_sample=False, max_new_tokens=n + 1)[:, T:]`` (up to floating-point near-ties).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int,
        max_length: int,
        device,
        dtype: torch.dtype | None = None,
        use_graph: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{_OP}: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"{_OP}: max_length must be an int >= 1, got {max_length!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        if use_graph:
            available, reason = graph_capture_available(device)
            if not available:
                raise RuntimeError(f"{_OP}: use_graph=True but CUDA graph capture is unavailable: {reason}")
        _check_model(model, device)
        model_dtype = _parameter_dtype(model)
        if dtype is None:
            dtype = model_dtype
        if dtype != model_dtype:
            raise ValueError(
                f"{_OP}: dtype must match the model's parameters ({model_dtype}), got {dtype}; "
                "cast the model first"
            )

        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self.use_graph = use_graph
        params = inspect.signature(model.forward).parameters
        self._pass_cache_position = "cache_position" in params
        self._pass_logits_to_keep = "logits_to_keep" in params
        self.cache = _static_cache(model, batch_size, max_length, dtype, device)

        long = dict(dtype=torch.int64, device=device)
        self.static_input_ids = torch.zeros(batch_size, 1, **long)
        self.static_position_ids = torch.zeros(batch_size, 1, **long)
        self.static_cache_position = torch.zeros(1, **long)
        self.static_output_token = torch.zeros(batch_size, **long)
        self.static_padding = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self._slots = torch.arange(max_length, **long)
        self._mask_min = torch.finfo(dtype).min

        self._length = 0  # cache slots in use (host-side: guards without reading the device)
        self._prefilled = False
        self.graph: torch.cuda.CUDAGraph | None = None
        if use_graph:
            self._capture()

    # ------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Cache slots in use: the prompt (with padding) plus decoded steps."""
        return self._length

    @property
    def remaining(self) -> int:
        """Decode steps still possible before ``max_length``."""
        return self.max_length - self._length if self._prefilled else 0

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt eagerly into the static cache; returns the first greedy token [B].

        ``input_ids`` [B, T] int; ``attention_mask`` [B, T] (1 = real token), left padding only.
        Checking the mask reads it on the host (one sync, outside the decode loop).
        """
        if self._prefilled:
            raise RuntimeError(f"{_OP}: prefill called twice; call reset() before the next prompt")
        _check_eval(self.model)
        batch, width = self._check_prompt(input_ids, attention_mask)
        input_ids = input_ids.to(self.device, torch.int64)
        if attention_mask is None:
            padding = torch.ones(batch, width, dtype=torch.bool, device=self.device)
        else:
            padding = attention_mask.to(self.device).to(torch.bool)

        # Prefill slots are 0..T-1: query i sees real slots j <= i; a padding query sees only itself,
        # so no row of the mask is empty (an all-masked row could turn into NaN in low precision).
        slots = self._slots[:width]
        causal = slots[None, :] <= slots[:, None]  # [T, T]
        visible = causal[None] & (
            padding[:, None, :] | torch.eye(width, dtype=torch.bool, device=self.device)
        )
        mask = torch.full(
            (batch, 1, width, self.max_length), self._mask_min, dtype=self.dtype, device=self.device
        )
        mask[:, 0, :, :width].masked_fill_(visible, 0.0)
        position_ids = (padding.long().cumsum(-1) - 1).clamp_min(0)

        extra = {}
        if self._pass_cache_position:
            extra["cache_position"] = slots
        if self._pass_logits_to_keep:
            extra["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        first = _logits(out)[:, -1].argmax(-1)

        self.static_padding[:, :width].copy_(padding)
        self.static_padding[:, width:].fill_(True)
        self.static_output_token.copy_(first)
        self.static_input_ids.copy_(first[:, None])
        self.static_position_ids.copy_(padding.sum(-1, keepdim=True))
        self.static_cache_position.fill_(width)
        self._length = width
        self._prefilled = True
        return first.clone()

    @torch.no_grad()
    def decode(self, num_steps: int) -> torch.Tensor:
        """``num_steps`` greedy tokens after the last one [B, num_steps]; no host sync in between."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"{_OP}: num_steps must be an int >= 0, got {num_steps!r}")
        if not self._prefilled:
            raise RuntimeError(f"{_OP}: decode called before prefill")
        if self._length + num_steps > self.max_length:
            raise ValueError(
                f"{_OP}: decoding num_steps={num_steps} more tokens would pass max_length={self.max_length} "
                f"({self._length} cache slots used, {self.max_length - self._length} left)"
            )
        if self.model.training:
            raise ValueError(f"{_OP}: the model was put in training mode; call model.eval()")
        tokens = torch.empty(self.batch_size, num_steps, dtype=torch.int64, device=self.device)
        for step in range(num_steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            tokens[:, step].copy_(self.static_output_token)
        self._length += num_steps
        return tokens

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the prompt: every buffer is zeroed in place, so a captured graph stays valid."""
        self.cache.reset()
        self.static_input_ids.zero_()
        self.static_position_ids.zero_()
        self.static_cache_position.zero_()
        self.static_output_token.zero_()
        self.static_padding.fill_(True)
        self._length = 0
        self._prefilled = False

    # ------------------------------------------------------------------------------------------
    def _step(self) -> None:
        """One greedy step on the static buffers; device work only (this is what gets captured)."""
        visible = (self._slots[None, :] <= self.static_cache_position) & self.static_padding  # [B, L]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~visible, self._mask_min)[:, None, None, :]
        extra = {"cache_position": self.static_cache_position} if self._pass_cache_position else {}
        out = self.model(
            input_ids=self.static_input_ids,
            attention_mask=mask,
            position_ids=self.static_position_ids,
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        token = _logits(out)[:, -1].argmax(-1)
        self.static_output_token.copy_(token)
        self.static_input_ids.copy_(token[:, None])
        self.static_position_ids.add_(1)
        self.static_cache_position.add_(1)

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm up on a side stream (lazy cuBLAS/allocator setup happens outside the capture), capture
        one step, then zero everything the warm-up advanced. Capture runs nothing, so the state after
        it is the state before it."""
        if not _capture_lock.acquire(blocking=False):
            raise RuntimeError(f"{_OP}: another GraphedGreedyDecoder is capturing its graph")
        try:
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(min(_WARMUP_STEPS, self.max_length)):
                        self._step()
                torch.cuda.current_stream().wait_stream(side)
                self.reset()
                graph = torch.cuda.CUDAGraph()
                # thread_local: the engine's target prefill may run CUDA work in another thread.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self._step()
                self.reset()
                torch.cuda.current_stream().synchronize()
            self.graph = graph
        finally:
            _capture_lock.release()

    def _check_prompt(self, input_ids, attention_mask) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"{_OP}: input_ids must be a 2-D [B, T] tensor, got {got}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"{_OP}: input_ids must be an integer tensor, got {input_ids.dtype}")
        batch, width = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(
                f"{_OP}: input_ids has batch {batch}, the decoder was built for batch_size={self.batch_size}"
            )
        if not 1 <= width <= self.max_length:
            raise ValueError(
                f"{_OP}: input_ids length T={width} must be in [1, max_length={self.max_length}]"
            )
        if attention_mask is None:
            return batch, width
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, width):
            got = (
                tuple(attention_mask.shape)
                if isinstance(attention_mask, torch.Tensor)
                else type(attention_mask)
            )
            raise ValueError(
                f"{_OP}: attention_mask must be [B, T] = [{batch}, {width}] like input_ids, got {got}"
            )
        mask = attention_mask.detach().to("cpu")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{_OP}: attention_mask must hold only 0 and 1 (1 = real token)")
        mask = mask.to(torch.int64)
        if not bool((mask[:, -1] == 1).all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            raise ValueError(
                f"{_OP}: attention_mask must be left padding only (each row 0..0 1..1, the last token real); "
                "right padding and holes are not supported: left-pad the prompts as generate() expects"
            )
        return batch, width


# ----------------------------------------------------------------------------------------------


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.dtype.is_floating_point:
            return parameter.dtype
    raise ValueError(f"{_OP}: model has no floating-point parameters")


def _check_model(model, device: torch.device) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{_OP}: model must be a torch.nn.Module, got {type(model).__name__}")
    params = inspect.signature(model.forward).parameters
    missing = [name for name in _REQUIRED_FORWARD_ARGS if name not in params]
    if missing:
        raise ValueError(
            f"{_OP}: model.forward must take {', '.join(_REQUIRED_FORWARD_ARGS)} (an HF causal LM); "
            f"{type(model).__name__}.forward lacks {', '.join(missing)}"
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise ValueError(f"{_OP}: model must have an HF config (model.config) to size the static cache")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    attention = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if isinstance(attention, str) and attention.startswith(_UNSUPPORTED_ATTENTION_PREFIXES):
        raise ValueError(
            f"{_OP}: model attention {attention!r} does not take a 4-D additive mask; use "
            "'eager', 'sdpa' or 'crossspec' (model.set_attn_implementation)"
        )
    layer_types = getattr(text, "layer_types", None) or []
    windowed = [kind for kind in layer_types if kind != "full_attention"]
    if windowed or getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        raise ValueError(
            f"{_OP}: model has sliding-window/chunked attention layers ({sorted(set(windowed)) or 'sliding_window'}); "
            "only full-attention models are supported (the mask assumes cache slot = position)"
        )
    _check_eval(model)
    # The first parameter stands for all (a model split over devices fails in its forward anyway).
    name, parameter = next(iter(model.named_parameters()), (None, None))
    if parameter is not None and (
        parameter.device.type != device.type
        or (device.index is not None and parameter.device.index not in (None, device.index))
    ):
        raise ValueError(
            f"{_OP}: model parameter {name!r} is on {parameter.device}, expected device {device}"
        )


def _check_eval(model) -> None:
    training = [name or "<root>" for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(
            f"{_OP}: model must be in eval mode (model.eval()); in training mode: {training[:3]}"
        )


def _static_cache(model, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device):
    """A transformers StaticCache allocated now (fixed addresses before any capture), 4.57 or 5.x."""
    from transformers import StaticCache

    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    params = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": config, "max_cache_len": max_length}
    # Constructors that name these (older transformers) allocate in __init__; 4.57 and 5.x swallow them
    # in **kwargs and allocate lazily, so the layers are initialised explicitly below.
    for name, value in (("max_batch_size", batch_size), ("device", device), ("dtype", dtype)):
        if name in params:
            kwargs[name] = value
    cache = StaticCache(**kwargs)
    num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if hasattr(cache, "early_initialization"):
        cache.early_initialization(batch_size, num_kv_heads, head_dim, dtype, device)
    return cache
