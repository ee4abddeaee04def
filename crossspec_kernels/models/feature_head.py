"""EAGLE-style draft heads fed by features: B1 (the target's), L5 (the event drafter's), L5F (both).

One class, ``FeatureHead``, for the three kinds. At sequence position t it reads a feature vector and
the *next* token (EAGLE's alignment)::

    x_t   = fc(concat[features_t ; embed(tokens_t)])          tokens_t = the token after feature t
    h_t   = LlamaDecoderLayer(x_t)    causal self-attention, RoPE at position_ids_t, HF KV cache
    out_t = RMSNorm(h_t)                                                      [..., d_target]

``out_t`` predicts the target's feature at position t+1; the *target's* LM head scores it (the head
has none of its own), so its argmax is the draft for the token after ``tokens_t``.

A *feature* is a final-norm last hidden state (HF ``last_hidden_state``) at a token position:
``f_t`` is the target's after reading tokens 0..t (``f_t @ W_lm^T`` are its logits for token t+1),
``g_t`` the drafter's after its prompt and the same tokens. So for a sequence x_0..x_n the head is
fed ``features = f_0..f_{n-1}``, ``tokens = x_1..x_n`` and its outputs are trained towards
``f_1..f_n``. Per kind, ``features`` is

- ``"b1"``: target features [.., d_target];
- ``"l5"``: drafter features [.., d_draft];
- ``"l5f"``: ``concat[drafter ; target]`` [.., d_draft + d_target], drafter first.

Drafting after a verification that committed x_0..x_n (x_n the bonus token, whose feature the target
has not computed yet): the head has consumed (f_j, x_{j+1}) for j < n; its output at position n-1
scores draft d_1; then it rolls on its own prediction: (out_{n-1}, d_1) at position n scores d_2,
and so on. For L5F the drafter half of later steps is the drafter's real feature of the draft
tokens, the target half the head's prediction; L5 reads real drafter features at every step.
:func:`rollout` runs that for every position of a sequence at once (training-time rollout and
offline evaluation).

Built from transformers' own ``LlamaDecoderLayer``, ``LlamaRotaryEmbedding`` and ``LlamaRMSNorm``
over a ``LlamaConfig`` the head owns (``head.llama_config``), so any registered HF attention
implementation runs it and extra ``**attention_kwargs`` reach the attention function unchanged.
Works with transformers 4.57 and 5.x.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from crossspec_kernels.models.adapters import FEATURE_HEAD_KINDS, Adapter, AdapterConfig

__all__ = ["FeatureHead", "Rollout", "feature_head_config", "rollout", "rollout_mask"]


def _llama_config(config: AdapterConfig):
    from transformers import LlamaConfig

    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_target,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    # A bare config has no attention implementation resolved yet (4.57 fails on None).
    llama._attn_implementation = "sdpa"
    return llama


@functools.cache
def _layer_takes_cache_position() -> bool:
    # transformers 4.57's decoder layer takes cache_position (its caches want it); 5.x dropped it.
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return "cache_position" in inspect.signature(LlamaDecoderLayer.forward).parameters


def _target_rope_theta(text_config: Any) -> float:
    rope = getattr(text_config, "rope_parameters", None)  # transformers 5
    if isinstance(rope, dict) and rope.get("rope_theta"):
        return float(rope["rope_theta"])
    return float(getattr(text_config, "rope_theta", None) or 10000.0)


def feature_head_config(target_config: Any, kind: str = "b1", **overrides: Any) -> AdapterConfig:
    """The ``AdapterConfig`` of a feature head whose decoder layer mirrors the target's.

    ``target_config``: the target's config (a VLM's ``text_config`` is used when present, e.g.
    Video-LLaVA's). Copies hidden size, vocabulary, attention and kv heads, MLP width, RMSNorm eps
    and RoPE base. ``overrides`` win: ``d_draft=`` (the event drafter's hidden size) is needed for
    "l5"/"l5f" when it differs from the target's; ``intermediate_size=`` shrinks the head.
    """
    if kind not in FEATURE_HEAD_KINDS:
        raise ValueError(f"feature_head_config: kind must be one of {FEATURE_HEAD_KINDS}, got {kind!r}")
    text = getattr(target_config, "text_config", None) or target_config
    for name in ("hidden_size", "vocab_size", "num_attention_heads", "intermediate_size"):
        if not isinstance(getattr(text, name, None), int):
            raise ValueError(
                f"feature_head_config: target_config has no int {name!r} (got {type(text).__name__}); "
                "pass the target's HF config"
            )
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if head_dim * heads != text.hidden_size:
        raise ValueError(
            f"feature_head_config: the head needs head_dim * num_attention_heads == hidden_size, the target "
            f"has {head_dim} * {heads} != {text.hidden_size}; pass num_heads= in overrides"
        )
    settings = dict(
        kind=kind,
        d_target=text.hidden_size,
        d_draft=text.hidden_size,
        vocab_size=text.vocab_size,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        intermediate_size=text.intermediate_size,
        norm_eps=float(getattr(text, "rms_norm_eps", 1e-5)),
        rope_theta=_target_rope_theta(text),
    )
    settings.update(overrides)
    return AdapterConfig(**settings)


class FeatureHead(Adapter):
    """EAGLE-style draft head (kinds "b1", "l5", "l5f"); the module docstring has the math.

    Parts: ``embed_tokens`` (the target's input embedding: frozen, not saved unless
    ``config.train_embedding``; set it with ``load_embedding``), ``fc`` (Linear(d_features +
    d_target -> d_target)), ``layer`` (``LlamaDecoderLayer``), ``norm`` (``LlamaRMSNorm``),
    ``rotary_emb`` (``LlamaRotaryEmbedding``).
    """

    kind = FEATURE_HEAD_KINDS

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        self.llama_config = _llama_config(config)
        d = config.d_target
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_tokens.weight.requires_grad_(config.train_embedding)
        self.fc = nn.Linear(config.d_features + d, d, bias=config.bias)
        self.layer = LlamaDecoderLayer(self.llama_config, layer_idx=0)
        self.norm = LlamaRMSNorm(d, eps=config.norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=self.llama_config)
        # A fresh head's embedding is random, which is fine for tests; load_adapter sets this to
        # False when the embedding was not saved, so a forward refuses to run on garbage ids.
        self.embedding_loaded = True

    def state_keys_not_saved(self) -> tuple[str, ...]:
        """State-dict keys ``save_pretrained`` leaves out: the frozen copy of the target embedding."""
        return () if self.config.train_embedding else ("embed_tokens.weight",)

    @torch.no_grad()
    def load_embedding(self, weight: torch.Tensor, *, share: bool = False) -> None:
        """Set the token embedding to the target's input embedding [vocab_size, d_target].

        Copies ``weight`` into the head's dtype and device; ``share=True`` uses the tensor itself
        (no second copy of a 0.5 GB table at 7B shape; it must have the head's dtype and device).
        """
        expected = (self.config.vocab_size, self.config.d_target)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            raise ValueError(
                f"FeatureHead.load_embedding: weight must be the target's input embedding "
                f"[vocab_size, d_target] = {list(expected)}, got {list(getattr(weight, 'shape', []))}"
            )
        trainable = self.config.train_embedding
        current = self.embed_tokens.weight
        if share:
            if weight.dtype != current.dtype or weight.device != current.device:
                raise ValueError(
                    f"FeatureHead.load_embedding: share=True needs weight on {current.device} as "
                    f"{current.dtype}, got {weight.device} {weight.dtype}"
                )
            self.embed_tokens.weight = nn.Parameter(weight.detach(), requires_grad=trainable)
        else:
            current.copy_(weight.detach().to(device=current.device, dtype=current.dtype))
        self.embedding_loaded = True

    def set_attn_implementation(self, name: str) -> None:
        """Run the layer's attention through HF implementation ``name`` ("sdpa" by default)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if name != "eager" and name not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"FeatureHead.set_attn_implementation: name must be 'eager' or a registered HF attention "
                f"implementation {sorted(ALL_ATTENTION_FUNCTIONS.keys())}, got {name!r}"
            )
        self.llama_config._attn_implementation = name

    # ----------------------------------------------------------------------------------------------

    def _check_inputs(self, features, tokens, position_ids, attention_mask, past_len: int) -> None:
        cfg = self.config
        name = f"FeatureHead({cfg.kind})"
        if not self.embedding_loaded:
            raise ValueError(
                f"{name}: the token embedding was not saved with the head; call "
                "head.load_embedding(target.get_input_embeddings().weight) first"
            )
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(
                f"{name}: tokens must be an integer tensor [B, T] (the token after each feature), got "
                f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}"
            )
        batch, width = tokens.shape
        what = {
            "b1": f"the target's features (d_target={cfg.d_target})",
            "l5": f"the event drafter's features (d_draft={cfg.d_draft})",
            "l5f": f"concat[drafter features (d_draft={cfg.d_draft}) ; target features "
            f"(d_target={cfg.d_target})]: an l5f head needs both",
        }[cfg.kind]
        if (
            not isinstance(features, torch.Tensor)
            or tuple(features.shape) != (batch, width, cfg.d_features)
            or not features.is_floating_point()
        ):
            raise ValueError(
                f"{name}: features must be a float tensor [B, T, {cfg.d_features}] = "
                f"{[batch, width, cfg.d_features]}, {what}; got "
                f"{getattr(features, 'dtype', type(features).__name__)} {tuple(getattr(features, 'shape', ()))}"
            )
        if (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.is_floating_point()
            or tuple(position_ids.shape) not in ((batch, width), (1, width))
        ):
            raise ValueError(
                f"{name}: position_ids must be an integer tensor [B, T] = {[batch, width]} (or [1, T]), "
                f"got {getattr(position_ids, 'dtype', type(position_ids).__name__)} "
                f"{tuple(getattr(position_ids, 'shape', ()))}"
            )
        if tokens.device.type == "cpu" and tokens.numel():  # range check only where it costs no sync
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= cfg.vocab_size:
                raise ValueError(
                    f"{name}: tokens must be in [0, vocab_size={cfg.vocab_size}), got values in [{low}, {high}]"
                )
        if attention_mask is None:
            return
        kv_len = past_len + width
        shape = tuple(getattr(attention_mask, "shape", ()))
        if not isinstance(attention_mask, torch.Tensor) or len(shape) not in (2, 4):
            raise ValueError(
                f"{name}: attention_mask must be None, 2-D [B, past + T] or 4-D bool [B, 1, T, L], got {shape}"
            )
        if len(shape) == 2 and shape != (batch, kv_len):
            raise ValueError(
                f"{name}: 2-D attention_mask must be [B, past + T] = [{batch}, {kv_len}], got {shape}"
            )
        if len(shape) == 4 and (
            attention_mask.dtype != torch.bool or shape[0] not in (1, batch) or shape[1:3] != (1, width)
        ):
            raise ValueError(
                f"{name}: 4-D attention_mask must be bool [B, 1, T, L] = [{batch}, 1, {width}, L] "
                f"(True = visible), got {attention_mask.dtype} {shape}"
            )

    def _attention_mask(self, attention_mask, batch: int, width: int, past_len: int, dtype, device):
        """The 4-D mask the layer gets: causal among the T new positions, every cached one visible,
        2-D padding applied; a 4-D bool mask is used as given. Additive for "eager"."""
        if attention_mask is None or attention_mask.dim() == 2:
            kv = torch.arange(past_len + width, device=device)
            query = torch.arange(past_len, past_len + width, device=device)
            mask = (kv[None, :] <= query[:, None])[None, None]
            if attention_mask is not None:
                mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
            mask = mask.expand(batch, 1, width, past_len + width)
        else:
            mask = attention_mask
        if self.llama_config._attn_implementation == "eager":  # eager adds the mask to the scores
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        return mask

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        **attention_kwargs: Any,
    ) -> torch.Tensor:
        """Predicted next features [B, T, d_target], final-RMSNormed: score them with the target's LM head.

        Args:
            features: [B, T, d_features], feature of token t at position t (b1: target, l5: drafter,
                l5f: concat[drafter ; target]).
            tokens: [B, T] int, the token *after* each feature (token t+1 at position t).
            position_ids: [B, T] (or [1, T]) RoPE positions: t when the sequence starts at 0; the
                engine passes its committed length plus offsets.
            past_key_values: an HF ``Cache`` (``DynamicCache()``, or any Cache-like object with
                ``update`` and ``get_seq_length``) holding the head's earlier positions; updated in
                place. None = no cache.
            attention_mask: None (causal over the new positions, every cached one visible), 2-D
                [B, past + T] (1 = real, HF padding form) or 4-D bool [B or 1, 1, T, L] (True =
                visible; trees, rollouts, or a cache whose kv length L is not past + T).
            **attention_kwargs: handed to the attention function unchanged.
        """
        past_len = 0 if past_key_values is None else int(past_key_values.get_seq_length(0))
        self._check_inputs(features, tokens, position_ids, attention_mask, past_len)
        batch, width = tokens.shape
        mask = self._attention_mask(
            attention_mask, batch, width, past_len, self.fc.weight.dtype, tokens.device
        )
        return self.run(features, tokens, position_ids, past_key_values, mask, **attention_kwargs)

    def run(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache_position: torch.Tensor | None = None,
        **attention_kwargs: Any,
    ) -> torch.Tensor:
        """``forward`` without checks or mask building, for callers that did both (the engine).

        ``attention_mask`` goes to the attention function as is (the engine passes None with an
        attention plan in ``attention_kwargs``); ``cache_position`` [T] (transformers 4.57 only)
        defaults to the positions after the cache's length.
        """
        dtype = self.fc.weight.dtype
        embeds = self.embed_tokens(tokens).to(dtype)
        hidden = self.fc(torch.cat([features.to(dtype), embeds], dim=-1))
        batch, width = tokens.shape
        position_ids = position_ids.expand(batch, -1)
        extra = {}
        if _layer_takes_cache_position():
            if cache_position is None:
                past_len = 0 if past_key_values is None else int(past_key_values.get_seq_length(0))
                cache_position = torch.arange(past_len, past_len + width, device=hidden.device)
            extra["cache_position"] = cache_position
        hidden = self.layer(
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            position_embeddings=self.rotary_emb(hidden, position_ids),
            **extra,
            **attention_kwargs,
        )
        return self.norm(hidden)

    def extra_repr(self) -> str:
        cfg = self.config
        return f"kind={cfg.kind}, label={cfg.label}, d_features={cfg.d_features}, d_target={cfg.d_target}"


# --------------------------------------------------------------------------------------------------
# Rollout: every position's draft chain at once


class Rollout(NamedTuple):
    """Outputs of :func:`rollout`: one entry per step 0..steps.

    ``features[s]`` [B, T, d_target]: the head's predicted features at step s; ``logits[s]``
    [B, T, V] (the LM head applied to them) or None when no LM head was given. Step s at position p
    is the (s+1)-th draft of the chain that starts from the real inputs at position p - s; rows
    p < s have no such chain (their values are meaningless: mask them).
    """

    features: list[torch.Tensor]
    logits: list[torch.Tensor] | None


def rollout_mask(width: int, step: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Visibility [1, 1, T, (step + 1) T] of rollout step ``step`` over the steps 0..step in the cache.

    Step 0 holds the real inputs at positions 0..T-1; step s >= 1 at index p holds the s-th rolled
    input of the chain that left the real inputs at p - s. So step ``step``'s query p sees step 0 up
    to p - step and, in each step s = 1..step, only index p - step + s (its own chain).
    """
    query = torch.arange(width, device=device)[:, None]
    key = torch.arange(width, device=device)[None, :]
    parts = [key <= query - step] + [key == query - step + s for s in range(1, step + 1)]
    return torch.cat(parts, dim=-1)[None, None]


def _lm_logits(lm_head: nn.Module | torch.Tensor | Callable, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(lm_head, torch.Tensor):
        return F.linear(hidden, lm_head.to(hidden.dtype))
    return lm_head(hidden)


def rollout(
    head: FeatureHead,
    features: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    lm_head: nn.Module | torch.Tensor | Callable | None = None,
    *,
    position_ids: torch.Tensor | None = None,
) -> Rollout:
    """Run the head ``steps`` steps past teacher forcing, at every position at once.

    Step 0 is the teacher-forced forward on (``features``, ``tokens``). Step s >= 1 reads, at
    position p, step s-1's prediction at p - 1 as its target feature (l5f: next to the real drafter
    feature; l5 reads real drafter features only, so all its steps equal step 0) and the real token
    ``tokens[:, p]``, and attends to the real inputs up to p - s and to its own chain
    (``rollout_mask``). Every step predicts the same targets as step 0 (the feature at p + 1), so
    step s at p is what the engine's (s+1)-th draft would be had the first s drafts been the real
    tokens: with greedy drafting over the target's own greedy tokens that is exactly the condition
    under which the draft is looked at. Gradients flow through every step (EAGLE-3/HASS training).

    ``lm_head``: the target's LM head (a module, a callable, or its weight [V, d_target]); when
    given, ``logits`` holds it applied to each step's features.
    """
    from transformers import DynamicCache

    if not isinstance(head, FeatureHead):
        raise ValueError(f"rollout: head must be a FeatureHead, got {type(head).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"rollout: steps must be an int >= 0, got {steps!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"rollout: tokens must be [B, T], got {tuple(getattr(tokens, 'shape', ()))}")
    batch, width = tokens.shape
    if position_ids is None:
        position_ids = torch.arange(width, device=tokens.device)[None].expand(batch, -1)
    cache = DynamicCache()
    out = head(features, tokens, position_ids, past_key_values=cache)
    outputs = [out]
    kind, d_draft = head.config.kind, head.config.d_draft
    for step in range(1, steps + 1):
        if kind == "l5":
            outputs.append(out)
            continue
        shifted = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        step_features = (
            shifted if kind == "b1" else torch.cat([features[..., :d_draft].to(shifted.dtype), shifted], -1)
        )
        mask = rollout_mask(width, step, tokens.device)
        out = head(step_features, tokens, position_ids, past_key_values=cache, attention_mask=mask)
        outputs.append(out)
    logits = None if lm_head is None else [_lm_logits(lm_head, h) for h in outputs]
    return Rollout(outputs, logits)
