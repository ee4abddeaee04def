"""Rejection resampling over draft chains and trees: validation and backend dispatch.

Backends: ``cuda`` (csrc/verify.cu via crossspec_kernels._C), ``triton``
(crossspec_kernels/triton/verify.py) and ``reference`` (crossspec_kernels/reference.py, the spec).
"""

from __future__ import annotations

import torch

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import pick_backend
from crossspec_kernels.reference import MAX_BATCH, MAX_SLOTS, MAX_VOCAB, VerifyBuffers, VerifyOutput

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)
_UINT64_RANGE = (-(1 << 63), (1 << 64) - 1)


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor = 0,
    offset: int | torch.Tensor = 0,
    backend: str | None = None,
    validate_tree: bool = True,
) -> VerifyOutput:
    """Accept the longest draft path the target agrees with, plus one correction/bonus token.

    Args:
        target_logits: [B, N+1, V] fp32/fp16/bf16; row 0 = logits at the root (the last committed
            token), row i + 1 = logits after draft node i.
        draft_tokens: [B, N] int64/int32 draft nodes. Ids outside [0, V) are absent nodes (ragged
            batches): never accepted, and neither are their descendants.
        parents: [B, N] or [N] parent of each node in [-1, i) (-1 = root); None = a chain.
        draft_probs: [B, N+1, V] distribution each node's children were drawn from (recursive
            rejection sampling), or None for deterministic candidates such as top-k.
        temperature: float or [B] tensor; 0 = greedy. Tensor values that are not > 0 are greedy.
        seed, offset: int or [B] int64 tensors keying the Philox noise (uint64 bits); tensors keep
            the op free of host syncs and capturable in a CUDA graph.
        backend: "cuda", "triton" or "reference"; None picks the fastest that can run.
        validate_tree: check parent values (parent in [-1, i)). Reading a CUDA tensor's values
            costs a host sync: pass False inside CUDA graphs and hot loops, where malformed nodes
            are treated as absent instead.

    Returns:
        VerifyOutput(tokens [B, N+1], num_accepted [B], path [B, N]), int64, -1 padded.
    """
    target_logits, draft_tokens, parents, draft_probs = _check_tensors(
        target_logits, draft_tokens, parents, draft_probs
    )
    batch, num_nodes = draft_tokens.shape
    device = target_logits.device
    if validate_tree:
        _check_tree(parents)
    temperature = _per_row_temperature(temperature, batch, device)
    seed = _per_row_uint64("seed", seed, batch, device)
    offset = _per_row_uint64("offset", offset, batch, device)

    backend = pick_backend("verify", backend, device, target_logits.dtype)
    if backend == "reference":
        return reference.verify(
            target_logits,
            draft_tokens,
            parents,
            draft_probs,
            temperature=temperature,
            seed=seed,
            offset=offset,
        )
    args = (target_logits, draft_tokens, parents.expand(batch, num_nodes).contiguous(), draft_probs)
    buffers = VerifyBuffers.empty(batch, num_nodes, device)
    if backend == "triton":
        from crossspec_kernels.triton.verify import verify as triton_verify

        triton_verify(*args, temperature=temperature, seed=seed, offset=offset, buffers=buffers)
    else:
        _cuda_verify(*args, temperature=temperature, seed=seed, offset=offset, buffers=buffers)
    return VerifyOutput(buffers.tokens, buffers.num_accepted, buffers.path)


def _check_tensors(target_logits, draft_tokens, parents, draft_probs):
    if not isinstance(target_logits, torch.Tensor):
        raise TypeError(f"verify: target_logits must be a torch.Tensor, got {type(target_logits).__name__}")
    if not isinstance(draft_tokens, torch.Tensor):
        raise TypeError(f"verify: draft_tokens must be a torch.Tensor, got {type(draft_tokens).__name__}")
    if target_logits.dim() != 3:
        raise ValueError(
            f"verify: target_logits must be 3-D [B, N+1, V], got shape {tuple(target_logits.shape)}"
        )
    if target_logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"verify: target_logits must be fp32, fp16 or bf16, got {target_logits.dtype}")
    if draft_tokens.dim() != 2:
        raise ValueError(f"verify: draft_tokens must be 2-D [B, N], got shape {tuple(draft_tokens.shape)}")
    if draft_tokens.dtype not in _INT_DTYPES:
        raise ValueError(f"verify: draft_tokens must be int64 or int32, got {draft_tokens.dtype}")
    batch, slots, vocab = target_logits.shape
    num_nodes = draft_tokens.shape[1]
    if draft_tokens.shape[0] != batch:
        raise ValueError(
            f"verify: draft_tokens has batch {draft_tokens.shape[0]} but target_logits has batch {batch}"
        )
    if slots != num_nodes + 1:
        raise ValueError(
            f"verify: target_logits must have N+1 = {num_nodes + 1} rows per request (root + one per draft "
            f"node), got {slots}"
        )
    if not 1 <= vocab <= MAX_VOCAB:
        raise ValueError(f"verify: target_logits vocabulary size must be in [1, {MAX_VOCAB}], got {vocab}")
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"verify: batch size must be in [1, {MAX_BATCH}], got {batch}")
    if slots > MAX_SLOTS:
        raise ValueError(f"verify: at most {MAX_SLOTS - 1} draft nodes per request, got {num_nodes}")
    device = target_logits.device
    if draft_tokens.device != device:
        raise ValueError(f"verify: draft_tokens is on {draft_tokens.device} but target_logits is on {device}")

    if parents is None:
        parents = reference.chain_parents(num_nodes, device)
    elif not isinstance(parents, torch.Tensor):
        raise TypeError(f"verify: parents must be a torch.Tensor or None, got {type(parents).__name__}")
    elif parents.dtype not in _INT_DTYPES:
        raise ValueError(f"verify: parents must be int64 or int32, got {parents.dtype}")
    elif parents.shape not in ((num_nodes,), (batch, num_nodes)):
        raise ValueError(
            f"verify: parents must have shape [N] = [{num_nodes}] or [B, N] = [{batch}, {num_nodes}], "
            f"got {tuple(parents.shape)}"
        )
    elif parents.device != device:
        raise ValueError(f"verify: parents is on {parents.device} but target_logits is on {device}")

    if draft_probs is not None:
        if not isinstance(draft_probs, torch.Tensor):
            raise TypeError(
                f"verify: draft_probs must be a torch.Tensor or None, got {type(draft_probs).__name__}"
            )
        if draft_probs.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"verify: draft_probs must be fp32, fp16 or bf16, got {draft_probs.dtype}")
        if draft_probs.dim() != 3 or draft_probs.shape[:2] != target_logits.shape[:2]:
            raise ValueError(
                f"verify: draft_probs must be [B, N+1, V] = {list(target_logits.shape)}, "
                f"got shape {tuple(draft_probs.shape)}"
            )
        if draft_probs.shape[2] != vocab:
            raise ValueError(
                f"verify: draft_probs vocabulary ({draft_probs.shape[2]}) must match target_logits ({vocab})"
            )
        if draft_probs.device != device:
            raise ValueError(
                f"verify: draft_probs is on {draft_probs.device} but target_logits is on {device}"
            )
        draft_probs = _last_dim_contiguous(draft_probs)
    return (
        _last_dim_contiguous(target_logits),
        draft_tokens.to(torch.int64).contiguous(),
        parents.to(torch.int64).contiguous(),
        draft_probs,
    )


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # Kernels take strides for B and N but stream the vocabulary with unit stride.
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _check_tree(parents: torch.Tensor) -> None:
    num_nodes = parents.shape[-1]
    if num_nodes == 0:
        return
    own_index = torch.arange(num_nodes, device=parents.device)
    bad = (parents < -1) | (parents >= own_index)
    if bool(bad.any()):
        flat = bad.reshape(-1, num_nodes)
        row, node = (int(i) for i in flat.nonzero()[0])
        value = int(parents.reshape(-1, num_nodes)[row, node])
        where = f"parents[{row}, {node}]" if parents.dim() == 2 else f"parents[{node}]"
        raise ValueError(
            f"verify: bad tree: {where} = {value}, must be in [-1, {node}) (a parent precedes its child)"
        )


def _per_row_temperature(temperature, batch: int, device) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise ValueError(f"verify: temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.shape not in ((), (1,), (batch,)):
            raise ValueError(
                f"verify: temperature must be a float or a [B] = [{batch}] tensor, got shape {tuple(temperature.shape)}"
            )
        if temperature.device != device:
            raise ValueError(
                f"verify: temperature is on {temperature.device} but target_logits is on {device}"
            )
        if temperature.device.type == "cpu" and bool((torch.isnan(temperature) | (temperature < 0)).any()):
            raise ValueError(f"verify: temperature values must be >= 0, got {temperature.tolist()}")
        return temperature.to(torch.float32).expand(batch).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"verify: temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"verify: temperature must be >= 0, got {temperature}")
    return torch.full((batch,), float(temperature), dtype=torch.float32, device=device)


def _per_row_uint64(name: str, value, batch: int, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise ValueError(f"verify: {name} tensor must be int64, got {value.dtype}")
        if value.shape not in ((), (1,), (batch,)):
            raise ValueError(
                f"verify: {name} must be an int or a [B] = [{batch}] tensor, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"verify: {name} is on {value.device} but target_logits is on {device}")
        return value.expand(batch).contiguous()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"verify: {name} must be an int or an int64 tensor, got {type(value).__name__}")
    low, high = _UINT64_RANGE
    if not low <= value <= high:
        raise ValueError(f"verify: {name} must fit in 64 bits, got {value}")
    signed = value - (1 << 64) if value >= (1 << 63) else value  # same uint64 bits in an int64
    return torch.full((batch,), signed, dtype=torch.int64, device=device)


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_verify(
    target_logits, draft_tokens, parents, draft_probs, *, temperature, seed, offset, buffers: VerifyBuffers
) -> None:
    from crossspec_kernels._ext import get_module

    batch, num_nodes = draft_tokens.shape
    device = target_logits.device
    has_probs = draft_probs is not None
    with torch.cuda.device(device):
        get_module().verify(
            target_logits=target_logits.data_ptr(),
            logits_dtype=_DTYPE_CODES[target_logits.dtype],
            logits_stride_batch=target_logits.stride(0),
            logits_stride_slot=target_logits.stride(1),
            draft_probs=draft_probs.data_ptr() if has_probs else 0,
            probs_dtype=_DTYPE_CODES[draft_probs.dtype] if has_probs else 0,
            probs_stride_batch=draft_probs.stride(0) if has_probs else 0,
            probs_stride_slot=draft_probs.stride(1) if has_probs else 0,
            draft_tokens=draft_tokens.data_ptr(),
            parents=parents.data_ptr(),
            temperature=temperature.data_ptr(),
            seed=seed.data_ptr(),
            offset=offset.data_ptr(),
            batch=batch,
            num_nodes=num_nodes,
            vocab=target_logits.shape[2],
            next_child=buffers.next_child.data_ptr(),
            emitted=buffers.emitted.data_ptr(),
            tokens=buffers.tokens.data_ptr(),
            num_accepted=buffers.num_accepted.data_ptr(),
            path=buffers.path.data_ptr(),
            stream=torch.cuda.current_stream(device).cuda_stream,
        )
