"""Adapters: map drafter hidden states [..., d_draft] into the target's LM-head input [..., d_target].

The drafter and the target live in different hidden spaces; an adapter projects the drafter's final
hidden state so that the *target's* LM head scores it, which puts drafts in the target vocabulary.
Three families (the seeds' L1-L5):

- ``LinearAdapter``: one ``Linear(d_draft, d_target)``.
- ``BottleneckAdapter``: ``x -> up(GELU(down(LayerNorm(x)))) + residual(x)`` with width ``rank``; the
  residual is ``x`` itself when ``d_draft == d_target`` and ``proj(x)`` (bias-free Linear) otherwise.
  Its parts are attributes (``norm``, ``down``, ``up``, ``proj``) and ``fused_params()`` returns their
  tensors, so the fused ``lm_head_topk`` path can read them without knowing this module.
- ``EagleAdapter``: one pre-norm transformer decoder layer (RMSNorm, causal self-attention with RoPE,
  SwiGLU MLP) over ``Linear([drafter hidden ⊕ embed(previous token) (⊕ target hidden)]) -> d_target``,
  followed by a final RMSNorm so its output goes straight into the target LM head (EAGLE, L5; L5F
  when ``use_target_hidden``).

Every adapter saves as ``adapter.safetensors`` + ``adapter_config.json`` in one directory
(``save_pretrained``) and loads back with ``load_adapter`` / ``<Class>.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADAPTER_KINDS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterConfig",
    "BottleneckAdapter",
    "EagleAdapter",
    "LinearAdapter",
    "build_adapter",
    "load_adapter",
    "save_pretrained",
]

ADAPTER_KINDS = ("linear", "bottleneck", "eagle")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _default_num_heads(d_target: int) -> int:
    # Prefer the usual head widths; fall back to one head (head_dim = d_target) for odd sizes.
    for head_dim in (64, 128, 32, 96, 80, 16, 8, 4, 2):
        if d_target % head_dim == 0 and d_target >= head_dim:
            return d_target // head_dim
    return 1


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter; stored as ``adapter_config.json``.

    ``None`` fields are resolved to concrete values at construction, so ``to_dict()`` of a built
    config round-trips exactly.

    Args:
        kind: "linear" | "bottleneck" | "eagle".
        d_draft: drafter hidden size (input).
        d_target: target hidden size (output, the LM head's input).
        rank: bottleneck width r.
        vocab_size: eagle only: size of the previous-token embedding table (the target vocabulary).
        num_heads: eagle only: attention heads; default picks head_dim 64 (or another divisor).
        intermediate_size: eagle only: SwiGLU MLP width; default 2 * d_target.
        embed_dim: eagle only: width of the previous-token embedding; default d_target (so the
            target's own input embedding can be copied in with ``EagleAdapter.load_embedding``).
        use_target_hidden: eagle only (L5F): also feed the target's last hidden state [..., d_target].
        bias: whether the linear adapter and the bottleneck's down/up have biases.
        norm_eps: epsilon of the bottleneck LayerNorm and the eagle RMSNorms.
        rope_theta: eagle RoPE base.
    """

    kind: str
    d_draft: int
    d_target: int
    rank: int = 256
    vocab_size: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    embed_dim: int | None = None
    use_target_hidden: bool = False
    bias: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"AdapterConfig: kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        for name in ("d_draft", "d_target", "rank"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"AdapterConfig: {name} must be a positive int, got {value!r}")
        for name in ("use_target_hidden", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AdapterConfig: {name} must be a bool, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"AdapterConfig: {name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        if self.kind != "eagle":
            return
        if not _is_int(self.vocab_size) or self.vocab_size <= 0:
            raise ValueError(
                f"AdapterConfig: kind='eagle' needs vocab_size (a positive int: the embedding of the "
                f"previous token), got {self.vocab_size!r}"
            )
        if self.num_heads is None:
            self.num_heads = _default_num_heads(self.d_target)
        if not _is_int(self.num_heads) or self.num_heads <= 0 or self.d_target % self.num_heads:
            raise ValueError(
                f"AdapterConfig: num_heads must be a positive int dividing d_target={self.d_target}, "
                f"got {self.num_heads!r}"
            )
        if (self.d_target // self.num_heads) % 2:
            raise ValueError(
                f"AdapterConfig: eagle head_dim = d_target / num_heads must be even for RoPE, got "
                f"{self.d_target} / {self.num_heads} = {self.d_target // self.num_heads}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.d_target
        if self.embed_dim is None:
            self.embed_dim = self.d_target
        for name in ("intermediate_size", "embed_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"AdapterConfig: {name} must be a positive int, got {value!r}")

    @property
    def head_dim(self) -> int | None:
        return None if self.num_heads is None else self.d_target // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a dict (e.g. parsed JSON); unknown or missing keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"AdapterConfig.from_dict: expected a dict, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "format_version"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"AdapterConfig.from_dict: unknown keys {unknown}; known keys {sorted(fields)}")
        missing = [name for name in ("kind", "d_draft", "d_target") if name not in data]
        if missing:
            raise ValueError(f"AdapterConfig.from_dict: missing required keys {missing}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Save / load


def save_pretrained(adapter: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    config = getattr(adapter, "config", None)
    if not isinstance(config, AdapterConfig):
        raise ValueError(
            f"save_pretrained: adapter must have an AdapterConfig in .config, got {type(config).__name__}"
        )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter.state_dict().items()}
    # Write to temporary names then rename, so an interrupted save never leaves a half-written
    # file under the real name.
    fd, tmp_weights = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp_weights, metadata={"format": "pt", "kind": config.kind})
        os.replace(tmp_weights, os.path.join(directory, WEIGHTS_NAME))
    finally:
        if os.path.exists(tmp_weights):
            os.remove(tmp_weights)
    payload = {"format_version": FORMAT_VERSION, **config.to_dict()}
    tmp_config = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp_config, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp_config, os.path.join(directory, CONFIG_NAME))


def _read_config(directory: str) -> AdapterConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory!r}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_adapter: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"load_adapter: {path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"load_adapter: {path} has format_version {version!r}, expected {FORMAT_VERSION}")
    try:
        return AdapterConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_adapter: invalid config in {path}: {err}") from err


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory!r}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"load_adapter: {path} is not a readable safetensors file ({err})") from err


def load_adapter(
    directory: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    expected_kind: str | None = None,
) -> Adapter:
    """Load an adapter saved by ``save_pretrained``; the class is chosen by the config's ``kind``.

    The weights keep their saved dtype unless ``dtype`` is given. Raises FileNotFoundError for a
    missing file and ValueError (naming the file, key and shapes) for anything inconsistent.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_adapter: {directory!r} is not a directory")
    config = _read_config(directory)
    if expected_kind is not None and config.kind != expected_kind:
        raise ValueError(
            f"load_adapter: {directory!r} holds a {config.kind!r} adapter, expected {expected_kind!r}"
        )
    tensors = _read_weights(directory)
    adapter = build_adapter(config)
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"load_adapter: {WEIGHTS_NAME} does not match the {config.kind!r} config: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    for name in expected:  # module order, so the first mismatch reported is the first layer's
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"load_adapter: shape mismatch for {name!r}: file has {tuple(tensor.shape)}, "
                f"config {config.to_dict()} expects {tuple(expected[name].shape)}"
            )
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if dtype is None and len(float_dtypes) == 1:
        dtype = float_dtypes.pop()
    if dtype is not None:
        adapter.to(dtype=dtype)
    adapter.load_state_dict(tensors, strict=True)
    if device is not None:
        adapter.to(device=device)
    return adapter


class Adapter(nn.Module):
    """Base class: holds ``config`` and gives every adapter ``save_pretrained``/``from_pretrained``.

    ``Adapter.from_pretrained(dir)`` loads any kind; ``LinearAdapter.from_pretrained(dir)`` (etc.)
    also checks that the directory holds that kind.
    """

    kind: ClassVar[str | None] = None

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(config, AdapterConfig):
            raise ValueError(
                f"{type(self).__name__}: config must be an AdapterConfig, got {type(config).__name__}"
            )
        if self.kind is not None and config.kind != self.kind:
            raise ValueError(f"{type(self).__name__}: config.kind must be {self.kind!r}, got {config.kind!r}")
        self.config = config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Adapter:
        return load_adapter(directory, device=device, dtype=dtype, expected_kind=cls.kind)

    def _check_hidden(self, drafter_hidden: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(drafter_hidden, torch.Tensor):
            raise ValueError(f"{name}: drafter_hidden must be a tensor, got {type(drafter_hidden).__name__}")
        if drafter_hidden.dim() < 1 or drafter_hidden.shape[-1] != self.config.d_draft:
            raise ValueError(
                f"{name}: drafter_hidden must be [..., d_draft={self.config.d_draft}], "
                f"got shape {tuple(drafter_hidden.shape)}"
            )
        if not drafter_hidden.is_floating_point():
            raise ValueError(f"{name}: drafter_hidden must be floating point, got {drafter_hidden.dtype}")

    def extra_repr(self) -> str:
        return f"d_draft={self.config.d_draft}, d_target={self.config.d_target}"


# --------------------------------------------------------------------------------------------------
# Linear and bottleneck


class LinearAdapter(Adapter):
    """``Linear(d_draft, d_target)`` (L1). ``prev_tokens``/``target_hidden`` are accepted and ignored."""

    kind = "linear"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(config.d_draft, config.d_target, bias=config.bias)

    def forward(
        self,
        drafter_hidden: torch.Tensor,
        *,
        prev_tokens: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[..., d_draft] -> [..., d_target]."""
        self._check_hidden(drafter_hidden)
        return self.linear(drafter_hidden)


class BottleneckAdapter(Adapter):
    """``up(GELU(down(LayerNorm(x)))) + (x if d_draft == d_target else proj(x))`` (L2-L3).

    GELU is the exact (erf) form. ``proj`` is ``None`` when d_draft == d_target. A fused kernel reads
    ``fused_params()`` and ``norm.eps``.
    """

    kind = "bottleneck"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        self.norm = nn.LayerNorm(config.d_draft, eps=config.norm_eps)
        self.down = nn.Linear(config.d_draft, config.rank, bias=config.bias)
        self.up = nn.Linear(config.rank, config.d_target, bias=config.bias)
        self.proj = (
            None
            if config.d_draft == config.d_target
            else nn.Linear(config.d_draft, config.d_target, bias=False)
        )

    @property
    def eps(self) -> float:
        return self.norm.eps

    def fused_params(self) -> dict[str, torch.Tensor | None]:
        """The tensors of the bottleneck, for a fused kernel. Keys are always present.

        ``norm_weight``/``norm_bias`` [d_draft]; ``down_weight`` [r, d_draft], ``down_bias`` [r] or None;
        ``up_weight`` [d_target, r], ``up_bias`` [d_target] or None; ``proj_weight`` [d_target, d_draft]
        or None (identity residual).
        """
        return {
            "norm_weight": self.norm.weight,
            "norm_bias": self.norm.bias,
            "down_weight": self.down.weight,
            "down_bias": self.down.bias,
            "up_weight": self.up.weight,
            "up_bias": self.up.bias,
            "proj_weight": None if self.proj is None else self.proj.weight,
        }

    def forward(
        self,
        drafter_hidden: torch.Tensor,
        *,
        prev_tokens: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[..., d_draft] -> [..., d_target]."""
        self._check_hidden(drafter_hidden)
        residual = drafter_hidden if self.proj is None else self.proj(drafter_hidden)
        return self.up(F.gelu(self.down(self.norm(drafter_hidden)))) + residual


# --------------------------------------------------------------------------------------------------
# EAGLE-style decoder layer


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, as Llama does, so fp16/bf16 adapters stay stable.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class EagleAdapter(Adapter):
    """One pre-norm decoder layer over ``fc([drafter_hidden ⊕ embed(prev_tokens) (⊕ target_hidden)])``.

    Sequence layout: ``drafter_hidden`` [..., T, d_draft] (a 1-D [d_draft] input is one position);
    ``prev_tokens`` [..., T] int (the token *before* each position's prediction, i.e. the token the
    drafter consumed at that position); ``target_hidden`` [..., T, d_target] (L5F only). Attention is
    causal over T, positions 0..T-1 (no KV cache: callers re-run the window they need).
    Output [..., T, d_target], final-RMSNormed: ready for the target LM head.
    """

    kind = "eagle"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        d = config.d_target
        in_features = config.d_draft + config.embed_dim + (d if config.use_target_hidden else 0)
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.fc = nn.Linear(in_features, d, bias=True)
        self.input_norm = _RMSNorm(d, config.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_norm = _RMSNorm(d, config.norm_eps)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)
        self.final_norm = _RMSNorm(d, config.norm_eps)

    @torch.no_grad()
    def load_embedding(self, weight: torch.Tensor, *, freeze: bool = True) -> None:
        """Copy the target's input embedding [vocab_size, embed_dim] into ``embed`` (EAGLE reuses it)."""
        if tuple(weight.shape) != tuple(self.embed.weight.shape):
            raise ValueError(
                f"EagleAdapter.load_embedding: weight must be {tuple(self.embed.weight.shape)}, "
                f"got {tuple(weight.shape)}"
            )
        self.embed.weight.copy_(weight)
        self.embed.weight.requires_grad_(not freeze)

    def _rope(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len, head_dim = q.shape[-2], q.shape[-1]
        inv_freq = 1.0 / (
            self.config.rope_theta
            ** (torch.arange(0, head_dim, 2, device=q.device, dtype=torch.float32) / head_dim)
        )
        angles = torch.arange(seq_len, device=q.device, dtype=torch.float32)[:, None] * inv_freq[None]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def _check_inputs(
        self,
        drafter_hidden: torch.Tensor,
        prev_tokens: torch.Tensor | None,
        target_hidden: torch.Tensor | None,
    ) -> None:
        self._check_hidden(drafter_hidden)
        lead = tuple(drafter_hidden.shape[:-1])
        if prev_tokens is None:
            raise ValueError(
                "EagleAdapter: prev_tokens is required (the previous token ids, shape "
                f"{lead} = drafter_hidden.shape[:-1])"
            )
        if (
            not isinstance(prev_tokens, torch.Tensor)
            or prev_tokens.is_floating_point()
            or prev_tokens.is_complex()
        ):
            raise ValueError(
                f"EagleAdapter: prev_tokens must be an integer tensor, got "
                f"{getattr(prev_tokens, 'dtype', type(prev_tokens).__name__)}"
            )
        if tuple(prev_tokens.shape) != lead:
            raise ValueError(
                f"EagleAdapter: prev_tokens must have shape drafter_hidden.shape[:-1] = {lead}, "
                f"got {tuple(prev_tokens.shape)}"
            )
        # Range check only where it costs no device sync (CPU); on CUDA, ids must already be valid.
        if prev_tokens.device.type == "cpu" and prev_tokens.numel():
            low, high = int(prev_tokens.min()), int(prev_tokens.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"EagleAdapter: prev_tokens must be in [0, vocab_size={self.config.vocab_size}), "
                    f"got values in [{low}, {high}]"
                )
        if self.config.use_target_hidden:
            if target_hidden is None:
                raise ValueError(
                    "EagleAdapter: target_hidden is required when config.use_target_hidden=True "
                    f"(shape {lead + (self.config.d_target,)}; pass zeros where the target has none)"
                )
            if not isinstance(target_hidden, torch.Tensor) or tuple(target_hidden.shape) != lead + (
                self.config.d_target,
            ):
                raise ValueError(
                    f"EagleAdapter: target_hidden must have shape {lead + (self.config.d_target,)}, "
                    f"got {tuple(getattr(target_hidden, 'shape', ()))}"
                )
        elif target_hidden is not None:
            raise ValueError(
                "EagleAdapter: target_hidden was given but config.use_target_hidden=False "
                "(build the adapter with use_target_hidden=True to use it)"
            )

    def forward(
        self,
        drafter_hidden: torch.Tensor,
        *,
        prev_tokens: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[..., T, d_draft] (+ prev_tokens [..., T], target_hidden [..., T, d_target]) -> [..., T, d_target]."""
        self._check_inputs(drafter_hidden, prev_tokens, target_hidden)
        out_shape = drafter_hidden.shape[:-1] + (self.config.d_target,)
        if drafter_hidden.dim() == 1:
            drafter_hidden, prev_tokens = drafter_hidden[None], prev_tokens[None]
            target_hidden = None if target_hidden is None else target_hidden[None]
        seq_len = drafter_hidden.shape[-2]
        hidden = drafter_hidden.reshape(-1, seq_len, self.config.d_draft)
        parts = [hidden, self.embed(prev_tokens.reshape(-1, seq_len).long()).to(hidden.dtype)]
        if target_hidden is not None:
            parts.append(target_hidden.reshape(-1, seq_len, self.config.d_target).to(hidden.dtype))
        x = self.fc(torch.cat(parts, dim=-1))

        batch, heads, head_dim = x.shape[0], self.config.num_heads, self.config.head_dim
        h = self.input_norm(x)
        q, k, v = (
            proj(h).view(batch, seq_len, heads, head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = self._rope(q, k)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(head_dim))
        x = x + self.o_proj(attn.transpose(1, 2).reshape(batch, seq_len, self.config.d_target))
        h = self.post_attention_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.final_norm(x).reshape(out_shape)


_ADAPTER_CLASSES: dict[str, type[Adapter]] = {
    "linear": LinearAdapter,
    "bottleneck": BottleneckAdapter,
    "eagle": EagleAdapter,
}


def build_adapter(config: AdapterConfig | dict[str, Any]) -> Adapter:
    """A freshly initialised adapter of ``config.kind`` (a dict is parsed with ``AdapterConfig.from_dict``)."""
    if isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    if not isinstance(config, AdapterConfig):
        raise ValueError(
            f"build_adapter: config must be an AdapterConfig or dict, got {type(config).__name__}"
        )
    return _ADAPTER_CLASSES[config.kind](config)
