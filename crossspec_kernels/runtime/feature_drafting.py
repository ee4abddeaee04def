"""A feature head's side of a round: B1 (EAGLE on the target's features), L5 (on the event
drafter's), L5F (on both).

The head (``models.feature_head.FeatureHead``) reads, at each position, a feature of a committed
token next to the token after it, and predicts the target's next feature; the target's LM head
scores the prediction.

B1 (``FeatureDraftModel``). Its KV cache is a ``SlotCache`` that mirrors the target's, one slot
shorter: head slot s holds (target feature at slot s, token at slot s + 1), so the RoPE positions,
the left padding and the per-row lengths line up with the target's (``head length = target
length - 1``). Per request:

1. ``prefill``: after the target's prefill, the head reads the prompt: features f_0..f_{T-2} with
   tokens x_1..x_{T-1}. Its output at the last slot scores nothing yet: the first round's drafts
   come from the event drafter (prefill hiding), or there are none.
2. After every verification (``Verdict.features``): the head reads the round's root and accepted
   nodes with the tokens after them (the accepted drafts and the bonus), ``accepted + 1`` entries
   per row; its output at the last one scores draft 1.
3. Drafting rolls the head on its own predictions: chain step k reads (output k-1, draft k).
   Those entries use predicted features, so after verification the head rolls back to its
   committed length and reads the target's real features instead (EAGLE), accepted or not.

L5 / L5F (``EventFeatureDraftModel``): the features are the event drafter's final-norm hidden
states g (L5) or concat[g ; f] (L5F, drafter first). The two models read different prompts (events
vs video), so no prompt position holds both models' features: the head's sequence starts at the
target's last prompt token x_{T-1}, which pairs with the drafter's last prompt position (its
hidden state there scores the first new token, as when the drafter drafts itself). With y_1, y_2,
... the committed new tokens, head slot j holds::

    features_j = g_j                (L5)     or  concat[g_j ; f_j]  (L5F)
    token_j    = y_{j+1}
    g_j = the drafter's hidden state after its prompt and y_1..y_j  (g_0: after its prompt)
    f_j = the target's after its prompt and y_1..y_j                (f_0 = the prompt's last, f_{T-1})

and its output there predicts f_{j+1}, so it scores y_{j+2}. The event drafter keeps its own
cache in step with the committed tokens: after every verification it rolls back to its committed
length (dropping the draft tokens it read for the chain) and reads the round's accepted drafts and
the bonus in one forward, which gives g of each; the head then reads its round's entries as B1
does (root and accepted nodes, next to the tokens after them). A chain after root c (the last
committed token, y_n): draft d_1 is scored by the head's output at slot n-1; draft d_{k+1} by its
output after reading slot n-1+k::

    L5:  (g of d_{k-1}, d_k)                       d_0 = c: g of c came from the catch-up
    L5F: (concat[g of d_{k-1} ; head output k], d_k)   the target half is the head's prediction

so the drafter runs one step on each of d_1..d_{gamma-2} while the head drafts (``_feed``), as
``models.feature_head.rollout`` defines. A tree is every root-to-node path's chain at once
(``_read_level``): at each level the drafter reads the expanded nodes as a tree-masked scratch
block (g of each node, nothing committed), and the head reads each node next to g of its parent
(g of the root for a child of the root).

Chains, dynamic trees (``DraftModel.tree``: a node is expanded with the output that scored it)
and sampled chains are ``DraftModel``'s, unchanged; only what a forward reads differs. An
optional reduced draft vocabulary (``draft_vocab``: the N ids the head may propose) cuts the LM
head's cost; it stays lossless because verification always uses the full target distribution.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from crossspec_kernels.models.feature_head import FeatureHead
from crossspec_kernels.runtime import checks
from crossspec_kernels.runtime.drafting import DraftModel, Pending
from crossspec_kernels.runtime.runner import ModelRunner
from crossspec_kernels.runtime.stages import StageTimer

_OP = "CrossSpecEngine"
EVENT_FEATURE_KINDS = ("l5", "l5f")  # heads that read the event drafter's features


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


def check_feature_head(head, target, draft_vocab, drafter=None) -> torch.Tensor | None:
    """A feature head for this target (and, L5/L5F, this event ``drafter``); ``draft_vocab`` (or
    None) as a sorted unique int64 id tensor."""
    if not isinstance(head, FeatureHead):
        raise ValueError(
            f"{_OP}: feature_head must be a FeatureHead (models.feature_head), got {type(head).__name__}"
        )
    config = head.config
    if config.kind in EVENT_FEATURE_KINDS:
        what = (
            "the event drafter's features"
            if config.kind == "l5"
            else "the event drafter's and the target's features"
        )
        if drafter is None:
            raise ValueError(
                f"{_OP}: feature_head of kind {config.kind!r} drafts from {what}: it needs an event drafter, "
                "got drafter=None"
            )
        d_draft = checks.hidden_size(drafter, "drafter")
        if config.d_draft != d_draft:
            raise ValueError(
                f"{_OP}: feature_head of kind {config.kind!r} reads drafter features of d_draft="
                f"{config.d_draft}, but the drafter's hidden size is {d_draft}"
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
    reads_target_features = True  # the verification keeps the target's features (Verdict.features)

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
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_hidden: torch.Tensor,
        drafter_hidden: torch.Tensor | None = None,
    ) -> None:
        """Read the target's prompt: features f_0..f_{T-2} next to tokens x_1..x_{T-1}.

        ``prompt_hidden`` [B, T, d_target]: the target's prompt features; ``drafter_hidden``
        [B, d_draft]: the event drafter's at its last prompt position (B1 reads none)."""
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

    def reads(self, verdict):
        """The tokens, the counts and the target's features (a head runs with the target)."""
        return verdict._replace(hidden=None)

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


class EventFeatureDraftModel(FeatureDraftModel):
    """An L5 / L5F head: reads the event drafter's features (L5F: next to the target's), drafts
    in the target's vocabulary. The module docstring has the alignment.

    Args: as ``FeatureDraftModel``, and
        events: the event drafter's ``DraftModel`` (its runner and cache; prefilled, it drafted
            the free tokens); from the first verification on it only computes features.
        with_target: L5F (concat[drafter ; target] features) rather than L5 (drafter's only).
    """

    def __init__(
        self,
        runner: ModelRunner,
        lm_head_weight: torch.Tensor,
        timer: StageTimer,
        backend: str | None = None,
        draft_vocab: torch.Tensor | None = None,
        *,
        events: DraftModel,
        with_target: bool,
    ) -> None:
        super().__init__(runner, lm_head_weight, timer, backend, draft_vocab)
        self.events = events
        self.with_target = with_target
        self.reads_target_features = with_target
        self.root_feature: torch.Tensor | None = None  # [B, d_draft]: g of the last committed token
        self.step_feature: torch.Tensor | None = None  # [B, d_draft]: g of the draft before the next
        self.event_base: tuple[torch.Tensor, list[int]] | None = None  # drafter's committed lengths
        self._unread: torch.Tensor | None = None  # [B] the draft the drafter reads at the next step

    def prefill(self, input_ids, attention_mask, prompt_hidden, drafter_hidden=None) -> None:
        """Nothing to read (the head's sequence starts at the root); keep the drafter's g_0."""
        if drafter_hidden is None:
            raise ValueError(f"{_OP}: an L5/L5F head needs the event drafter's prompt features")
        events = self.events
        with self.timer.stage("draft.prefill"):
            self.cache.start(torch.zeros_like(self.cache.kv_start), 0)
        self.root_feature = drafter_hidden
        # The drafter's committed length is its prompt's: drop the free tokens it fed to its cache.
        if events.chain_base is not None:
            self.event_base = (events.chain_base.clone(), list(events.chain_host))
        else:
            self.event_base = (events.cache.lengths.clone(), list(events.cache.host_lengths))
        self.chain_base = None

    def pending(self, verdict, active: torch.Tensor, active_host: list[bool], fed: int) -> Pending:
        """The drafter reads the round's accepted drafts and the bonus (after rolling back to its
        committed length); the head's entries are (features of the root and the accepted nodes,
        the tokens after them): entry i pairs g of the token before ``tokens[:, i]`` with it."""
        if self.chain_base is not None:  # the chain's entries: read again from real features
            self.cache.set_lengths(self.chain_base, self.chain_host)
            self.chain_base = None
        host_counts = [count + 1 if on else 0 for count, on in zip(verdict.accepted, active_host)]
        width = max(max(host_counts), 1)
        counts = (verdict.num_accepted + 1) * active
        tokens = verdict.tokens[:, :width]
        events = self.events
        with self.timer.stage("draft.step"):
            events.cache.set_lengths(*self.event_base)  # drop the drafts the chain read
            depth = torch.arange(width, device=tokens.device).expand_as(tokens)
            hidden = events._read(tokens, depth, None, None)  # g after each committed token
            events.cache.advance(counts, host_counts)
            self.event_base = (events.cache.lengths.clone(), list(events.cache.host_lengths))
            # Entry 0: g of the root (the last round's bonus); entry i: g after tokens[:, i - 1].
            features = torch.cat([self.root_feature[:, None], hidden], 1)[:, :width]
            last = (counts - 1).clamp_min(0)
            self.root_feature = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[2]))[:, 0]
            features = self._features(features, verdict.features[:, :width] if self.with_target else None)
        return Pending(tokens, counts, host_counts, features)

    def _features(self, drafter: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """[.., d_features]: L5 the drafter's, L5F concat[drafter ; target] (drafter first)."""
        drafter = drafter.to(self.cache.dtype)
        return drafter if target is None else torch.cat([drafter, target.to(self.cache.dtype)], -1)

    def chain(self, hidden, config, **kwargs):
        self._unread, self.step_feature = None, self.root_feature  # draft 2 reads g of the root
        return super().chain(hidden, config, **kwargs)

    def _feed(self, token, hidden, zero, ones) -> torch.Tensor:
        """Draft d_k = ``token`` scored by head output ``hidden``: the head reads (g of d_{k-1},
        d_k) (L5F: concat[g of d_{k-1} ; hidden]); first the drafter reads d_{k-1} for its g
        (d_0, the root, it has read)."""
        events = self.events
        if self._unread is not None:
            self.step_feature = events._read(self._unread[:, None], zero, None, None)[:, 0]
            events.cache.advance(ones, [1] * token.shape[0])
        self._unread = token
        features = self._features(self.step_feature, hidden if self.with_target else None)
        return super()._feed(token, features, zero, ones)

    def _read_level(self, tokens, offsets, block_mask, sources) -> torch.Tensor:
        """A tree level: the drafter reads the expanded nodes (a scratch block: its committed
        length stays), giving g after each; the head reads node i next to g of its parent, the
        node one level up among its ancestors (g of the root at the first level). L5F pairs it
        with ``sources``, the head output that scored the node, as a chain step does."""
        g = self.events._read(tokens, offsets, block_mask, None)
        parent = (block_mask & (offsets[:, None, :] == offsets[:, :, None] - 1)).to(torch.int8).argmax(-1)
        parent_g = g.gather(1, parent[:, :, None].expand(-1, -1, g.shape[2]))
        parent_g = torch.where((offsets == 0)[:, :, None], self.root_feature[:, None].to(g.dtype), parent_g)
        features = self._features(parent_g, sources if self.with_target else None)
        return super()._read_level(tokens, offsets, block_mask, features)


def feature_draft_model(
    head: FeatureHead,
    runner: ModelRunner,
    lm_head_weight: torch.Tensor,
    timer: StageTimer,
    backend: str | None = None,
    draft_vocab: torch.Tensor | None = None,
    events: DraftModel | None = None,
) -> FeatureDraftModel:
    """The draft model of ``head``'s kind: B1 reads the target's features, L5/L5F the event
    drafter's (``events``, the event drafter's ``DraftModel``) too."""
    if head.config.kind not in EVENT_FEATURE_KINDS:
        return FeatureDraftModel(runner, lm_head_weight, timer, backend, draft_vocab)
    if events is None:
        raise ValueError(f"{_OP}: feature_head of kind {head.config.kind!r} needs an event drafter")
    return EventFeatureDraftModel(
        runner,
        lm_head_weight,
        timer,
        backend,
        draft_vocab,
        events=events,
        with_target=head.config.kind == "l5f",
    )
