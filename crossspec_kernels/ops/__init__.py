"""Public ops: validation with named errors, then dispatch to cuda / triton / reference."""

from crossspec_kernels.ops.compact_kv import compact_kv
from crossspec_kernels.ops.tree_attention import pack_tree_mask, tree_attention
from crossspec_kernels.ops.verify import verify

__all__ = ["compact_kv", "pack_tree_mask", "tree_attention", "verify"]
