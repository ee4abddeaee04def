"""Adapters: map drafter hidden states [..., d_draft] into the target's LM-head input [..., d_target].

The drafter and the target live in different hidden spaces; an adapter projects the drafter's final
hidden state so that the *target's* LM head scores it, which puts drafts in the target vocabulary.
The kinds, with the research's labels (its offline table, Accept@0.90, in brackets):

- ``"linear"`` (``LinearAdapter``): one ``Linear(d_draft, d_target)``.
- ``"bottleneck"`` (``BottleneckAdapter``, **L1** at rank 256 [21.9 %], **L3** "wide" at rank 2048
  [24.9 %]): ``x -> up(GELU(down(LayerNorm(x)))) + residual(x)`` with width ``rank``; the residual
  is ``x`` itself when ``d_draft == d_target`` and ``proj(x)`` (bias-free Linear) otherwise. Its
  parts are attributes (``norm``, ``down``, ``up``, ``proj``) and ``fused_params()`` returns their
  tensors, so the fused ``lm_head_topk`` path can read them without knowing this module.
- ``"stacked_bottleneck"`` (``StackedBottleneckAdapter``, **L2** [23.2 %]): ``num_layers``
  bottlenecks in sequence. A chain of non-linear blocks is not one bottleneck, so it has no
  ``fused_params()`` and runs unfused; its ``blocks`` are ``BottleneckAdapter`` modules.
- ``"attention"`` (``AttentionAdapter``, **L4** [24.8 %]): a pre-norm transformer block in which the
  current drafter state attends to itself and up to ``window`` previous drafter states.
- ``"eagle"`` (``EagleAdapter``): one pre-norm transformer decoder layer (RMSNorm, causal
  self-attention with RoPE, SwiGLU MLP) over ``Linear([drafter hidden ⊕ embed(previous token)
  (⊕ target hidden)]) -> d_target``, followed by a final RMSNorm so its output goes straight into
  the target LM head (a windowed L5; L5F when ``use_target_hidden``). It has no KV cache.
- ``"b1"`` / ``"l5"`` / ``"l5f"`` (``FeatureHead`` in :mod:`crossspec_kernels.models.feature_head`,
  **B1** [61.2 %], **L5** [11.2 %], **L5F** [66.2 %]): EAGLE-style draft heads fed by the target's
  features, the event drafter's, or both; one Llama decoder layer over an HF KV cache.

``AdapterConfig.label`` carries the research label into ``adapter_config.json``;
``research_adapter_config(label)`` builds each with the dims that reproduce the research's parameter
counts at its shape (d = 4096, vocabulary 32064; see ``RESEARCH_ADAPTERS``).

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
    "ADAPTER_LABELS",
    "CONFIG_NAME",
    "FEATURE_HEAD_KINDS",
    "RESEARCH_ADAPTERS",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterConfig",
    "AttentionAdapter",
    "BottleneckAdapter",
    "EagleAdapter",
    "LinearAdapter",
    "StackedBottleneckAdapter",
    "build_adapter",
    "load_adapter",
    "num_parameters",
    "research_adapter_config",
    "save_pretrained",
]

FEATURE_HEAD_KINDS = ("b1", "l5", "l5f")
ADAPTER_KINDS = ("linear", "bottleneck", "eagle", "stacked_bottleneck", "attention", *FEATURE_HEAD_KINDS)
ADAPTER_LABELS = ("L1", "L2", "L3", "L4", "L5", "B1", "L5F")
# The kinds each research label may name: L5/L5F were EAGLE layers on drafter (+ target) features,
# which both the windowed EagleAdapter and the cached FeatureHead implement.
_LABEL_KINDS = {
    "L1": ("bottleneck",),
    "L2": ("stacked_bottleneck",),
    "L3": ("bottleneck",),
    "L4": ("attention",),
    "L5": ("l5", "eagle"),
    "B1": ("b1",),
    "L5F": ("l5f", "eagle"),
}
_DEFAULT_LABELS = {"stacked_bottleneck": "L2", "attention": "L4", "b1": "B1", "l5": "L5", "l5f": "L5F"}
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

    ``None`` fields that a kind uses are resolved to concrete values at construction, so
    ``to_dict()`` of a built config round-trips exactly.

    Args:
        kind: one of ``ADAPTER_KINDS``.
        d_draft: drafter hidden size (input). For ``"b1"`` (no drafter) it must equal d_target.
        d_target: target hidden size (output, the LM head's input).
        rank: bottleneck width r (bottleneck, stacked_bottleneck).
        vocab_size: eagle / feature heads: size of the token embedding (the target vocabulary).
        num_heads: eagle / attention / feature heads: attention heads; default picks head_dim 64
            (or another divisor of d_target).
        intermediate_size: eagle / feature heads: SwiGLU width (default 2 * d_target); attention:
            GELU MLP width (default d_target).
        embed_dim: eagle only: width of the previous-token embedding; default d_target (so the
            target's own input embedding can be copied in with ``EagleAdapter.load_embedding``).
        use_target_hidden: eagle only (L5F): also feed the target's last hidden state [..., d_target].
        bias: biases of the linear layers (linear, bottleneck, attention, the feature heads' fc).
        norm_eps: epsilon of the LayerNorms / RMSNorms.
        rope_theta: eagle / feature heads: RoPE base (feature heads: the target's).
        num_kv_heads: feature heads: key/value heads (grouped-query attention); default num_heads.
        num_layers: stacked_bottleneck: number of bottlenecks (default 3).
        window: attention: previous drafter states the current one may attend to (default 8).
        train_embedding: feature heads: train (and save) the token embedding. False (default): it is
            a frozen copy of the target's input embedding, not saved; ``load_embedding`` sets it.
        label: the research's label (``ADAPTER_LABELS``); defaults by kind where that is unambiguous
            (L2, L4, B1, L5, L5F; eagle: L5, or L5F with use_target_hidden); a bottleneck is L1 or
            L3 only when told.
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
    num_kv_heads: int | None = None
    num_layers: int | None = None
    window: int | None = None
    train_embedding: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"AdapterConfig: kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        for name in ("d_draft", "d_target", "rank"):
            self._check_positive(name)
        for name in ("use_target_hidden", "bias", "train_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AdapterConfig: {name} must be a bool, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"AdapterConfig: {name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        self._resolve_label()
        if self.kind == "eagle":
            self._resolve_eagle()
        elif self.kind == "stacked_bottleneck":
            self.num_layers = 3 if self.num_layers is None else self.num_layers
            self._check_positive("num_layers")
        elif self.kind == "attention":
            self._resolve_heads()
            self.intermediate_size = (
                self.d_target if self.intermediate_size is None else self.intermediate_size
            )
            self._check_positive("intermediate_size")
            self.window = 8 if self.window is None else self.window
            if not _is_int(self.window) or self.window < 0:
                raise ValueError(f"AdapterConfig: window must be an int >= 0, got {self.window!r}")
        elif self.kind in FEATURE_HEAD_KINDS:
            self._resolve_feature_head()

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value <= 0:
            raise ValueError(f"AdapterConfig: {name} must be a positive int, got {value!r}")

    def _resolve_label(self) -> None:
        if self.label is None:
            if self.kind == "eagle":
                self.label = "L5F" if self.use_target_hidden else "L5"
            else:
                self.label = _DEFAULT_LABELS.get(self.kind)
        if self.label is None:
            return
        if self.label not in ADAPTER_LABELS:
            raise ValueError(
                f"AdapterConfig: label must be one of {ADAPTER_LABELS} or None, got {self.label!r}"
            )
        if self.kind not in _LABEL_KINDS[self.label]:
            raise ValueError(
                f"AdapterConfig: label {self.label!r} names kind {' or '.join(map(repr, _LABEL_KINDS[self.label]))}, "
                f"got kind {self.kind!r}"
            )

    def _resolve_heads(self) -> None:
        if self.num_heads is None:
            self.num_heads = _default_num_heads(self.d_target)
        if not _is_int(self.num_heads) or self.num_heads <= 0 or self.d_target % self.num_heads:
            raise ValueError(
                f"AdapterConfig: num_heads must be a positive int dividing d_target={self.d_target}, "
                f"got {self.num_heads!r}"
            )

    def _resolve_vocab(self) -> None:
        if not _is_int(self.vocab_size) or self.vocab_size <= 0:
            raise ValueError(
                f"AdapterConfig: kind={self.kind!r} needs vocab_size (a positive int: the target "
                f"vocabulary, for the token embedding), got {self.vocab_size!r}"
            )

    def _resolve_rope_heads(self) -> None:
        self._resolve_heads()
        if (self.d_target // self.num_heads) % 2:
            raise ValueError(
                f"AdapterConfig: head_dim = d_target / num_heads must be even for RoPE, got "
                f"{self.d_target} / {self.num_heads} = {self.d_target // self.num_heads}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.d_target
        self._check_positive("intermediate_size")

    def _resolve_eagle(self) -> None:
        self._resolve_vocab()
        self._resolve_rope_heads()
        if self.embed_dim is None:
            self.embed_dim = self.d_target
        self._check_positive("embed_dim")

    def _resolve_feature_head(self) -> None:
        self._resolve_vocab()
        if self.kind == "b1" and self.d_draft != self.d_target:
            raise ValueError(
                f"AdapterConfig: kind='b1' reads the target's features only, so d_draft must equal "
                f"d_target={self.d_target}, got d_draft={self.d_draft}"
            )
        self._resolve_rope_heads()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        self._check_positive("num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AdapterConfig: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )

    @property
    def is_feature_head(self) -> bool:
        return self.kind in FEATURE_HEAD_KINDS

    @property
    def d_features(self) -> int:
        """Feature heads: width of ``features`` (b1: d_target, l5: d_draft, l5f: d_draft + d_target)."""
        if self.kind not in FEATURE_HEAD_KINDS:
            raise ValueError(
                f"AdapterConfig.d_features: only feature heads {FEATURE_HEAD_KINDS} have it, got {self.kind!r}"
            )
        return {"b1": self.d_target, "l5": self.d_draft, "l5f": self.d_draft + self.d_target}[self.kind]

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
# The research's adapters at its shape

RESEARCH_ADAPTERS: dict[str, dict[str, Any]] = {
    # 2 * 4096 * 256 + LayerNorm + biases = 2.11M
    "L1": {"kind": "bottleneck", "rank": 256, "params": "2.1M"},
    # three L1 blocks = 6.33M
    "L2": {"kind": "stacked_bottleneck", "rank": 256, "num_layers": 3, "params": "6.3M"},
    # 2 * 4096 * 2048 = 16.8M (the table says 16M)
    "L3": {"kind": "bottleneck", "rank": 2048, "params": "16M"},
    # q, k, v, o (4 d^2) + a 4096-wide GELU MLP (2 d^2) = 100.7M
    "L4": {"kind": "attention", "num_heads": 32, "intermediate_size": 4096, "window": 8, "params": "101M"},
    # fc (2d -> d) + attention (4 d^2) = 100.7M leaves 2.2M for the MLP: the research's head had a
    # rank-256 bottleneck there; a SwiGLU of width 176 has the same size. = 102.9M
    "L5": {"kind": "l5", "num_heads": 32, "intermediate_size": 176, "params": "103M"},
    "B1": {"kind": "b1", "num_heads": 32, "intermediate_size": 176, "params": "103M"},
    # fc (3d -> d) + attention + SwiGLU of width 4272 = 170.0M
    "L5F": {"kind": "l5f", "num_heads": 32, "intermediate_size": 4272, "params": "170M"},
}
"""Per research label: the kind and widths that give the research table's parameter count
(``params``) at d = 4096. Feature heads are counted without their token embedding (a frozen copy of
the target's, never saved: ``num_parameters``)."""


def research_adapter_config(label: str, d: int = 4096, vocab: int = 32064, **overrides: Any) -> AdapterConfig:
    """The ``AdapterConfig`` of research adapter ``label`` ("L1".."L5", "B1", "L5F").

    ``d`` is both the drafter's and the target's hidden size (the research's Vicuna-7B-sized
    models: 4096), ``vocab`` the target vocabulary (32064, used by the feature heads). Other sizes
    keep the preset's widths; ``overrides`` (e.g. ``num_heads=``, ``d_draft=``) win.
    """
    if label not in RESEARCH_ADAPTERS:
        raise ValueError(
            f"research_adapter_config: label must be one of {tuple(RESEARCH_ADAPTERS)}, got {label!r}"
        )
    settings = {k: v for k, v in RESEARCH_ADAPTERS[label].items() if k != "params"}
    settings.update(label=label, d_draft=d, d_target=d)
    if settings["kind"] in FEATURE_HEAD_KINDS:
        settings["vocab_size"] = vocab
    settings.update(overrides)
    return AdapterConfig(**settings)


def num_parameters(adapter: nn.Module, *, include_embedding: bool = False) -> int:
    """Parameters of an adapter; a feature head's frozen copy of the target embedding (the keys in
    ``state_keys_not_saved()``) is left out unless ``include_embedding``."""
    skipped = set() if include_embedding else set(_keys_not_saved(adapter))
    return sum(p.numel() for name, p in adapter.named_parameters() if name not in skipped)


def _keys_not_saved(adapter: nn.Module) -> tuple[str, ...]:
    keys = getattr(adapter, "state_keys_not_saved", None)
    return tuple(keys()) if callable(keys) else ()


# --------------------------------------------------------------------------------------------------
# Save / load


def save_pretrained(adapter: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` into ``directory`` (created if needed).

    A feature head's frozen token embedding (a copy of the target's) is not written.
    """
    from safetensors.torch import save_file

    config = getattr(adapter, "config", None)
    if not isinstance(config, AdapterConfig):
        raise ValueError(
            f"save_pretrained: adapter must have an AdapterConfig in .config, got {type(config).__name__}"
        )
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"save_pretrained: directory {directory!r} exists and is not a directory (it is a file); "
            "pass a new or existing directory path"
        )
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:  # a parent component is a file
        raise ValueError(
            f"save_pretrained: cannot create directory {directory!r}: a component of the path is a file "
            f"({error.strerror})"
        ) from error
    skipped = set(_keys_not_saved(adapter))
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in adapter.state_dict().items()
        if name not in skipped
    }
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
    expected_kind: str | tuple[str, ...] | None = None,
) -> Adapter:
    """Load an adapter saved by ``save_pretrained``; the class is chosen by the config's ``kind``.

    The weights keep their saved dtype unless ``dtype`` is given. ``expected_kind`` (a kind or a
    tuple of kinds) rejects other kinds. Raises FileNotFoundError for a missing file and ValueError
    (naming the file, key and shapes) for anything inconsistent. A feature head comes back without
    its token embedding (``embedding_loaded == False``): call ``head.load_embedding(
    target.get_input_embeddings().weight)`` before running it.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_adapter: {directory!r} is not a directory")
    config = _read_config(directory)
    kinds = (expected_kind,) if isinstance(expected_kind, str) else expected_kind
    if kinds is not None and config.kind not in kinds:
        wanted = repr(kinds[0]) if len(kinds) == 1 else f"one of {kinds}"
        raise ValueError(f"load_adapter: {directory!r} holds a {config.kind!r} adapter, expected {wanted}")
    tensors = _read_weights(directory)
    adapter = build_adapter(config)
    skipped = set(_keys_not_saved(adapter))
    expected = {k: v for k, v in adapter.state_dict().items() if k not in skipped}
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
    adapter.load_state_dict(tensors, strict=not skipped)
    if skipped:
        adapter.embedding_loaded = False
    if device is not None:
        adapter.to(device=device)
    return adapter


class Adapter(nn.Module):
    """Base class: holds ``config`` and gives every adapter ``save_pretrained``/``from_pretrained``.

    ``Adapter.from_pretrained(dir)`` loads any kind; ``LinearAdapter.from_pretrained(dir)`` (etc.)
    also checks that the directory holds that kind.
    """

    kind: ClassVar[str | tuple[str, ...] | None] = None

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(config, AdapterConfig):
            raise ValueError(
                f"{type(self).__name__}: config must be an AdapterConfig, got {type(config).__name__}"
            )
        kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
        if kinds is not None and config.kind not in kinds:
            wanted = repr(kinds[0]) if len(kinds) == 1 else f"one of {kinds}"
            raise ValueError(f"{type(self).__name__}: config.kind must be {wanted}, got {config.kind!r}")
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

    def _check_hidden(self, drafter_hidden: torch.Tensor, name: str = "drafter_hidden") -> None:
        owner = type(self).__name__
        if not isinstance(drafter_hidden, torch.Tensor):
            raise ValueError(f"{owner}: {name} must be a tensor, got {type(drafter_hidden).__name__}")
        if drafter_hidden.dim() < 1 or drafter_hidden.shape[-1] != self.config.d_draft:
            raise ValueError(
                f"{owner}: {name} must be [..., d_draft={self.config.d_draft}], "
                f"got shape {tuple(drafter_hidden.shape)}"
            )
        if not drafter_hidden.is_floating_point():
            raise ValueError(f"{owner}: {name} must be floating point, got {drafter_hidden.dtype}")

    def extra_repr(self) -> str:
        label = f", label={self.config.label}" if self.config.label else ""
        return f"d_draft={self.config.d_draft}, d_target={self.config.d_target}{label}"


# --------------------------------------------------------------------------------------------------
# Linear and bottleneck


class LinearAdapter(Adapter):
    """``Linear(d_draft, d_target)``. ``prev_tokens``/``target_hidden`` are accepted and ignored."""

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
    """``up(GELU(down(LayerNorm(x)))) + (x if d_draft == d_target else proj(x))`` (L1, L3).

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


class StackedBottleneckAdapter(Adapter):
    """``num_layers`` bottlenecks in sequence (L2): d_draft -> d_target, then d_target -> d_target.

    No ``fused_params()``: the stack is not one bottleneck, so it runs unfused; ``blocks[i]`` are
    ``BottleneckAdapter`` modules (each with ``fused_params()``) for an op that chains them.
    """

    kind = "stacked_bottleneck"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        sizes = [config.d_draft] + [config.d_target] * config.num_layers
        self.blocks = nn.ModuleList(
            BottleneckAdapter(
                AdapterConfig(
                    kind="bottleneck",
                    d_draft=d_in,
                    d_target=d_out,
                    rank=config.rank,
                    bias=config.bias,
                    norm_eps=config.norm_eps,
                )
            )
            for d_in, d_out in zip(sizes[:-1], sizes[1:])
        )

    def forward(
        self,
        drafter_hidden: torch.Tensor,
        *,
        prev_tokens: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[..., d_draft] -> [..., d_target]."""
        self._check_hidden(drafter_hidden)
        hidden = drafter_hidden
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class AttentionAdapter(Adapter):
    """A pre-norm transformer block in which the current drafter state attends to a window (L4).

    The current state ``drafter_hidden`` [..., d_draft] attends to itself and to ``context``
    [..., W, d_draft] (W <= window: the drafter's previous final-norm states of the same sequence,
    oldest first); ``context_mask`` [..., W] bool marks the present ones (False = absent, e.g. at
    the start of a sequence). Without ``context`` the window is the current state alone, so the
    adapter is a plain ``[..., d_draft] -> [..., d_target]`` map, which is how an engine that only
    keeps the current position runs it. Each input is projected to d_target (``in_proj``, when
    d_draft != d_target) and gets a learned embedding of its distance to the current state::

        x = in(h) + dist[0];  c_j = in(context_j) + dist[W - j]
        y = x + o(MHA(query LN1(x), keys/values LN1([c ; x])))
        out = y + fc2(GELU(fc1(LN2(y))))                                   [..., d_target]
    """

    kind = "attention"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        d = config.d_target
        self.in_proj = None if config.d_draft == d else nn.Linear(config.d_draft, d, bias=config.bias)
        # Zero init: before training, every window position looks the same to the attention.
        self.distance_embed = nn.Parameter(torch.zeros(config.window + 1, d))
        self.attn_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.mlp_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.fc1 = nn.Linear(d, config.intermediate_size, bias=config.bias)
        self.fc2 = nn.Linear(config.intermediate_size, d, bias=config.bias)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.in_proj is None else self.in_proj(hidden)

    def _keys(
        self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys/values input [..., S, d] (context then the current state) and visibility [..., S]."""
        lead = tuple(x.shape[:-1])
        if context is None:
            if context_mask is not None:
                raise ValueError("AttentionAdapter: context_mask was given without context")
            return x[..., None, :], None
        self._check_hidden(context, "context")
        width = context.shape[-2] if context.dim() >= 2 else -1
        if tuple(context.shape[:-2]) != lead or not 0 <= width <= self.config.window:
            raise ValueError(
                f"AttentionAdapter: context must be [..., W, d_draft] with leading dims {lead} and "
                f"W <= window={self.config.window}, got shape {tuple(context.shape)}"
            )
        distance = self.distance_embed[1 : width + 1].flip(0).to(context.dtype)  # oldest first
        keys = torch.cat([self._project(context) + distance, x[..., None, :]], dim=-2)
        if context_mask is None:
            return keys, None
        if not isinstance(context_mask, torch.Tensor) or tuple(context_mask.shape) != lead + (width,):
            raise ValueError(
                f"AttentionAdapter: context_mask must be a bool tensor of shape {lead + (width,)}, "
                f"got {tuple(getattr(context_mask, 'shape', ()))}"
            )
        current = torch.ones(lead + (1,), dtype=torch.bool, device=context_mask.device)
        return keys, torch.cat([context_mask.to(torch.bool), current], dim=-1)

    def forward(
        self,
        drafter_hidden: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        prev_tokens: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[..., d_draft] (+ context [..., W, d_draft], context_mask [..., W]) -> [..., d_target]."""
        self._check_hidden(drafter_hidden)
        cfg = self.config
        lead = tuple(drafter_hidden.shape[:-1])
        x = self._project(drafter_hidden) + self.distance_embed[0].to(drafter_hidden.dtype)
        keys, visible = self._keys(x, context, context_mask)
        heads, head_dim = cfg.num_heads, cfg.d_target // cfg.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [..., S, d] -> [N, heads, S, head_dim]
            return t.reshape(-1, t.shape[-2], heads, head_dim).transpose(1, 2)

        normed = self.attn_norm(keys)  # the current state is the last key and the only query
        q = split_heads(self.q_proj(normed[..., -1:, :]))
        k, v = split_heads(self.k_proj(normed)), split_heads(self.v_proj(normed))
        mask = None if visible is None else visible.reshape(-1, 1, 1, visible.shape[-1])
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(head_dim))
        y = x + self.o_proj(attn.transpose(1, 2).reshape(lead + (cfg.d_target,)))
        return y + self.fc2(F.gelu(self.fc1(self.mlp_norm(y))))


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
    "stacked_bottleneck": StackedBottleneckAdapter,
    "attention": AttentionAdapter,
}


def build_adapter(config: AdapterConfig | dict[str, Any]) -> Adapter:
    """A freshly initialised adapter of ``config.kind`` (a dict is parsed with ``AdapterConfig.from_dict``)."""
    if isinstance(config, dict):
        config = AdapterConfig.from_dict(config)
    if not isinstance(config, AdapterConfig):
        raise ValueError(
            f"build_adapter: config must be an AdapterConfig or dict, got {type(config).__name__}"
        )
    if config.kind in FEATURE_HEAD_KINDS:
        # Imported here: feature_head imports this module (and transformers), adapters stay light.
        from crossspec_kernels.models.feature_head import FeatureHead

        return FeatureHead(config)
    return _ADAPTER_CLASSES[config.kind](config)
