"""Train an adapter: drafter hidden -> adapter -> frozen target LM head -> CE vs the target's tokens.

Loss = CE(adapter(h_draft) @ W_lm^T, target next token) [+ smooth_l1_weight * SmoothL1(adapter output,
target hidden), SpecVLM-style, when the pairs hold the target's hidden states]. AdamW, linear warmup
then cosine decay per step, evaluation on a held-out split of records after each epoch, best
checkpoint (held-out top-1, ties to lower loss) saved with ``save_pretrained`` in ``<out>/best``.

Output folder::

    best/            the best adapter so far (save_pretrained) + metrics.json
    last/            the adapter after the last finished epoch
    checkpoint.pt    adapter + optimizer + scheduler state, finished epochs, RNG states (as tensors),
                     history; loaded with torch.load(weights_only=True), so it runs no code
    history.json     per-epoch train loss and held-out metrics

Resuming (``resume=True``) reloads checkpoint.pt and continues with the next epoch; data order is a
function of (seed, epoch) and RNG states are restored, so an interrupted-and-resumed run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from crossspec_kernels.adapter_tools._progress import progress
from crossspec_kernels.adapter_tools.data import Pairs, load_index, load_lm_head, load_pairs, split_records
from crossspec_kernels.adapter_tools.evaluate import adapter_hidden, evaluate_adapter

CHECKPOINT_NAME = "checkpoint.pt"
SPLIT_NAME = "training_split.json"


@dataclass
class TrainConfig:
    adapter: dict = field(
        default_factory=dict
    )  # AdapterConfig.to_dict(); d_draft/d_target filled from the pairs
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05  # fraction of all steps spent in linear warmup
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    smooth_l1_weight: float = 0.0  # > 0 needs pairs extracted with target hidden states
    smooth_l1_beta: float = 1.0
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1  # fraction of records held out
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _lr_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_frac)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return factor


def _rng_state() -> dict:
    """torch's and Python's RNG states as tensors and plain values, so the checkpoint loads with
    ``torch.load(weights_only=True)`` (numpy's global RNG is not used here)."""
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "python_version": version,
        "python_state": torch.tensor(internal, dtype=torch.int64),  # 625 words, each < 2**32
        "python_gauss_next": gauss_next,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    internal = tuple(int(word) for word in state["python_state"].tolist())
    random.setstate((state["python_version"], internal, state["python_gauss_next"]))


def _load_checkpoint(path: Path) -> dict:
    """checkpoint.pt with weights_only=True: tensors and plain containers only, so a planted file
    cannot run code; anything else is refused with a message naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for a refused global, others for a bad file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"train: cannot resume from {path}: it is not a checkpoint this tool writes (tensors and "
            f"plain values only; {type(error).__name__}: {first_line}). Delete it, or pass --no-resume "
            "(resume=False) to start over"
        ) from error


def check_compatible(
    adapter_config, pairs: Pairs, lm_head: torch.Tensor, *, smooth_l1_weight: float = 0.0
) -> None:
    """Named errors for adapters/pairs/LM heads that do not fit together."""
    if adapter_config.d_draft != pairs.d_draft:
        raise ValueError(
            f"train: adapter d_draft={adapter_config.d_draft} but the pairs' drafter hidden size is {pairs.d_draft}"
        )
    if adapter_config.d_target != lm_head.shape[1]:
        raise ValueError(
            f"train: adapter d_target={adapter_config.d_target} but the target LM head is "
            f"[V, {lm_head.shape[1]}] (target hidden size {lm_head.shape[1]})"
        )
    vocab = getattr(adapter_config, "vocab_size", None)
    if vocab is not None and int(pairs.prev_tokens.max()) >= vocab:
        raise ValueError(
            f"train: adapter vocab_size={vocab} (previous-token embedding) but the pairs' previous tokens "
            f"reach id {int(pairs.prev_tokens.max())}"
        )
    if int(pairs.target_tokens.max()) >= lm_head.shape[0]:
        raise ValueError(
            f"train: target tokens reach {int(pairs.target_tokens.max())}, LM head has V={lm_head.shape[0]}"
        )
    if smooth_l1_weight > 0 and pairs.target_hidden is None:
        raise ValueError(
            "train: smooth_l1_weight > 0 needs target hidden states (extract with --target-hidden)"
        )
    if getattr(adapter_config, "use_target_hidden", False) and pairs.target_prev_hidden is None:
        raise ValueError("train: the adapter uses target hidden states; extract with --target-hidden")


def make_adapter_config(adapter: dict, pairs: Pairs, lm_head: torch.Tensor):
    from crossspec_kernels.models.adapters import AdapterConfig

    settings = dict(adapter)
    settings.setdefault("d_draft", pairs.d_draft)
    settings.setdefault("d_target", int(lm_head.shape[1]))
    if settings.get("kind") == "eagle":
        settings.setdefault("vocab_size", int(lm_head.shape[0]))
    return AdapterConfig.from_dict(settings)


def _write_split(folder: Path, config: TrainConfig) -> None:
    """Record how the held-out records were chosen, so `eval --split heldout` picks the same ones."""
    payload = {"eval_fraction": config.eval_fraction, "seed": config.seed}
    (folder / SPLIT_NAME).write_text(json.dumps(payload) + "\n")


def train_adapter(
    pairs_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    lm_head: torch.Tensor | None = None,
    resume: bool = True,
    stop_after_epochs: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Train an adapter on the pairs in ``pairs_dir``; returns {"history", "best", "best_dir", ...}.

    ``lm_head`` [V, d_target] defaults to the one saved beside the pairs. ``stop_after_epochs`` ends
    this call after that many epochs (the checkpoint lets a later call finish the run).
    """
    from crossspec_kernels.models.adapters import build_adapter

    pairs = load_pairs(pairs_dir)
    lm_head = (load_lm_head(pairs_dir) if lm_head is None else lm_head).detach().float()
    settings = load_index(pairs_dir)["settings"]
    expected = (settings["vocab_size"], settings["d_target"])
    if tuple(lm_head.shape) != expected:
        raise ValueError(
            f"train: lm_head must be [V, d_target] = {list(expected)} like the target the pairs were "
            f"extracted from, got {list(lm_head.shape)}"
        )
    adapter_config = make_adapter_config(config.adapter, pairs, lm_head)
    check_compatible(adapter_config, pairs, lm_head, smooth_l1_weight=config.smooth_l1_weight)
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(
            f"train: epochs and batch_size must be >= 1, got {config.epochs}, {config.batch_size}"
        )
    train_pairs, eval_pairs = split_records(pairs, config.eval_fraction, config.seed)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_config = {**config.to_dict(), "adapter": adapter_config.to_dict()}
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    adapter = build_adapter(adapter_config)
    adapter.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, warmup, config.min_lr_ratio)
    )

    start_epoch, history, best = 0, [], None
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if resume and checkpoint_path.is_file():
        state = _load_checkpoint(checkpoint_path)
        if state["config"] != full_config:
            raise ValueError(
                f"train: {checkpoint_path} was written with another config; use another --out or --no-resume"
            )
        adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        _set_rng_state(state["rng"])

    (out_dir / "train_config.json").write_text(json.dumps(full_config, indent=2) + "\n")
    for epochs_run, epoch in enumerate(range(start_epoch, config.epochs)):
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
        order = torch.randperm(
            len(train_pairs), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        )
        bar = progress(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="step",
            disable=not show_progress,
        )
        total_loss, seen = 0.0, 0
        for step in range(steps_per_epoch):
            batch = train_pairs.subset(order[step * config.batch_size : (step + 1) * config.batch_size])
            hidden = adapter_hidden(adapter, batch, 0, len(batch))
            loss = F.cross_entropy(hidden.float() @ lm_head.T, batch.target_tokens)
            if config.smooth_l1_weight > 0:
                loss = loss + config.smooth_l1_weight * F.smooth_l1_loss(
                    hidden.float(), batch.target_hidden, beta=config.smooth_l1_beta
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()

        with torch.no_grad():
            adapter.eval()
            eval_loss = float(
                F.cross_entropy(
                    adapter_hidden(adapter, eval_pairs, 0, len(eval_pairs)).float() @ lm_head.T,
                    eval_pairs.target_tokens,
                )
            )
            metrics = evaluate_adapter(adapter, eval_pairs, lm_head)
            adapter.train()
        record = {
            "epoch": epoch + 1,
            "train_loss": total_loss / max(seen, 1),
            "eval_loss": eval_loss,
            "eval_top1": metrics["top1"],
            "eval_top5": metrics["top5"],
        }
        history.append(record)
        if show_progress:
            print(
                f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}  held-out loss "
                f"{eval_loss:.4f}  top1 {metrics['top1']:.3f}  top5 {metrics['top5']:.3f}"
            )
        if best is None or (metrics["top1"], -eval_loss) > (best["eval_top1"], -best["eval_loss"]):
            best = record
            adapter.save_pretrained(str(out_dir / "best"))
            (out_dir / "best" / "metrics.json").write_text(
                json.dumps({**record, "held_out": metrics}, indent=2) + "\n"
            )
            _write_split(out_dir / "best", config)
        adapter.save_pretrained(str(out_dir / "last"))
        _write_split(out_dir / "last", config)
        state = {
            "config": full_config,
            "adapter": adapter.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "best": best,
            "rng": _rng_state(),
        }
        torch.save(state, str(checkpoint_path) + ".tmp")
        os.replace(str(checkpoint_path) + ".tmp", checkpoint_path)
        (out_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")

    finished = len(history) >= config.epochs
    return {
        "history": history,
        "best": best,
        "best_dir": str(out_dir / "best"),
        "finished": finished,
        "adapter": adapter,
        "num_train_pairs": len(train_pairs),
        "num_eval_pairs": len(eval_pairs),
    }
