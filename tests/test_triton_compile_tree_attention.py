"""The tree-attention Triton kernels lower to sm_80 and sm_90 cubins, even on a machine without a GPU.

Same idea as test_triton_compile.py: the CPU interpreter accepts code the real compiler rejects, so
each kernel variant that the launcher can pick (dtype, head dim, row block, causal or packed mask,
kv_start and kv_end or not, one split or many) is compiled for real in a subprocess with TRITON_INTERPRET off.
The checks on the PTX are what the design relies on: tensor-core MMAs for 16-bit inputs, exact
fp32 dots (no tf32) for fp32 inputs, and pipelined (asynchronous) K/V loads in the main loop.
"""

import textwrap

import pytest

from crossspec_kernels.testing import compile_offline

COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from crossspec_kernels.triton import tree_attention as ta

    capability = int(sys.argv[1])
    target = GPUTarget("cuda", capability, 32)
    split_kernel = ta._tree_attention_split_kernel
    merge_kernel = ta._merge_splits_kernel
    constexpr_names = {"HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_D", "CAUSAL", "HAS_KV_START", "HAS_KV_END",
                       "SINGLE_SPLIT", "DOT_PRECISION"}
    pointer_types = {"mask_ptr": "*i32", "kv_start_ptr": "*i64", "kv_end_ptr": "*i64", "partial_out_ptr": "*fp32",
                     "partial_lse_ptr": "*fp32"}

    # What the JIT's specialisation sees for real inputs: 16-byte-aligned tensors and strides that are
    # multiples of 16 elements (every supported head dim is), which is what lets K/V loads vectorise.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(split_kernel.arg_names)
               if name.endswith("_ptr") or name.startswith("stride_")}

    def split_signature(dtype):
        signature = {}
        for name in split_kernel.arg_names:
            if name in constexpr_names:
                signature[name] = "constexpr"
            elif name in pointer_types:
                signature[name] = pointer_types[name]
            elif name.endswith("_ptr"):
                signature[name] = dtype
            elif name == "qk_scale":
                signature[name] = "fp32"
            elif name.startswith("stride_"):
                signature[name] = "i64"
            else:
                signature[name] = "i32"
        return signature

    torch_dtypes = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}
    # (dtype, head dim, query rows per (batch, kv head), causal, kv_start, single split): the launch
    # plan's own tile choice for that shape is compiled.
    variants = [
        ("*bf16", 128, 256, False, True, False),
        ("*bf16", 128, 1, True, False, True),
        ("*bf16", 128, 64, False, True, False),
        ("*fp16", 80, 64, False, True, True),
        ("*fp16", 96, 32, True, True, False),
        ("*fp32", 128, 256, False, True, False),
        ("*fp32", 64, 7, True, False, True),
    ]
    for dtype, head_dim, rows, causal, has_kv_start, single in variants:
        q = torch.empty(1, rows, 1, head_dim, dtype=torch_dtypes[dtype])
        plan = ta.launch_plan(q, torch.empty(1, 1, 4096, head_dim, dtype=q.dtype))
        block_m, warps, max_shared = plan.block_m, plan.num_warps, {80: 166912, 90: 232448}[capability]
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=plan.block_n,
                          BLOCK_D=triton.next_power_of_2(head_dim), CAUSAL=causal,
                          HAS_KV_START=has_kv_start, HAS_KV_END=has_kv_start, SINGLE_SPLIT=single,
                          DOT_PRECISION="ieee" if dtype == "*fp32" else "tf32")
        kernel = triton.compile(ASTSource(split_kernel, split_signature(dtype), constexprs=constexprs, attrs=aligned),
                                target=target, options={"num_warps": warps, "num_stages": plan.num_stages})
        ptx = kernel.asm["ptx"]
        where = f"{dtype} D={head_dim} BLOCK_M={block_m} sm_{capability}"
        # The device would refuse the launch (OutOfResources) past the per-block opt-in limit.
        assert kernel.metadata.shared <= max_shared, f"{kernel.metadata.shared} B of shared memory: {where}"
        if dtype == "*fp32":
            assert "tf32" not in ptx, f"fp32 inputs must not use tf32 MMAs: {where}"
        else:
            assert "mma" in ptx, f"no tensor-core MMA: {where}"
        assert "cp.async" in ptx, f"K/V loads are not pipelined: {where}"

    for dtype in ("*fp32", "*fp16", "*bf16"):
        for head_dim in ta.HEAD_DIMS:
            types = ["*fp32", "*fp32", dtype] + ["i64"] * 3 + ["i32"] * 5 + ["constexpr"] * 3
            signature = dict(zip(merge_kernel.arg_names, types))
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_ROWS=ta.MERGE_BLOCK_ROWS,
                              BLOCK_D=triton.next_power_of_2(head_dim))
            triton.compile(ASTSource(merge_kernel, signature, constexprs=constexprs), target=target)
    print("compiled for sm_%d" % capability)
    """
)


@pytest.mark.parametrize("capability", [80, 90])
def test_tree_attention_kernels_compile_for_gpu(capability):
    compile_offline(COMPILE_SCRIPT, capability)
