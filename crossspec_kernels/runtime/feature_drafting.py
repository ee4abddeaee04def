"""A feature head's side of a round (B1: EAGLE fed by the target's own features).

The head (``models.feature_head.FeatureHead``) reads, at each position, the target's feature of
a committed token next to the token after it, and predicts the next feature; the target's LM head
scores the prediction. Its KV cache is a ``SlotCache`` that mirrors the target's, one slot shorter:
head slot s holds (target feature at slot s, token at slot s + 1), so the RoPE positions, the left
padding and the per-row lengths line up with the target's (``head length = target length - 1``).

Per request:

1. ``prefill``: after the target's prefill, the head reads the prompt: features f_0..f_{T-2} with
   tokens x_1..x_{T-1}. Its output at the last slot scores nothing yet: the first round's drafts
   come from the event drafter (prefill hiding), or there are none.
2. After every verification (``Verdict.features``): the head reads the round's root and accepted
   nodes with the tokens after them (the accepted drafts and the bonus), ``accepted + 1`` entries
   per row; its output at the last one scores draft 1.
3. Drafting rolls the head on its own predictions: chain step k reads (output k-1, draft k).
   Those entries use predicted features, so after verification the head rolls back to its
   committed length and reads the target's real features instead (EAGLE), accepted or not.

Chains, dynamic trees (``DraftModel.tree``: a node is expanded with the output that scored it)
and sampled chains are ``DraftModel``'s, unchanged; only what a forward reads differs. An
optional reduced draft vocabulary (``draft_vocab``: the N ids the head may propose) cuts the LM
head's cost; it stays lossless because verification always uses the full target distribution.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from crossspec_kernels.models.feature_head import FeatureHead
from crossspec_kernels.runtime.drafting import DraftModel, Pending
from crossspec_kernels.runtime.runner import ModelRunner
from crossspec_kernels.runtime.stages import StageTimer

_OP = "CrossSpecEngine"


class HeadDecoder(torch.nn.Module):
    """A ``FeatureHead`` behind the calling convention ``ModelRunner`` drives (an HF base decoder
    returning ``last_hidden_state``); ``features`` travels as an extra input."""

    def __init__(self, head: FeatureHead) -> None:
        super().__init__()
        self.head = head
        self.config = head.llama_config

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.head.embed_tokens

    def forward(
        self,
        input_ids,
        position_ids,
        past_key_values,
        attention_mask=None,
        use_cache=True,
        return_dict=True,
        *,
        features: torch.Tensor,
        cache_position=None,
        **attention_kwargs,
    ):
        # The engine's attention plan (in attention_kwargs) holds the mask: the layer gets none.
        hidden = self.head.run(
            features,
            input_ids,
            position_ids,
            past_key_values,
            None,
            cache_position=cache_position,
            **attention_kwargs,
        )
        return SimpleNamespace(last_hidden_state=hidden)


def check_feature_head(head, target, draft_vocab) -> torch.Tensor | None:
    """A B1 head for this target; ``draft_vocab`` (or None) as a sorted unique int64 id tensor."""
    if not isinstance(head, FeatureHead):
        raise ValueError(
            f"{_OP}: feature_head must be a FeatureHead (models.feature_head), got {type(head).__name__}"
        )
    config = head.config
    if config.kind != "b1":
        raise ValueError(
            f"{_OP}: feature_head of kind {config.kind!r} is not run by the engine yet (it drafts from "
            "the event drafter's features at every step); only 'b1' heads draft in the engine"
        )
    embedding = target.get_input_embeddings().weight
    lm_head = target.get_output_embeddings().weight
    if (config.vocab_size, config.d_target) != tuple(lm_head.shape):
        raise ValueError(
            f"{_OP}: feature_head is for vocab_size={config.vocab_size}, d_target={config.d_target}; the "
            f"target's LM head is {list(lm_head.shape)} [vocab, hidden]"
        )
    if not head.embedding_loaded:
        head.load_embedding(embedding)  # the head's token embedding is the target's (not saved)
    parameter = next(head.parameters())
    if parameter.device != lm_head.device:
        raise ValueError(
            f"{_OP}: feature_head is on {parameter.device} but the target is on {lm_head.device}"
        )
    if draft_vocab is None:
        return None
    ids = torch.as_tensor(draft_vocab)
    if ids.dim() != 1 or ids.is_floating_point() or ids.numel() == 0:
        raise ValueError(
            f"{_OP}: draft_vocab must be a non-empty 1-D list of token ids, got shape {tuple(ids.shape)}"
        )
    ids = ids.to(torch.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(
            f"{_OP}: draft_vocab ids must lie in [0, {config.vocab_size}), got values in [{low}, {high}]"
        )
    unique = torch.unique(ids)  # sorted
    if unique.numel() != ids.numel():
        raise ValueError(f"{_OP}: draft_vocab has repeated ids")
    return unique.to(lm_head.device)


class FeatureDraftModel(DraftModel):
    """``DraftModel`` over a feature head: reads the target's features, drafts in the target's vocabulary.

    Args:
        runner: a ModelRunner over ``HeadDecoder(head)`` (its cache allocated like the target's).
        lm_head_weight: the target's LM head [V, d].
        draft_vocab: None, or sorted ids [N] the head may propose (scored against those rows only).
    """

    reads_sources = True

    def __init__(
        self,
        runner: ModelRunner,
        lm_head_weight: torch.Tensor,
        timer: StageTimer,
        backend: str | None = None,
        draft_vocab: torch.Tensor | None = None,
    ) -> None:
        super().__init__(runner, None, lm_head_weight, timer, backend)
        self.draft_vocab = draft_vocab
        if draft_vocab is not None:
            self.weight = lm_head_weight.index_select(0, draft_vocab)

    def _to_drafter_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.clamp(0, self.target_vocab - 1)  # -1 placeholders of ragged rows: never read

    def _read(self, tokens, depth, tree_mask, sources) -> torch.Tensor:
        features = sources.to(self.cache.dtype)
        return self.runner.forward(self._to_drafter_ids(tokens), depth, tree_mask, features=features)

    def _score(self, hidden, k, temperature, probs):
        logprobs, ids, full = super()._score(hidden, k, temperature, probs)
        if self.draft_vocab is None:
            return logprobs, ids, full
        if full is not None:  # back onto the target's vocabulary (zeros off the draft vocabulary)
            full = full.new_zeros(full.shape[0], self.target_vocab).index_copy_(1, self.draft_vocab, full)
        return logprobs, self.draft_vocab[ids], full

    # ------------------------------------------------------------------------------------------
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_hidden: torch.Tensor
    ) -> None:
        """Read the target's prompt: features f_0..f_{T-2} next to tokens x_1..x_{T-1}."""
        cache = self.cache
        with self.timer.stage("draft.prefill"):
            if input_ids.shape[1] == 1:  # nothing to read before the first verification
                cache.start(torch.zeros_like(cache.kv_start), 0)
                return
            self.runner.prefill(
                {
                    "input_ids": input_ids[:, 1:],
                    "attention_mask": attention_mask[:, :-1],
                    "features": prompt_hidden[:, :-1].to(cache.dtype),
                }
            )
        self.chain_base = None

    def pending(self, verdict, active: torch.Tensor, active_host: list[bool], fed: int) -> Pending:
        """The round's root and accepted nodes (target features) next to the tokens after them."""
        if self.chain_base is not None:  # a chain's entries read predicted features: drop them all
            self.cache.set_lengths(self.chain_base, self.chain_host)
            self.chain_base = None
        host_counts = [count + 1 if on else 0 for count, on in zip(verdict.accepted, active_host)]
        width = max(max(host_counts), 1)
        counts = (verdict.num_accepted + 1) * active
        return Pending(verdict.tokens[:, :width], counts, host_counts, verdict.features[:, :width])

    def chain(self, hidden, config, **kwargs):
        proposal = super().chain(hidden, config, **kwargs)
        return proposal._replace(fed=0)  # nothing the head fed is kept (see pending)
