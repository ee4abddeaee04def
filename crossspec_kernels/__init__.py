"""crossspec_kernels: cross-modal speculative decoding kernels for video LLMs.

Importing the package needs neither a GPU nor the compiled extension: ``crossspec_kernels._C`` is
loaded lazily by the ops that use it (see ``crossspec_kernels._ext``).
"""

from crossspec_kernels.ops import (
    adapter_lm_head_topk,
    compact_kv,
    events_to_frames,
    lm_head_topk,
    pack_tree_mask,
    tree_attention,
    verify,
)
from crossspec_kernels.reference import VerifyOutput

__version__ = "0.1.0"
__all__ = [
    "VerifyOutput",
    "__version__",
    "adapter_lm_head_topk",
    "compact_kv",
    "events_to_frames",
    "lm_head_topk",
    "pack_tree_mask",
    "tree_attention",
    "verify",
]
