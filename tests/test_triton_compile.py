"""The Triton kernels compile for the GPUs we ship for (sm_80, sm_90), even on a machine without one.

The CPU interpreter runs kernels as NumPy and accepts code the real compiler rejects (loop-carried
type changes, unsupported ops), so every kernel is also lowered to a cubin here, in a subprocess
where TRITON_INTERPRET is off.
"""

import textwrap

import pytest

from crossspec_kernels.testing import compile_offline

COMPILE_SCRIPT = textwrap.dedent(
    """
    import re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from crossspec_kernels.triton import verify as tv

    capability = int(sys.argv[1])
    target = GPUTarget("cuda", capability, 32)
    nodes_types = ["*fp32", "i64", "i64", "*fp16", "i64", "i64", "*i64", "*i64", "*fp32", "*i64", "*i64",
                   "*i32", "*i64", "i32", "i32"]
    for logits in ("*fp32", "*fp16", "*bf16"):
        for has_probs in (False, True):
            types = [logits] + nodes_types[1:] + ["constexpr"] * 4
            signature = dict(zip(tv._verify_nodes_kernel.arg_names, types))
            constexprs = {"HAS_PROBS": has_probs, "PRECISE": True, "BLOCK_V": 2048, "BLOCK_N": 128}
            kernel = triton.compile(ASTSource(tv._verify_nodes_kernel, signature, constexprs=constexprs),
                                    target=target, options={"num_warps": 8})
            ptx = kernel.asm["ptx"]
            # Approximate division would let near-ties round differently from torch and CUDA C++.
            assert "div.full.f32" not in ptx and "div.approx" not in ptx, "approximate division in verify"
    walk_types = ["*i32", "*i64", "*i64", "*i64", "*i64", "*i64", "i32", "i32", "constexpr"]
    triton.compile(ASTSource(tv._verify_walk_kernel, dict(zip(tv._verify_walk_kernel.arg_names, walk_types)),
                             constexprs={"BLOCK_ROWS": 64}), target=target)
    print("compiled for sm_%d" % capability)
    """
)


@pytest.mark.parametrize("capability", [80, 90])
def test_triton_kernels_compile_for_gpu(capability):
    compile_offline(COMPILE_SCRIPT, capability)
