"""Rejection resampling over draft chains and trees: validation and backend dispatch.

Backends: ``cuda`` (csrc/verify.cu via crossspec_kernels._C), ``triton``
(crossspec_kernels/triton/verify.py), ``torch`` (crossspec_kernels/torch_ops/verify.py: vectorised
PyTorch, sync-free, traceable by torch.compile) and ``reference`` (crossspec_kernels/reference.py,
the spec). All four give the same tokens for the same inputs and seed.

``crossspec::verify`` is the op as a ``torch.library`` custom op with a fake implementation. In
eager mode ``verify`` calls the backend directly (the custom-op dispatcher would add host time on
every round); under ``torch.compile`` the torch backend is traced inline (so the compiler can fuse
it) and the other backends go through the custom op (see ``run_verify``).
"""

from __future__ import annotations

import math

import torch

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import pick_backend
from crossspec_kernels.reference import MAX_BATCH, MAX_SLOTS, MAX_VOCAB, VerifyBuffers, VerifyOutput
from crossspec_kernels.torch_ops.verify import verify as _torch_verify

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)
_UINT64_RANGE = (-(1 << 63), (1 << 64) - 1)
SUPPORTED_BACKENDS = ("cuda", "triton", "torch", "reference")


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
    out: VerifyBuffers | None = None,
) -> VerifyOutput:
    """Accept the longest draft path the target agrees with, plus one correction/bonus token.

    Args:
        target_logits: [B, N+1, V] fp32/fp16/bf16; row 0 = logits at the root (the last committed
            token), row i + 1 = logits after draft node i.
        draft_tokens: [B, N] int64/int32 draft nodes. Ids outside [0, V) are absent nodes (ragged
            batches): never accepted, and neither are their descendants.
        parents: [B, N] or [N] parent of each node in [-1, i) (-1 = root); None = a chain.
        draft_probs: [B, N+1, V] distribution each node's children were drawn from (recursive
            rejection sampling), or None for deterministic candidates such as top-k. A child x whose
            q(x) is not finite and > 0 (NaN, inf, 0, negative) cannot have been drawn from q: it is
            rejected without changing the residual, so no draft is ever accepted on the basis of
            such a value; when every child is rejected the emitted token is drawn from the residual
            of the children tried (the target distribution itself when none was), and the output
            keeps the target's law whenever the children really were drawn from q.
        temperature: float or [B] tensor; 0 = greedy. Must be finite and >= 0 (ValueError
            otherwise, for a float and for a CPU tensor's values). Device tensor values are not
            read: there a value that is not finite and > 0 (NaN, inf, negative, 0) is greedy, on
            every backend. A Python 0 lets the torch backend skip the sampling work entirely.
        seed, offset: int or [B] int64 tensors keying the Philox noise (uint64 bits); tensors keep
            the op free of host syncs and capturable in a CUDA graph.
        backend: "cuda", "triton", "torch" or "reference"; None picks: CUDA tensors -> cuda when the
            extension is built, else triton, else torch; CPU tensors -> torch, or triton under
            TRITON_INTERPRET=1 (not bf16).
        validate_tree: read tensor values to validate them: parents (in [-1, i)) and, for CPU
            tensors, the temperature values. Reading a CUDA tensor's values costs a host sync: pass
            False inside CUDA graphs and hot loops (the engine's round), where malformed nodes are
            treated as absent instead. Under torch.compile no value is read either way.
        out: preallocated ``VerifyBuffers.empty(B, N, device)``, reused every round: the results are
            written into out.tokens, out.num_accepted and out.path and those very tensors are
            returned (cuda/triton also use out.next_child and out.emitted as workspace). None
            allocates new tensors.

    Returns:
        VerifyOutput(tokens [B, N+1], num_accepted [B], path [B, N]), int64, -1 padded.

    Host syncs: none on any backend but the reference when ``validate_tree=False`` (or the values
    live on the CPU). For the least host time per round call ``run_verify`` with inputs normalised
    once (see there).
    """
    target_logits, draft_tokens, parents, draft_probs = _check_tensors(
        target_logits, draft_tokens, parents, draft_probs
    )
    batch, num_nodes = draft_tokens.shape
    device = target_logits.device
    read_values = validate_tree and not torch.compiler.is_compiling()
    if read_values and parents is not None:
        _check_tree(parents)
    backend = pick_backend("verify", backend, device, target_logits.dtype, supported=SUPPORTED_BACKENDS)
    if out is not None:
        _check_out(out, batch, num_nodes, device)
    if backend == "torch" and _is_zero(temperature):  # every row greedy: no noise is needed
        temperature_rows = None
        seed_rows = _per_row_uint64("seed", seed, batch, device, materialize=False)
        offset_rows = _per_row_uint64("offset", offset, batch, device, materialize=False)
    else:
        temperature_rows = _per_row_temperature(temperature, batch, device, read_values)
        seed_rows = _per_row_uint64("seed", seed, batch, device)
        offset_rows = _per_row_uint64("offset", offset, batch, device)
    return run_verify(
        target_logits,
        draft_tokens,
        parents,
        draft_probs,
        temperature_rows,
        seed_rows,
        offset_rows,
        backend=backend,
        out=out,
    )


def run_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor | None,
    seed: torch.Tensor | None,
    offset: torch.Tensor | None,
    *,
    backend: str,
    out: VerifyBuffers | None = None,
) -> VerifyOutput:
    """``verify`` without validation or dispatch: the hot-path entry point for a caller (the engine's
    round) that checked its inputs once and keeps them in the normalised form.

    Inputs as ``verify`` would pass them on: target_logits [B, N+1, V] (unit-stride V), draft_tokens
    [B, N] int64 contiguous, parents [B, N] or [N] int64 contiguous or None (chain), draft_probs
    [B, N+1, V] (unit-stride V) or None, temperature [B] fp32, seed and offset [B] int64, ``backend``
    a name ``verify`` resolved (one of SUPPORTED_BACKENDS), ``out`` as in ``verify``. temperature,
    seed and offset may all be None: every row greedy (the torch backend then skips the noise).
    Nothing is checked: wrong shapes give wrong results or, on cuda/triton, out-of-bounds reads.

    Under torch.compile the torch backend is traced inline (the compiler can fuse it); the others
    are opaque to it and go through the ``crossspec::verify`` custom op.
    """
    args = (target_logits, draft_tokens, parents, draft_probs, temperature, seed, offset)
    if backend == "torch":
        return _torch_verify(*args, out=out)
    if torch.compiler.is_compiling():
        result = torch.ops.crossspec.verify(*args, backend)
        return VerifyOutput(*result) if out is None else out.fill(*result)
    return _run_backend(*args, backend=backend, out=out)


def _run_backend(
    target_logits, draft_tokens, parents, draft_probs, temperature, seed, offset, *, backend, out
) -> VerifyOutput:
    """The reference, triton or cuda backend, eagerly."""
    batch, num_nodes = draft_tokens.shape
    device = target_logits.device
    if temperature is None:
        temperature = torch.zeros(batch, dtype=torch.float32, device=device)
        seed = offset = torch.zeros(batch, dtype=torch.int64, device=device)
    if backend == "reference":
        result = reference.verify(
            target_logits,
            draft_tokens,
            parents,
            draft_probs,
            temperature=temperature,
            seed=seed,
            offset=offset,
        )
        return result if out is None else out.fill(*result)
    if parents is None:
        parents = reference.chain_parents(num_nodes, device)
    args = (target_logits, draft_tokens, parents.expand(batch, num_nodes).contiguous(), draft_probs)
    buffers = VerifyBuffers.empty(batch, num_nodes, device) if out is None else out
    if backend == "triton":
        from crossspec_kernels.triton.verify import verify as triton_verify

        triton_verify(*args, temperature=temperature, seed=seed, offset=offset, buffers=buffers)
    else:
        _cuda_verify(*args, temperature=temperature, seed=seed, offset=offset, buffers=buffers)
    return VerifyOutput(buffers.tokens, buffers.num_accepted, buffers.path)


# ----------------------------------------------------------------------------------------------
# The custom op (torch.compile, CUDA graphs through compiled regions)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("crossspec::verify", mutates_args=())
def _verify_op(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor | None,
    seed: torch.Tensor | None,
    offset: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """crossspec::verify: ``run_verify`` on inputs ``verify`` has checked; new output tensors."""
    args = (target_logits, draft_tokens, parents, draft_probs, temperature, seed, offset)
    if backend == "torch":
        return tuple(_torch_verify(*args))
    return tuple(_run_backend(*args, backend=backend, out=None))


@_verify_op.register_fake
def _(target_logits, draft_tokens, parents, draft_probs, temperature, seed, offset, backend):
    batch, num_nodes = draft_tokens.shape
    new = draft_tokens.new_empty
    return new((batch, num_nodes + 1)), new((batch,)), new((batch, num_nodes))


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
        pass  # a chain: backends that need an array build it
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
        None if parents is None else parents.to(torch.int64).contiguous(),
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


def _is_zero(temperature) -> bool:
    return not isinstance(temperature, (torch.Tensor, bool)) and temperature == 0


def _per_row_temperature(temperature, batch: int, device, read_values: bool) -> torch.Tensor:
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
        cpu_values = read_values and temperature.device.type == "cpu"
        if cpu_values and not bool(((temperature >= 0) & (temperature < math.inf)).all()):
            raise ValueError(
                f"verify: temperature values must be >= 0 and finite, got {temperature.tolist()}"
            )
        return temperature.to(torch.float32).expand(batch).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"verify: temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not 0 <= temperature < math.inf:  # also rejects NaN
        raise ValueError(f"verify: temperature must be >= 0 and finite, got {temperature}")
    return torch.full((batch,), float(temperature), dtype=torch.float32, device=device)


def _per_row_uint64(name: str, value, batch: int, device, materialize: bool = True) -> torch.Tensor | None:
    """[B] int64 tensor of the uint64 bits (None when only checking: ``materialize=False``)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise ValueError(f"verify: {name} tensor must be int64, got {value.dtype}")
        if value.shape not in ((), (1,), (batch,)):
            raise ValueError(
                f"verify: {name} must be an int or a [B] = [{batch}] tensor, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"verify: {name} is on {value.device} but target_logits is on {device}")
        return value.expand(batch).contiguous() if materialize else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"verify: {name} must be an int or an int64 tensor, got {type(value).__name__}")
    low, high = _UINT64_RANGE
    if not low <= value <= high:
        raise ValueError(f"verify: {name} must fit in 64 bits, got {value}")
    if not materialize:
        return None
    signed = value - (1 << 64) if value >= (1 << 63) else value  # same uint64 bits in an int64
    return torch.full((batch,), signed, dtype=torch.int64, device=device)


def _check_out(out, batch: int, num_nodes: int, device) -> None:
    if not isinstance(out, VerifyBuffers):
        raise TypeError(
            f"verify: out must be a VerifyBuffers (VerifyBuffers.empty(B, N, device)) or None, got "
            f"{type(out).__name__}"
        )
    slots = (batch, num_nodes + 1)
    expected = {
        "tokens": (slots, torch.int64),
        "num_accepted": ((batch,), torch.int64),
        "path": ((batch, num_nodes), torch.int64),
        "next_child": (slots, torch.int32),
        "emitted": (slots, torch.int64),
    }
    for name, buffer in zip(out._fields, out, strict=True):
        shape, dtype = expected[name]
        if not isinstance(buffer, torch.Tensor):
            got = type(buffer).__name__
        elif (buffer.shape, buffer.dtype, buffer.device) != (
            shape,
            dtype,
            device,
        ) or not buffer.is_contiguous():
            got = f"{tuple(buffer.shape)} {buffer.dtype} on {buffer.device}"
            got += "" if buffer.is_contiguous() else " (not contiguous)"
        else:
            continue
        raise ValueError(
            f"verify: out.{name} must be a contiguous {list(shape)} {dtype} tensor on {device}, got {got}"
        )


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
