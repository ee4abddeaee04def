"""KV-cache compaction after verification: validation, Hugging Face caches, backend dispatch.

Backends: ``triton`` (crossspec_kernels/triton/compact_kv.py, one launch for all layers of a
cache) and ``reference`` (crossspec_kernels/reference.py, the spec). There is no CUDA C++ version:
the op is a gather of a few rows per head, bound by launch latency, which the Triton kernel
already pays once per cache.

``crossspec::compact_kv`` is the op as a ``torch.library`` custom op (mutating the cache tensors)
with a fake implementation: eager calls run the backend directly, torch.compile goes through the
custom op.
"""

from __future__ import annotations

import torch

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import pick_backend, triton_available

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)


def compact_kv(
    caches,
    path: torch.Tensor,
    num_accepted: torch.Tensor,
    tree_start: int | torch.Tensor,
    *,
    backend: str | None = None,
    crop: bool = True,
) -> None:
    """Move each request's accepted draft nodes next to its root, in place, in every layer.

    After a verification forward, row b of every cache holds the root (the last committed token)
    at position tree_start[b] and draft node i at tree_start[b] + 1 + i. Afterwards position
    tree_start[b] + 1 + j holds accepted node path[b, j] for j < num_accepted[b]; the committed
    length of row b is tree_start[b] + 1 + num_accepted[b] and later positions are stale. Rejected
    slots are never read.

    Args:
        caches: a list or tuple of [B, H, L, D] tensors (keys and values of every layer; any strides
            with a unit-stride D, so HF cache views work; H, L and D may differ between tensors),
            or a Hugging Face cache: ``cache.layers[i].keys/.values`` (transformers >= 4.56, 5.x)
            or ``cache.key_cache/.value_cache`` (older). Sliding-window and quantized layers are
            refused: their positions do not follow tree_start.
        path: [B, N] int64/int32 accepted node ids in increasing order, -1 padded (``verify().path``).
        num_accepted: [B] int64/int32 (``verify().num_accepted``).
        tree_start: int, or [B] int64/int32 tensor: position of the root in each row.
        backend: "triton" or "reference"; None picks triton for CUDA tensors (and CPU tensors under
            TRITON_INTERPRET=1), else the reference.
        crop: HF caches only: trim the cache to the committed length afterwards when every row has
            the same one (batch 1, or equal counts): DynamicCache layers are cropped, static layers
            (transformers 5.x ``cumulative_length``) have their length set. Ragged batches are left
            at length L: the caller keeps per-row lengths c_b = tree_start[b] + 1 + num_accepted[b]
            and must mask positions [c_b, L) of row b in every later forward (zeros in a 2-D
            attention_mask, with explicit position_ids = c_b + i for the new tokens), or crop
            itself once the rows agree.

    Host syncs: none for tensor lists. Values are checked only on CPU tensors (free there); on
    CUDA the kernel stays in bounds by itself (count clamped to [0, N], positions masked to
    [0, L), malformed path entries move nothing). Cropping an HF cache reads the committed lengths
    to the host (one sync; HF cache lengths are Python ints): pass ``crop=False`` to skip it.
    The triton backend is capturable in a CUDA graph when it has already run once on the same
    cache tensors (static caches), which builds and keeps their pointer table.
    """
    tensors, hf_cache = _cache_tensors(caches)
    tracing = torch.compiler.is_compiling()
    if tracing and hf_cache is not None and crop:
        raise ValueError(
            "compact_kv: crop=True reads the committed lengths to the host, which torch.compile cannot "
            "trace; pass crop=False inside compiled code (and crop outside it)"
        )
    path, num_accepted, tree_start = _check(tensors, path, num_accepted, tree_start, tracing=tracing)

    backend = _resolve_backend(backend, path.device, tensors[0].dtype)
    if tracing:
        torch.ops.crossspec.compact_kv(tensors, path, num_accepted, tree_start, backend)
    else:
        _run_backend(tensors, path, num_accepted, tree_start, backend)

    if hf_cache is not None and crop:
        _crop(hf_cache, tree_start + 1 + num_accepted)


def _run_backend(
    caches: list[torch.Tensor],
    path: torch.Tensor,
    num_accepted: torch.Tensor,
    tree_start: torch.Tensor,
    backend: str,
) -> None:
    if backend == "reference":
        reference.compact_kv(caches, path, num_accepted, tree_start)
    else:
        from crossspec_kernels.triton.compact_kv import compact_kv as triton_compact_kv

        triton_compact_kv(caches, path, num_accepted, tree_start)


# crossspec::compact_kv: the op on checked inputs, writing the caches in place (torch.compile calls it).
_compact_kv_op = torch.library.custom_op("crossspec::compact_kv", mutates_args=("caches",))(_run_backend)


@_compact_kv_op.register_fake
def _(caches, path, num_accepted, tree_start, backend) -> None:
    return None


def _cache_tensors(caches) -> tuple[list[torch.Tensor], object | None]:
    """The [B, H, L, D] tensors to compact, and the HF cache object they came from (or None)."""
    if isinstance(caches, torch.Tensor):
        raise TypeError(
            "compact_kv: caches must be a list/tuple of [B, H, L, D] tensors or a Hugging Face cache, "
            f"got a single tensor of shape {tuple(caches.shape)} (wrap it in a list)"
        )
    if isinstance(caches, (list, tuple)):
        for index, cache in enumerate(caches):
            if not isinstance(cache, torch.Tensor):
                raise TypeError(
                    f"compact_kv: caches[{index}] must be a torch.Tensor, got {type(cache).__name__}"
                )
        return list(caches), None
    layers = getattr(caches, "layers", None)
    if layers is not None:  # transformers >= 4.56: one object per layer
        tensors = []
        for index, layer in enumerate(layers):
            kind = type(layer).__name__
            if getattr(layer, "is_sliding", False) or "Quantized" in kind:
                raise ValueError(
                    f"compact_kv: cache layer {index} is a {kind}; its positions do not follow tree_start "
                    "(only full-attention DynamicCache/StaticCache layers can be compacted)"
                )
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)) or keys.dim() != 4:
                raise ValueError(
                    f"compact_kv: cache layer {index} ({kind}) holds no [B, H, L, D] keys/values "
                    "(compact after the verification forward; linear-attention layers are not supported)"
                )
            tensors += [keys, values]
        return tensors, caches
    if hasattr(caches, "key_cache") and hasattr(caches, "value_cache"):  # older transformers
        return [*caches.key_cache, *caches.value_cache], caches
    raise TypeError(
        "compact_kv: caches must be a list/tuple of [B, H, L, D] tensors or a Hugging Face cache "
        f"(with .layers or .key_cache/.value_cache), got {type(caches).__name__}"
    )


def _check(tensors, path, num_accepted, tree_start, *, tracing: bool):
    """Shape/dtype/device checks (no host sync); values too when they are on the CPU and not traced.

    Returns path [B, N] int64 contiguous and num_accepted, tree_start [B] int64 on path's device.
    """
    if not isinstance(path, torch.Tensor):
        raise TypeError(f"compact_kv: path must be a torch.Tensor, got {type(path).__name__}")
    if not isinstance(num_accepted, torch.Tensor):
        raise TypeError(f"compact_kv: num_accepted must be a torch.Tensor, got {type(num_accepted).__name__}")
    if path.dim() != 2:
        raise ValueError(f"compact_kv: path must be 2-D [B, N], got shape {tuple(path.shape)}")
    if path.dtype not in _INT_DTYPES:
        raise ValueError(f"compact_kv: path must be int64 or int32, got {path.dtype}")
    batch, num_nodes = path.shape
    device = path.device
    if num_accepted.dtype not in _INT_DTYPES:
        raise ValueError(f"compact_kv: num_accepted must be int64 or int32, got {num_accepted.dtype}")
    if num_accepted.shape != (batch,):
        raise ValueError(
            f"compact_kv: num_accepted must have shape [B] = [{batch}], got {tuple(num_accepted.shape)}"
        )
    if num_accepted.device != device:
        raise ValueError(f"compact_kv: num_accepted is on {num_accepted.device} but path is on {device}")

    if not tensors:
        raise ValueError("compact_kv: caches is empty (no layers to compact)")
    dtype = tensors[0].dtype
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"compact_kv: caches must be fp32, fp16 or bf16, got {dtype}")
    addresses: dict[int, tuple[int, int]] = {}  # cache index -> its byte span
    for index, cache in enumerate(tensors):
        name = f"caches[{index}]"
        if cache.dim() != 4:
            raise ValueError(f"compact_kv: {name} must be 4-D [B, H, L, D], got shape {tuple(cache.shape)}")
        if cache.dtype != dtype:
            raise ValueError(
                f"compact_kv: {name} is {cache.dtype} but caches[0] is {dtype} (one dtype per call)"
            )
        if cache.device != device:
            raise ValueError(f"compact_kv: {name} is on {cache.device} but path is on {device}")
        if cache.shape[0] != batch:
            raise ValueError(f"compact_kv: {name} has batch {cache.shape[0]} but path has batch {batch}")
        if cache.stride(3) != 1 and cache.shape[3] > 1:
            # A contiguous copy would be compacted instead of the cache itself.
            raise ValueError(
                f"compact_kv: {name} must have a unit-stride last dim (D), got strides {cache.stride()}"
            )
        kv_len = cache.shape[2]
        if num_nodes + 1 > kv_len:
            raise ValueError(
                f"compact_kv: {name} has L = {kv_len} positions, too few for the root and N = {num_nodes} nodes"
            )
        if cache.numel() and device.type != "meta" and not tracing:  # no data pointers while tracing
            addresses[index] = _byte_span(cache)
    _check_disjoint(addresses)
    min_len = min(cache.shape[2] for cache in tensors)

    if isinstance(tree_start, torch.Tensor):
        if tree_start.dtype not in _INT_DTYPES:
            raise ValueError(f"compact_kv: tree_start tensor must be int64 or int32, got {tree_start.dtype}")
        if tree_start.shape not in ((), (1,), (batch,)):
            raise ValueError(
                f"compact_kv: tree_start must be an int or a [B] = [{batch}] tensor, got shape {tuple(tree_start.shape)}"
            )
        if tree_start.device != device:
            raise ValueError(f"compact_kv: tree_start is on {tree_start.device} but path is on {device}")
        tree_start = tree_start.to(torch.int64).expand(batch).contiguous()
    elif isinstance(tree_start, bool) or not isinstance(tree_start, int):
        raise TypeError(f"compact_kv: tree_start must be an int or a tensor, got {type(tree_start).__name__}")
    else:
        if not 0 <= tree_start <= min_len - 1 - num_nodes:
            raise ValueError(_tree_start_error("tree_start", tree_start, num_nodes, min_len))
        tree_start = torch.full((batch,), tree_start, dtype=torch.int64, device=device)

    path = path.to(torch.int64).contiguous()
    num_accepted = num_accepted.to(torch.int64).contiguous()
    if device.type == "cpu" and not tracing:
        _check_tree_start(tree_start, num_nodes, min_len)
        _check_path(path, num_accepted)
    return path, num_accepted, tree_start


def _check_tree_start(tree_start: torch.Tensor, num_nodes: int, kv_len: int) -> None:
    bad = (tree_start < 0) | (tree_start + 1 + num_nodes > kv_len)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(_tree_start_error(f"tree_start[{row}]", int(tree_start[row]), num_nodes, kv_len))


def _tree_start_error(name: str, value: int, num_nodes: int, kv_len: int) -> str:
    return (
        f"compact_kv: {name} = {value} out of range: the root and N = {num_nodes} nodes "
        f"need 0 <= tree_start and tree_start + 1 + N <= L = {kv_len}"
    )


def _check_path(path: torch.Tensor, num_accepted: torch.Tensor) -> None:
    num_nodes = path.shape[1]
    bad_count = (num_accepted < 0) | (num_accepted > num_nodes)
    if bool(bad_count.any()):
        row = int(bad_count.nonzero()[0, 0])
        raise ValueError(
            f"compact_kv: num_accepted[{row}] = {int(num_accepted[row])} must be in [0, N = {num_nodes}]"
        )
    live = torch.arange(num_nodes) < num_accepted[:, None]  # the entries that name accepted nodes
    bad_node = live & ((path < 0) | (path >= num_nodes))
    if bool(bad_node.any()):
        row, column = (int(i) for i in bad_node.nonzero()[0])
        raise ValueError(
            f"compact_kv: path[{row}, {column}] = {int(path[row, column])} must be a node id in [0, {num_nodes}) "
            f"(num_accepted[{row}] = {int(num_accepted[row])})"
        )
    not_increasing = live[:, 1:] & (path[:, 1:] <= path[:, :-1])
    if bool(not_increasing.any()):
        row = int(not_increasing.nonzero()[0, 0])
        count = int(num_accepted[row])
        raise ValueError(
            f"compact_kv: path[{row}] must be strictly increasing over its first num_accepted = {count} "
            f"entries (as verify returns it), got {path[row, :count].tolist()}"
        )


def _resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if backend == "cuda":
        raise ValueError(
            "compact_kv: there is no backend='cuda' (no CUDA C++ version: a row gather gains nothing "
            "over the Triton kernel); use 'triton' or 'reference'"
        )
    picked = pick_backend("compact_kv", backend, device, dtype)
    if picked == "cuda":  # the default for CUDA tensors when _C is built: not an option here
        picked = "triton" if triton_available() else "reference"
    return picked


def _crop(cache, committed: torch.Tensor) -> None:
    """Trim an HF cache to the committed length when every row shares it (one host read)."""
    lengths = set(committed.tolist())
    if len(lengths) != 1:
        return  # ragged: the caller masks each row's stale tail (see compact_kv's docstring)
    length = lengths.pop()
    layers = getattr(cache, "layers", None)
    if layers is None:  # older transformers: crop(negative) removes that many tokens
        current = cache.key_cache[0].shape[-2]
        if current > length:
            cache.crop(length - current)
        return
    for layer in layers:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):  # 5.x StaticLayer: fixed buffers and a length counter
            counter.fill_(length)
            continue
        current = layer.keys.shape[-2]
        if current > length:
            # A negative argument removes that many tokens in 4.56+ and 5.x alike (5.x deprecates
            # positive absolute lengths, and crop(0) would empty a 4.x layer).
            layer.crop(length - current)


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes a strided tensor can touch."""
    extent = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride())) + 1
    start = tensor.data_ptr()
    return start, start + extent * tensor.element_size()


def _check_disjoint(spans: dict[int, tuple[int, int]]) -> None:
    """Refuse caches whose memory overlaps: compacting shared rows twice moves them twice."""
    ordered = sorted(spans.items(), key=lambda item: item[1])
    for (first, (_, end)), (second, (start, _)) in zip(ordered, ordered[1:]):
        if start < end:
            low, high = sorted((first, second))
            raise ValueError(
                f"compact_kv: caches[{low}] and caches[{high}] overlap in memory (views of one buffer); "
                "every cache must be its own memory (compacting shared rows twice moves them twice)"
            )
