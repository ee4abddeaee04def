"""Argument checks of CrossSpecEngine and its generate(): clear errors that name the argument."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

_OP = "CrossSpecEngine"


def output_embeddings(model, name: str):
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{_OP}: {name} must be an HF model whose get_output_embeddings() is its LM head")
    return head


def hidden_size(model, name: str) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{_OP}: {name} must be an HF model with a config, got {type(model).__name__}")
    return int(text_config(model).hidden_size)


def device_of(model) -> torch.device | None:
    if model is None:
        return None
    for parameter in model.parameters():
        return parameter.device
    return None


def check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_OP}.generate: {name} must be an int >= {low}, got {value!r}")
    return value


BACKENDS = (None, "cuda", "triton", "reference")


def check_backend(owner: str, backend) -> str | None:
    """A constructor's ``backend`` argument (``owner``: the class, named in the error)."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be None, 'cuda', 'triton' or 'reference', got {backend!r}")
    return backend


def check_free_token_budget(owner: str, budget, high: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= high:
        raise ValueError(f"{owner}: free_token_budget must be an int in [1, {high}], got {budget!r}")
    return budget


def check_positions(target, prompt_width: int, max_new_tokens: int) -> None:
    """The prompt and the answer fit the target's position range (also bounds the KV cache, which
    is allocated for the whole answer up front)."""
    limit = getattr(text_config(target), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_width + max_new_tokens > limit:
        raise ValueError(
            f"{_OP}.generate: max_new_tokens={max_new_tokens} after a {prompt_width}-token prompt exceeds "
            f"the target's max_position_embeddings ({limit}); at most {max(limit - prompt_width, 0)} fit"
        )


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{_OP}.generate: {name} must be one of {choices}, got {value!r}")
    return value


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{_OP}.generate: temperature must be a float >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{_OP}.generate: temperature must be a finite float >= 0, got {temperature!r}")
    return float(temperature)


def eos_ids(target, eos, vocab: int) -> torch.Tensor:
    device = target.get_output_embeddings().weight.device
    if eos is None:
        eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else eos
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids
    ):
        raise ValueError(f"{_OP}.generate: eos_token_id must be ints in [0, {vocab}), got {eos!r}")
    return torch.tensor(list(ids), dtype=torch.int64, device=device)


def pad_id(target, eos: torch.Tensor, pad, vocab: int) -> int:
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab:
            raise ValueError(f"{_OP}.generate: pad_token_id must be an int in [0, {vocab}), got {pad!r}")
        return pad
    pad = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return int(eos[0]) if eos.numel() else 0


def check_inputs(engine, target_inputs, drafter_inputs) -> tuple[dict, dict | None]:
    """Checked copies of both input dicts; an engine without an event drafter takes drafter_inputs=None."""
    pairs = [("target_inputs", target_inputs, engine.target)]
    if engine.drafter is None:
        if drafter_inputs is not None:
            raise ValueError(
                f"{_OP}.generate: this engine has no event drafter (drafter=None); pass drafter_inputs=None"
            )
    else:
        pairs.append(("drafter_inputs", drafter_inputs, engine.drafter))
    checked = []
    for name, inputs, model in pairs:
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"{_OP}.generate: {name} must be a dict of model inputs, got {type(inputs).__name__}"
            )
        inputs = dict(inputs)
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(
                f"{_OP}.generate: {name}['input_ids'] must be a [B >= 1, T >= 1] tensor, got {got}"
            )
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{_OP}.generate: {name}['input_ids'] must be int64 or int32, got {ids.dtype}")
        # The drafter's device (an engine whose drafter has its own); the models' otherwise.
        drafter_device = getattr(engine, "drafter_device", engine.device)
        device = engine.device if name == "target_inputs" else drafter_device
        if ids.device != device:
            where = "the models" if drafter_device == engine.device else f"the {name.split('_')[0]}"
            raise ValueError(f"{_OP}.generate: {name}['input_ids'] is on {ids.device}, {where} on {device}")
        # The target's ids must index its vocabulary (its video placeholder is a vocabulary id). A
        # drafter may use placeholder ids past its vocabulary (EventGPT's event token): it checks them.
        vocab = model.get_input_embeddings().num_embeddings if name == "target_inputs" else None
        low, high = torch.aminmax(ids)
        if int(low) < 0 or (vocab is not None and int(high) >= vocab):
            bound = f"[0, {vocab})" if vocab is not None else ">= 0"
            raise ValueError(
                f"{_OP}.generate: {name}['input_ids'] must lie in {bound}, got values in [{int(low)}, {int(high)}]"
            )
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"{_OP}.generate: {name}['attention_mask'] must have input_ids' shape {tuple(ids.shape)}, got {got}"
                )
            real = mask.to(torch.bool)
            first = real.to(torch.int8).argmax(-1)  # a row's first real token
            left_padded = real == (torch.arange(real.shape[1], device=real.device) >= first[:, None])
            empty, right, holes = torch.stack(
                [(~real.any(-1)).any(), ~real[:, -1].all(), ~left_padded.all()]
            ).tolist()  # one read per request, before any model runs
            if empty:
                raise ValueError(f"{_OP}.generate: {name}['attention_mask'] has a row with no real token")
            if right:
                raise ValueError(
                    f"{_OP}.generate: {name} is right-padded; decoder-only generation needs left padding "
                    "(tokenizer padding_side='left')"
                )
            if holes:
                raise ValueError(
                    f"{_OP}.generate: {name}['attention_mask'] must be left padding only (0...0 1...1 per "
                    "row); it has a padding hole after a real token"
                )
        for reserved in ("past_key_values", "use_cache", "position_ids", "cache_position", "inputs_embeds"):
            if inputs.get(reserved) is not None:
                raise ValueError(
                    f"{_OP}.generate: {name} must not contain {reserved!r}; the engine manages it"
                )
            inputs.pop(reserved, None)
        checked.append(inputs)
    if len(checked) == 1:
        return checked[0], None
    target_batch, drafter_batch = checked[0]["input_ids"].shape[0], checked[1]["input_ids"].shape[0]
    if target_batch != drafter_batch:
        raise ValueError(
            f"{_OP}.generate: target_inputs has batch {target_batch} but drafter_inputs has batch {drafter_batch}"
        )
    return checked[0], checked[1]


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_seed(seed) -> int:
    """A seed is an int in [0, 2^64) (it keys Philox as uint64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 64):
        raise ValueError(f"{_OP}.generate: seed must be an int in [0, 2**64), got {seed!r}")
    return seed - (1 << 64) if seed >= (1 << 63) else seed  # the same 64 bits as an int64


def check_seeds(seed, batch: int) -> list[int]:
    """One seed for every row, or a sequence of one per row (each keys its row's noise)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"{_OP}.generate: seed has {len(seed)} entries for a batch of {batch} rows")
        return [check_seed(value) for value in seed]
    return [check_seed(seed)] * batch


def check_drafter(drafter, adapter, target) -> None:
    """The drafter is an HF model; the adapter maps its hidden size onto the target's."""
    d_target = hidden_size(target, "target")
    d_drafter = hidden_size(drafter, "drafter")
    if not callable(getattr(drafter, "get_input_embeddings", None)):
        raise ValueError(f"{_OP}: drafter must be an HF model with get_input_embeddings()")
    if adapter is None:
        if d_drafter != d_target:
            raise ValueError(
                f"{_OP}: adapter=None needs equal hidden sizes, got drafter {d_drafter} and target "
                f"{d_target}; pass an adapter (crossspec_kernels.models.adapters)"
            )
        return
    if not isinstance(adapter, torch.nn.Module):
        raise ValueError(
            f"{_OP}: adapter must be an nn.Module mapping [..., {d_drafter}] to [..., {d_target}] or None, "
            f"got {type(adapter).__name__}"
        )
    from crossspec_kernels.models.adapters import EagleAdapter

    if isinstance(adapter, EagleAdapter):
        raise ValueError(
            f"{_OP}: an EagleAdapter needs a window of previous positions and tokens, which the engine's "
            "drafter does not pass; use a linear or bottleneck adapter, or any nn.Module mapping hidden states"
        )
    config = getattr(adapter, "config", None)
    dims = (getattr(config, "d_draft", None), getattr(config, "d_target", None))
    if None in dims:  # an arbitrary module: probe it once with one zero row
        parameter = next(iter(adapter.parameters()), None)
        probe = torch.zeros(1, d_drafter) if parameter is None else parameter.new_zeros(1, d_drafter)
        with torch.no_grad():
            try:
                shape = tuple(adapter(probe).shape)
            except Exception as error:  # any failure means "not an adapter"
                raise ValueError(f"{_OP}: adapter failed on a [1, {d_drafter}] input: {error}") from error
        dims = (d_drafter, shape[-1] if shape[:-1] == (1,) else shape)
    if dims != (d_drafter, d_target):
        raise ValueError(
            f"{_OP}: adapter maps {dims[0]} -> {dims[1]}, but the drafter's hidden size is {d_drafter} "
            f"and the target's {d_target}"
        )


def drafter_device(drafter, adapter, target_device: torch.device) -> torch.device:
    """The drafter's device (the target's when it has no parameters): one this machine has, and
    the adapter's too (an adapter runs with its drafter)."""
    from crossspec_kernels.runtime.devices import check_device

    device = device_of(drafter)
    device = target_device if device is None else device
    if device != target_device:
        device = check_device(device, "drafter")
    adapter_device = device_of(adapter)
    if adapter_device is not None and adapter_device != device:
        raise ValueError(
            f"{_OP}: adapter is on {adapter_device} but the drafter is on {device}; an adapter runs with "
            "its drafter (move it there)"
        )
    return device


def check_streams(streams, device: torch.device, drafter_device: torch.device | None = None):
    """(drafter stream, target stream): CUDA streams on the drafter's and the target's devices."""
    if streams is None:
        return None
    drafter_device = device if drafter_device is None else drafter_device
    if device.type != "cuda":
        raise ValueError(f"{_OP}: streams are for CUDA models; the target is on {device}")
    if drafter_device.type != "cuda":
        raise ValueError(f"{_OP}: streams are for CUDA models; the drafter is on {drafter_device}")
    if (
        not isinstance(streams, (tuple, list))
        or len(streams) != 2
        or not all(isinstance(stream, torch.cuda.Stream) for stream in streams)
    ):
        raise ValueError(f"{_OP}: streams must be (drafter stream, target stream), two torch.cuda.Stream")
    if drafter_device == device:
        if any(stream.device != device for stream in streams):
            raise ValueError(f"{_OP}: streams must be on the models' device {device}")
    elif (streams[0].device, streams[1].device) != (drafter_device, device):
        raise ValueError(
            f"{_OP}: streams must be (a stream on the drafter's device {drafter_device}, one on the "
            f"target's {device}), got streams on {streams[0].device} and {streams[1].device}"
        )
    return tuple(streams)
