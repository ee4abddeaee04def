"""crossspec_kernels: cross-modal speculative decoding kernels for video LLMs.

Importing the package needs neither a GPU nor the compiled extension: ``crossspec_kernels._C`` is
loaded lazily by the ops that use it (see ``crossspec_kernels._ext``).
"""

from crossspec_kernels.ops import compact_kv, pack_tree_mask, tree_attention, verify
from crossspec_kernels.reference import VerifyOutput

__version__ = "0.1.0"
__all__ = ["VerifyOutput", "__version__", "compact_kv", "pack_tree_mask", "tree_attention", "verify"]
