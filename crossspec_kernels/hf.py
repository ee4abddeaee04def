"""Hugging Face faces of the package, in one import.

* The "crossspec" attention implementation (``register``, ``enable``, ``tree_mask``,
  ``AttentionPlan``, ...): defined in :mod:`crossspec_kernels.hf_attention`, below the runtime.
* ``custom_generate``: speculative decoding behind ``model.generate(...,
  custom_generate=hf.custom_generate, drafter=..., drafter_inputs=...)``, defined in
  :mod:`crossspec_kernels.hf_generate`, above the runtime.

The runtime imports ``hf_attention`` only, never this module, so there is no import circle.
"""

from crossspec_kernels.hf_attention import (
    ATTENTION_NAME,
    MAX_KERNEL_QUERIES,
    AttentionPlan,
    attention_backend,
    crossspec_attention_forward,
    crossspec_mask,
    enable,
    register,
    run_plan,
    tree_mask,
)
from crossspec_kernels.hf_generate import custom_generate

__all__ = [
    "ATTENTION_NAME",
    "MAX_KERNEL_QUERIES",
    "AttentionPlan",
    "attention_backend",
    "crossspec_attention_forward",
    "crossspec_mask",
    "custom_generate",
    "enable",
    "register",
    "run_plan",
    "tree_mask",
]
