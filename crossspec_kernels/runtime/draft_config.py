"""How the drafter proposes tokens each round: a chain, or an EAGLE-2-style dynamic tree."""

from __future__ import annotations

from dataclasses import dataclass

# The target verifies [root + draft nodes] in one forward; the tree-attention kernel takes up to
# 128 new tokens (more would run through torch SDPA), so a round drafts at most 127 nodes.
MAX_DRAFT_NODES = 127
# lm_head_topk returns at most 16 candidates per row.
MAX_TOP_K = 16
# A tree round keeps top_k + (depth - 1) * top_k^2 candidates and their ancestor matrix (bool,
# candidates^2 per request): 2048 candidates are 4 MiB per request.
MAX_TREE_CANDIDATES = 2048


def _check_int(owner: str, name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{owner}: {name} must be an int in [{low}, {high}], got {value!r}")


def _check_confidence(owner: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: min_confidence must be a float in [0, 1), got {value!r}")


@dataclass(frozen=True)
class ChainDraft:
    """Draft ``gamma`` tokens one after the other (greedy, or sampled from the drafter at T > 0).

    ``min_confidence`` > 0 makes the length adaptive: the chain stops early once every row's
    cumulative draft probability (the product of its drafts' probabilities under the drafter)
    is below it, so a round verifies fewer tokens where the drafter is unsure. Costs one host
    read per draft step (nothing when 0, the default).
    """

    gamma: int = 5
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        _check_int("ChainDraft", "gamma", self.gamma, 1, MAX_DRAFT_NODES)
        _check_confidence("ChainDraft", self.min_confidence)


@dataclass(frozen=True)
class TreeDraft:
    """EAGLE-2-style dynamic tree.

    Level 1 holds the root's ``top_k`` most likely children. Each further level expands the
    ``top_k`` frontier nodes with the highest cumulative drafter log-probability (all of them are
    scored in one drafter forward with tree attention) into ``top_k`` children each, up to
    ``depth`` levels. The ``max_nodes`` candidates with the highest cumulative log-probability
    form the tree the target verifies (an ancestor never scores below its descendants, so the
    selection is a tree). ``min_confidence`` > 0 prunes it: no row keeps more nodes than its
    count of candidates whose cumulative probability reaches it (at least one; one host read).
    """

    top_k: int = 4
    depth: int = 5
    max_nodes: int = 32
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        _check_int("TreeDraft", "top_k", self.top_k, 1, MAX_TOP_K)
        _check_int("TreeDraft", "depth", self.depth, 1, 32)
        _check_int("TreeDraft", "max_nodes", self.max_nodes, 1, MAX_DRAFT_NODES)
        _check_confidence("TreeDraft", self.min_confidence)
        candidates = self.top_k + (self.depth - 1) * self.top_k**2
        if candidates > MAX_TREE_CANDIDATES:
            raise ValueError(
                f"TreeDraft: top_k={self.top_k}, depth={self.depth} make {candidates} candidates per round "
                f"(top_k + (depth - 1) * top_k^2), more than {MAX_TREE_CANDIDATES}; lower top_k or depth"
            )
