"""Extract (drafter hidden state, target next token) pairs for adapter training.

Manifest (JSON lines, one record per line; blank lines and lines starting with ``#`` are skipped)::

    {"drafter_inputs": "rec0/drafter.pt", "target_inputs": "rec0/target.pt", "prompt": "what happens?"}

``drafter_inputs`` / ``target_inputs`` are paths (relative to the manifest's folder, or absolute) of
``torch.save``-d dicts of tensors, exactly what the model's forward/``generate`` takes for ONE request
(``input_ids`` [1, T] or [T], optional ``attention_mask``, ``pixel_values_videos``, ...). The two
prompts are the same request seen by each model (e.g. events for the drafter, video for the target);
the models share vocabulary ids below the target's vocabulary size. ``prompt`` is free text, kept in the
index for reference only.

For each record the target continues its prompt greedily for up to ``num_new_tokens`` tokens
y_0..y_{n-1} (stopping after EOS). The drafter then reads its prompt followed by y_0..y_{n-2}; its
final-norm hidden state at the last prompt position and at each y_j is paired with the token the
target produced next (y_0, then y_{j+1}). So pair t is "what the drafter knows after the t-th committed
token" -> "the target's greedy choice there", which is exactly what a chain drafter must predict.

Output folder::

    index.json                     settings, sizes, shard list (rewritten atomically after each shard)
    lm_head.safetensors            {"weight": [V, d_target]} the target's LM head (frozen in training)
    shard-00000.safetensors ...    per shard, N pairs:
        drafter_hidden      [N, d_draft]  drafter final-norm hidden state (``dtype``)
        target_tokens       [N] int64     the target's greedy next token (the label)
        prev_tokens         [N] int64     the token at that position (last prompt token, then y_j)
        record_ids          [N] int64     manifest line number of the record (0-based, data lines)
        positions           [N] int64     t = 0..n-1 within the record
        target_hidden       [N, d_target] optional: target final-norm hidden at the same position
        target_prev_hidden  [N, d_target] optional: target hidden one position earlier

Shard k holds records [k * records_per_shard, (k + 1) * records_per_shard). A shard is written to a
temporary file and renamed, then listed in the index, so an interrupted run leaves only whole shards;
re-running with the same settings skips the listed shards and finishes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossspec_kernels.adapter_tools._progress import progress

INDEX_NAME = "index.json"
LM_HEAD_NAME = "lm_head.safetensors"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ManifestError(ValueError):
    """The manifest is missing, empty or malformed, or names inputs that cannot be loaded."""


class PairDataError(ValueError):
    """An extracted pair folder is missing, incomplete, inconsistent or empty."""


@dataclass
class ManifestRecord:
    drafter_inputs: Path
    target_inputs: Path
    prompt: str


def read_manifest(path: str | os.PathLike) -> list[ManifestRecord]:
    """Parse and check a JSON-lines manifest; paths are resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"extract: manifest {str(path)!r} does not exist or is not a file")
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"extract: manifest {path} line {line_no} is not JSON: {error}") from None
        if not isinstance(entry, dict):
            raise ManifestError(f"extract: manifest {path} line {line_no} must be a JSON object")
        missing = [key for key in ("drafter_inputs", "target_inputs") if key not in entry]
        if missing:
            raise ManifestError(f"extract: manifest {path} line {line_no} lacks key(s) {missing}")
        resolved = {}
        for key in ("drafter_inputs", "target_inputs"):
            file = Path(entry[key])
            file = file if file.is_absolute() else path.parent / file
            if not file.is_file():
                raise ManifestError(
                    f"extract: manifest {path} line {line_no}: {key} file {str(file)!r} not found"
                )
            resolved[key] = file
        records.append(
            ManifestRecord(
                resolved["drafter_inputs"], resolved["target_inputs"], str(entry.get("prompt", ""))
            )
        )
    if not records:
        raise ManifestError(f"extract: manifest {path} has no records")
    return records


def _load_inputs(file: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        inputs = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a bad manifest entry
        raise ManifestError(f"extract: cannot load {what} from {str(file)!r}: {error}") from None
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise ManifestError(f"extract: {what} {str(file)!r} must be a dict of tensors with 'input_ids'")
    inputs = dict(inputs)
    ids = inputs["input_ids"]
    if ids.dim() == 1:
        inputs["input_ids"] = ids = ids.unsqueeze(0)
        if "attention_mask" in inputs and inputs["attention_mask"].dim() == 1:
            inputs["attention_mask"] = inputs["attention_mask"].unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ManifestError(
            f"extract: {what} {str(file)!r}: input_ids must be [1, T] or [T] (one request), got {tuple(ids.shape)}"
        )
    return inputs


def _append_tokens(inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same request with ``tokens`` [n] appended to input_ids (and ones to the attention mask)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens.view(1, -1).to(inputs["input_ids"])], dim=1)
    if "attention_mask" in inputs:
        ones = torch.ones((1, tokens.numel()), dtype=inputs["attention_mask"].dtype)
        out["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
    return out


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _final_hidden(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final-norm hidden states [T, d] of one request (HF: the last entry of ``hidden_states``)."""
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise ValueError(f"extract: {type(model).__name__} returned no hidden_states")
    return hidden[-1][0].float().cpu()


def _greedy_continuation(target, inputs: dict[str, torch.Tensor], num_new_tokens: int, eos_ids: set[int]):
    prompt_len = inputs["input_ids"].shape[1]
    pad = getattr(target.config, "pad_token_id", None)
    sequences = target.generate(
        **inputs, max_new_tokens=num_new_tokens, do_sample=False, pad_token_id=pad if pad is not None else 0
    )
    new = sequences[0, prompt_len:].cpu()
    for index, token in enumerate(new.tolist()):
        if token in eos_ids:
            return new[: index + 1]
    return new


def _eos_ids(model) -> set[int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _input_vocab(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _manifest_digest(records: list[ManifestRecord]) -> str:
    digest = hashlib.sha256()
    for record in records:
        for file in (record.drafter_inputs, record.target_inputs):
            digest.update(file.read_bytes())
        digest.update(record.prompt.encode())
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def extract_pairs(
    drafter,
    target,
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_new_tokens: int = 32,
    records_per_shard: int = 64,
    store_target_hidden: bool = False,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    max_shards: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Run ``drafter`` and ``target`` (HF models, eval mode) over a manifest; write sharded pairs.

    Resumable: shards already listed in ``out_dir/index.json`` (same manifest and settings) are
    skipped. ``max_shards`` writes at most that many new shards, then returns (for chunked jobs and
    tests). ``overwrite`` discards an existing index with different settings. Returns the index dict.
    """
    from safetensors.torch import save_file

    if num_new_tokens < 1:
        raise ValueError(f"extract: num_new_tokens must be >= 1, got {num_new_tokens}")
    if records_per_shard < 1:
        raise ValueError(f"extract: records_per_shard must be >= 1, got {records_per_shard}")
    if dtype not in DTYPES:
        raise ValueError(f"extract: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    records = read_manifest(manifest)
    device = torch.device(device)
    drafter.eval()
    target.eval()

    lm_head = target.get_output_embeddings().weight.detach().float().cpu()
    vocab, d_target = lm_head.shape
    d_draft = int(drafter.get_input_embeddings().weight.shape[1])
    if _input_vocab(drafter) < vocab:
        # Target tokens are appended to the drafter's prompt, so every target id must be a drafter id.
        raise ValueError(
            f"extract: drafter input vocabulary ({_input_vocab(drafter)}) is smaller than the target's "
            f"vocabulary ({vocab}); the drafter must share the target's ids"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "manifest_sha256": _manifest_digest(records),
        "num_records": len(records),
        "num_new_tokens": num_new_tokens,
        "records_per_shard": records_per_shard,
        "store_target_hidden": store_target_hidden,
        "dtype": dtype,
        "d_draft": d_draft,
        "d_target": int(d_target),
        "vocab_size": int(vocab),
    }
    index_path = out_dir / INDEX_NAME
    index = None
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("settings") != settings:
            if not overwrite:
                changed = sorted(k for k in settings if index.get("settings", {}).get(k) != settings[k])
                raise PairDataError(
                    f"extract: {out_dir} holds pairs from other inputs/settings (differs in {changed}); "
                    "use another folder or overwrite=True (--overwrite)"
                )
            index = None
    if index is None:
        index = {
            "format_version": FORMAT_VERSION,
            "settings": settings,
            "manifest": str(Path(manifest).resolve()),
            "lm_head": LM_HEAD_NAME,
            "num_shards": (len(records) + records_per_shard - 1) // records_per_shard,
            "shards": [],
            "complete": False,
        }
    save_file({"weight": lm_head.contiguous()}, str(out_dir / (LM_HEAD_NAME + ".tmp")))
    os.replace(out_dir / (LM_HEAD_NAME + ".tmp"), out_dir / LM_HEAD_NAME)

    done = {s["file"] for s in index["shards"] if (out_dir / s["file"]).is_file()}
    index["shards"] = [s for s in index["shards"] if s["file"] in done]
    eos_ids = _eos_ids(target)
    written = 0
    todo = [k for k in range(index["num_shards"]) if f"shard-{k:05d}.safetensors" not in done]
    bar = progress(total=len(records), desc="extract", unit="rec", disable=not show_progress)
    bar.update(len(records) - sum(min(records_per_shard, len(records) - k * records_per_shard) for k in todo))
    for shard in todo:
        if max_shards is not None and written >= max_shards:
            break
        start, stop = shard * records_per_shard, min((shard + 1) * records_per_shard, len(records))
        columns: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("drafter_hidden", "target_tokens", "prev_tokens", "record_ids", "positions")
        }
        if store_target_hidden:
            columns["target_hidden"], columns["target_prev_hidden"] = [], []
        for record_id in range(start, stop):
            record = records[record_id]
            t_inputs = _load_inputs(record.target_inputs, "target_inputs")
            d_inputs = _load_inputs(record.drafter_inputs, "drafter_inputs")
            new = _greedy_continuation(target, _to_device(t_inputs, device), num_new_tokens, eos_ids)
            n = new.numel()
            if n == 0:
                continue
            d_full = _append_tokens(d_inputs, new[:-1])
            d_hidden = _final_hidden(drafter, _to_device(d_full, device))[-n:]
            prev = d_full["input_ids"][0, -n:]
            columns["drafter_hidden"].append(d_hidden.to(DTYPES[dtype]))
            columns["target_tokens"].append(new.long())
            columns["prev_tokens"].append(prev.long().cpu())
            columns["record_ids"].append(torch.full((n,), record_id, dtype=torch.int64))
            columns["positions"].append(torch.arange(n, dtype=torch.int64))
            if store_target_hidden:
                t_full = _append_tokens(t_inputs, new[:-1])
                t_hidden = _final_hidden(target, _to_device(t_full, device))
                if t_hidden.shape[0] < n + 1:
                    t_hidden = torch.cat([torch.zeros(1, d_target), t_hidden])
                columns["target_hidden"].append(t_hidden[-n:].to(DTYPES[dtype]))
                columns["target_prev_hidden"].append(t_hidden[-n - 1 : -1].to(DTYPES[dtype]))
            bar.update(1)
        tensors = {k: torch.cat(v).contiguous() for k, v in columns.items() if v}
        if not tensors:
            raise PairDataError(f"extract: shard {shard} (records {start}..{stop - 1}) produced no pairs")
        file = f"shard-{shard:05d}.safetensors"
        save_file(tensors, str(out_dir / (file + ".tmp")), metadata={"records": f"{start}:{stop}"})
        os.replace(out_dir / (file + ".tmp"), out_dir / file)
        index["shards"].append(
            {"file": file, "records": [start, stop], "num_pairs": int(tensors["target_tokens"].numel())}
        )
        index["shards"].sort(key=lambda s: s["file"])
        index["complete"] = len(index["shards"]) == index["num_shards"]
        _write_json_atomic(index_path, index)
        written += 1
    bar.close()
    index["complete"] = len(index["shards"]) == index["num_shards"]
    _write_json_atomic(index_path, index)
    return index


def write_manifest(
    path: str | os.PathLike, entries: Iterable[tuple[dict, dict, str]], *, inputs_dir: str | None = None
) -> Path:
    """Write a manifest plus its .pt input files from (drafter_inputs, target_inputs, prompt) triples.

    Input files go to ``inputs_dir`` (default: ``<manifest stem>_inputs`` beside the manifest) and are
    referenced relative to the manifest's folder.
    """
    path = Path(path)
    folder = Path(inputs_dir) if inputs_dir else path.parent / f"{path.stem}_inputs"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, (drafter_inputs, target_inputs, prompt) in enumerate(entries):
        names = {}
        for key, inputs in (("drafter_inputs", drafter_inputs), ("target_inputs", target_inputs)):
            file = folder / f"{number:06d}_{key.split('_')[0]}.pt"
            torch.save({k: v.contiguous() for k, v in inputs.items()}, file)
            names[key] = os.path.relpath(file, path.parent)
        lines.append(json.dumps({**names, "prompt": prompt}))
    path.write_text("\n".join(lines) + "\n")
    return path
