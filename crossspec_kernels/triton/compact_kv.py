"""Triton kernel for KV-cache compaction (crossspec_kernels.compact_kv).

One launch moves the accepted tree slots of every layer's keys and values. The launcher writes the
base address of each cache tensor into a small int64 table; a program reads its tensor's address
from the table and casts it to a pointer, so T tensors of equal shape, strides and dtype share a
launch (Triton's CPU interpreter treats the cast as a bitcast of the address, so the same kernel
runs there on CPU tensors). Tensors with different shapes or strides (e.g. per-layer head counts),
or not 16-byte aligned, form separate groups, one launch each.

Grid: (head, request row, tensor). A program moves the rows ``tree_start + 1 + path[j]`` to
``tree_start + 1 + j`` for j < num_accepted, in place. Rows move to lower positions, and a source
row can be another row's destination (path = [1, 2]: j = 0 reads slot 2, which j = 1 overwrites),
so the threads of a program first load every source row of a chunk of j, meet at a barrier, and
only then store. Chunks go in increasing j, which needs no barrier between them: path[j] >= j for
an increasing path, so a later chunk reads positions above every destination of earlier chunks.
Rows already in place (path[j] == j, e.g. every accepted chain prefix) are neither read nor
written, and rejected slots are never read.
"""

from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl

from crossspec_kernels.triton._launch import interpreter_serialized

_MAX_BLOCK_D = 256
_TILE_ELEMENTS = 4096  # BLOCK_N * BLOCK_D: 32 elements per thread at 4 warps
MAX_GRID_YZ = 65535  # CUDA's limit on grid.y (request rows) and grid.z (tensors of a launch)
_ALIGNMENT = 16  # bytes; aligned tables let the loads and stores vectorise


@triton.jit
def _compact_kv_kernel(
    table_ptr,
    like_ptr,
    path_ptr,
    num_accepted_ptr,
    tree_start_ptr,
    num_nodes,
    kv_len,
    stride_batch,
    stride_head,
    stride_pos,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    tensor = tl.program_id(2).to(tl.int64)

    # like_ptr is one tensor of the group, passed only for its element type.
    base = tl.load(table_ptr + tensor).to(tl.pointer_type(like_ptr.dtype.element_ty))
    if ALIGNED:
        # The cast drops alignment facts; with them (and strides Triton saw divisible by 16) the
        # rows move as 16-byte vectors.
        base = tl.multiple_of(base, 16)
    base += row * stride_batch + head * stride_head

    # Values are not checked on CUDA (that would be a host sync), so the kernel stays in bounds
    # by itself: count is clamped to [0, N] and every position is masked to [0, L).
    count = tl.minimum(tl.maximum(tl.load(num_accepted_ptr + row), 0), num_nodes)
    first = tl.load(tree_start_ptr + row) + 1
    path_row = path_ptr + row * num_nodes

    for d_start in tl.static_range(0, HEAD_DIM, BLOCK_D):
        d = d_start + tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        for j_start in range(0, count, BLOCK_N):
            j = j_start + tl.arange(0, BLOCK_N)
            in_path = j < count
            node = tl.load(path_row + j, mask=in_path, other=-1).to(tl.int64)
            source = first + node
            target = first + j
            # node == j is already in place; node < j or node >= N is a malformed path (never from
            # verify) and moves nothing rather than breaking the read-before-overwrite order.
            move = in_path & (node > j) & (node < num_nodes) & (target >= 0) & (source < kv_len)
            mask = move[:, None] & d_ok[None, :]
            rows = tl.load(base + source[:, None] * stride_pos + d[None, :], mask=mask)
            # Every source row of this chunk is read before any thread overwrites one.
            tl.debug_barrier()
            tl.store(base + target[:, None] * stride_pos + d[None, :], rows, mask=mask)


def block_sizes(head_dim: int, num_nodes: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): D in chunks of at most 256, a tile of at most 4096 elements."""
    block_d = min(_MAX_BLOCK_D, triton.next_power_of_2(head_dim))
    block_n = max(1, min(triton.next_power_of_2(max(num_nodes, 1)), _TILE_ELEMENTS // block_d))
    return block_n, block_d


# Device tables keyed by (device, addresses). The key is the table's whole content, so a hit is
# always correct, and caches whose tensors keep their addresses (static caches) build the table
# once, which is also what makes the launch capturable in a CUDA graph.
_TABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_TABLES = 64
# Tables a CUDA graph has captured: the graph keeps their address, so they are never freed.
_CAPTURED: dict = {}


def _pointer_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    addresses = tuple(t.data_ptr() for t in tensors)
    device = tensors[0].device
    if device.type != "cuda":  # the interpreter reads CPU memory directly
        return torch.tensor(addresses, dtype=torch.int64)
    stream = torch.cuda.current_stream(device)
    key = (device, addresses)
    entry = _TABLES.get(key)
    capturing = torch.cuda.is_current_stream_capturing()
    if entry is not None:
        _TABLES.move_to_end(key)
        table, made_on = entry
        if capturing:
            _CAPTURED[key] = table
        elif made_on != stream:
            # Evicting the table later must not hand its memory to its own stream while this
            # stream's kernel may still read it.
            table.record_stream(stream)
        return table
    if capturing:
        raise RuntimeError(
            "compact_kv: a CUDA graph cannot capture building the pointer table of new cache tensors "
            "(a host-to-device copy); call compact_kv once with the same cache tensors before capturing"
        )
    # Pinned memory and a non-blocking copy: no host sync; the caching host allocator keeps the
    # buffer alive until the copy has run.
    host = torch.tensor(addresses, dtype=torch.int64).pin_memory()
    table = host.to(device, non_blocking=True)
    _TABLES[key] = (table, stream)
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return table


@interpreter_serialized
def compact_kv(
    caches: list[torch.Tensor],
    path: torch.Tensor,
    num_accepted: torch.Tensor,
    tree_start: torch.Tensor,
    *,
    block_n: int | None = None,
) -> None:
    """Launcher. Inputs come checked from ops/compact_kv.py: caches [B, H, L, D] of one dtype and
    device with unit-stride D, path [B, N] int64 contiguous, num_accepted and tree_start [B] int64.
    ``block_n`` overrides the chunk of accepted rows a program moves at once (tests use it to cross
    chunk boundaries on small paths)."""
    batch, num_nodes = path.shape
    if batch == 0 or num_nodes == 0:
        return
    if path.is_cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter copies tensor arguments to the host, but not the memory the table points to.
        raise ValueError("triton compact_kv: TRITON_INTERPRET=1 runs on CPU tensors only, got CUDA tensors")
    if batch > MAX_GRID_YZ:
        raise ValueError(f"triton compact_kv: batch size must be at most {MAX_GRID_YZ}, got {batch}")
    # One launch per (dtype, shape, strides, alignment): every layer of an HF cache shares one.
    groups: dict[tuple, list[torch.Tensor]] = {}
    for cache in caches:
        if cache.stride(3) != 1 and cache.shape[3] > 1:
            raise ValueError("triton compact_kv: cache tensors need a unit-stride head dim")
        aligned = cache.data_ptr() % _ALIGNMENT == 0
        groups.setdefault((cache.dtype, tuple(cache.shape), cache.stride()[:3], aligned), []).append(cache)

    for (_, shape, strides, aligned), tensors in groups.items():
        heads, kv_len, head_dim = shape[1:]
        if heads == 0 or head_dim == 0:
            continue
        if len(tensors) > MAX_GRID_YZ:
            raise ValueError(
                f"triton compact_kv: at most {MAX_GRID_YZ} cache tensors of one shape per call, got {len(tensors)}"
            )
        chunk_n, block_d = block_sizes(head_dim, num_nodes)
        if block_n is not None:
            chunk_n = block_n
        _compact_kv_kernel[(heads, batch, len(tensors))](
            _pointer_table(tensors),
            tensors[0],
            path,
            num_accepted,
            tree_start,
            num_nodes,
            kv_len,
            *strides,
            HEAD_DIM=head_dim,
            BLOCK_N=chunk_n,
            BLOCK_D=block_d,
            ALIGNED=aligned,
            num_warps=4,
            num_stages=1,
        )
