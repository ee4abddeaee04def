"""Loading extracted pairs (see :mod:`crossspec_kernels.adapter_tools.extract` for the layout)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from crossspec_kernels.adapter_tools.extract import INDEX_NAME, LM_HEAD_NAME, PairDataError

REQUIRED = ("drafter_hidden", "target_tokens", "prev_tokens", "record_ids", "positions")


@dataclass
class Pairs:
    """All pairs of a folder (or a subset), as tensors held in memory, fp32 hidden states."""

    drafter_hidden: torch.Tensor  # [N, d_draft]
    target_tokens: torch.Tensor  # [N] int64
    prev_tokens: torch.Tensor  # [N] int64
    record_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    target_hidden: torch.Tensor | None = None  # [N, d_target]
    target_prev_hidden: torch.Tensor | None = None  # [N, d_target]

    def __len__(self) -> int:
        return int(self.target_tokens.numel())

    @property
    def d_draft(self) -> int:
        return int(self.drafter_hidden.shape[1])

    def subset(self, mask: torch.Tensor) -> Pairs:
        pick = lambda t: None if t is None else t[mask]
        return Pairs(**{name: pick(getattr(self, name)) for name in self.__dataclass_fields__})


def load_index(pairs_dir: str | os.PathLike) -> dict:
    pairs_dir = Path(pairs_dir)
    index_path = pairs_dir / INDEX_NAME
    if not index_path.is_file():
        raise PairDataError(
            f"pairs folder {str(pairs_dir)!r} has no {INDEX_NAME} (run `crossspec adapter extract`)"
        )
    index = json.loads(index_path.read_text())
    if not index.get("shards"):
        raise PairDataError(f"pairs folder {str(pairs_dir)!r}: the index lists no shards")
    if not index.get("complete", False):
        raise PairDataError(
            f"pairs folder {str(pairs_dir)!r} is incomplete ({len(index['shards'])} of "
            f"{index.get('num_shards')} shards); re-run extract to finish it"
        )
    return index


def load_pairs(pairs_dir: str | os.PathLike) -> Pairs:
    """Concatenate every shard listed in the index, checking shapes and that none is empty."""
    from safetensors.torch import load_file

    pairs_dir = Path(pairs_dir)
    index = load_index(pairs_dir)
    settings = index["settings"]
    columns: dict[str, list[torch.Tensor]] = {}
    for shard in index["shards"]:
        file = pairs_dir / shard["file"]
        if not file.is_file():
            raise PairDataError(f"pairs folder {str(pairs_dir)!r}: shard {shard['file']} is missing")
        tensors = load_file(str(file))
        missing = [k for k in REQUIRED if k not in tensors]
        if missing:
            raise PairDataError(f"shard {file}: lacks tensors {missing}")
        count = tensors["target_tokens"].numel()
        if count == 0:
            raise PairDataError(f"shard {file}: empty shard (0 pairs)")
        hidden = tensors["drafter_hidden"]
        if hidden.dim() != 2 or hidden.shape != (count, settings["d_draft"]):
            raise PairDataError(
                f"shard {file}: drafter_hidden must be [{count}, {settings['d_draft']}], got {tuple(hidden.shape)}"
            )
        for name, tensor in tensors.items():
            columns.setdefault(name, []).append(tensor)
    merged = {name: torch.cat(parts) for name, parts in columns.items()}
    for name in ("drafter_hidden", "target_hidden", "target_prev_hidden"):
        if name in merged:
            merged[name] = merged[name].float()
    tokens = merged["target_tokens"]
    if int(tokens.min()) < 0 or int(tokens.max()) >= settings["vocab_size"]:
        raise PairDataError(
            f"pairs folder {str(pairs_dir)!r}: target_tokens outside [0, {settings['vocab_size']})"
        )
    return Pairs(**{k: merged.get(k) for k in Pairs.__dataclass_fields__})


def load_lm_head(pairs_dir: str | os.PathLike) -> torch.Tensor:
    """The target LM head weight [V, d_target] (fp32) saved beside the pairs."""
    from safetensors.torch import load_file

    file = Path(pairs_dir) / LM_HEAD_NAME
    if not file.is_file():
        raise PairDataError(f"pairs folder {str(pairs_dir)!r} has no {LM_HEAD_NAME}")
    return load_file(str(file))["weight"].float()


def split_records(pairs: Pairs, eval_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Split by record (never within one), deterministically from ``seed``: (train, held-out).

    At least one record goes to each side when there are two or more records.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    records = torch.unique(pairs.record_ids)
    if records.numel() < 2:
        raise PairDataError(f"need at least 2 records to hold some out, got {records.numel()}")
    gen = torch.Generator().manual_seed(seed)
    order = records[torch.randperm(records.numel(), generator=gen)]
    num_eval = min(max(1, round(eval_fraction * records.numel())), records.numel() - 1)
    held = torch.isin(pairs.record_ids, order[:num_eval])
    return pairs.subset(~held), pairs.subset(held)
