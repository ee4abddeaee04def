"""Public ops: validation with named errors, then dispatch to cuda / triton / reference."""

from crossspec_kernels.ops.adapter_projection import adapter_lm_head_topk
from crossspec_kernels.ops.compact_kv import compact_kv
from crossspec_kernels.ops.events_to_frames import events_to_frames
from crossspec_kernels.ops.lm_head_topk import lm_head_topk
from crossspec_kernels.ops.tree_attention import pack_tree_mask, tree_attention
from crossspec_kernels.ops.verify import verify

__all__ = [
    "adapter_lm_head_topk",
    "compact_kv",
    "events_to_frames",
    "lm_head_topk",
    "pack_tree_mask",
    "tree_attention",
    "verify",
]
