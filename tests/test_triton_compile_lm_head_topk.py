"""The lm_head_topk Triton kernels lower to sm_80 and sm_90 cubins, even on a machine without a GPU.

The CPU interpreter accepts code the real compiler rejects, so every kernel variant the launcher can
pick (dtype, row block, k, probabilities written or not) is compiled for real in a subprocess with
TRITON_INTERPRET off. The PTX checks are what the design relies on: tensor-core MMAs for 16-bit
weights, exact fp32 dots (no tf32) for fp32 weights, asynchronous (pipelined) W loads, and shared
memory within the per-block limit.
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
    from crossspec_kernels.triton import lm_head_topk as lm

    capability = int(sys.argv[1])
    target = GPUTarget("cuda", capability, 32)
    max_shared = {80: 166912, 90: 232448}[capability]
    split_kernel = lm._lm_head_topk_split_kernel
    constexpr_names = {"BLOCK_M", "BLOCK_V", "BLOCK_K", "K_PAD", "WRITE_LOGITS", "DOT_PRECISION"}
    pointer_types = {"logits_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                     "part_val_ptr": "*fp32", "part_id_ptr": "*i32"}
    # What the JIT sees for real inputs: 16-byte-aligned tensors, and row strides and a hidden size
    # that are multiples of 16 (d = 4096). The last matters: the mask kk < hidden_dim must be constant
    # over 8 bf16 elements for W's loads to become 16-byte cp.async copies that can be pipelined.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(split_kernel.arg_names)
               if name.endswith("_ptr") or name.startswith("stride_") or name == "hidden_dim"}

    def split_signature(dtype):
        signature = {}
        for name in split_kernel.arg_names:
            if name in constexpr_names:
                signature[name] = "constexpr"
            elif name in pointer_types:
                signature[name] = pointer_types[name]
            elif name.endswith("_ptr"):
                signature[name] = dtype
            elif name == "temperature":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        return signature

    torch_dtypes = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}
    variants = [  # (dtype, M, k, write logits)
        ("*bf16", 1, 16, False),
        ("*bf16", 8, 4, True),
        ("*bf16", 64, 16, False),
        ("*bf16", 64, 1, True),
        ("*fp16", 37, 16, True),
        ("*fp32", 1, 4, False),
        ("*fp32", 64, 16, True),
    ]
    for dtype, rows, k, write_logits in variants:
        plan = lm.launch_plan(rows, 32064, k, torch_dtypes[dtype], 132)
        constexprs = dict(BLOCK_M=plan.block_m, BLOCK_V=plan.block_v, BLOCK_K=plan.block_k, K_PAD=plan.k_pad,
                          WRITE_LOGITS=write_logits, DOT_PRECISION="ieee" if dtype == "*fp32" else "tf32")
        kernel = triton.compile(ASTSource(split_kernel, split_signature(dtype), constexprs=constexprs, attrs=aligned),
                                target=target, options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})
        ptx = kernel.asm["ptx"]
        where = f"{dtype} M={rows} k={k} logits={write_logits} sm_{capability}"
        assert kernel.metadata.shared <= max_shared, f"{kernel.metadata.shared} B of shared memory: {where}"
        if dtype == "*fp32":
            assert "tf32" not in ptx, f"fp32 weights must not use tf32 MMAs: {where}"
        else:
            assert "mma" in ptx, f"no tensor-core MMA: {where}"
        assert "cp.async" in ptx, f"W loads are not pipelined: {where}"

    merge_kernel = lm._lm_head_topk_merge_kernel
    merge_types = ["*fp32", "*fp32", "*fp32", "*i32", "*fp32", "*i64", "*fp32", "i32", "i32"]
    for block_m, k_pad, splits_pad in ((16, 2, 256), (64, 16, 512), (32, 4, 8)):
        signature = dict(zip(merge_kernel.arg_names, merge_types + ["constexpr"] * 3))
        constexprs = dict(BLOCK_M=block_m, K_PAD=k_pad, SPLITS_PAD=splits_pad)
        triton.compile(ASTSource(merge_kernel, signature, constexprs=constexprs), target=target,
                       options={"num_warps": lm.merge_num_warps(splits_pad, k_pad)})
    normalise = lm._normalise_probs_kernel
    signature = dict(zip(normalise.arg_names, ["*fp32", "*fp32", "i32", "i32", "constexpr"]))
    triton.compile(ASTSource(normalise, signature, constexprs=dict(BLOCK=lm.NORMALISE_BLOCK)), target=target)
    print("compiled for sm_%d" % capability)
    """
)


@pytest.mark.parametrize("capability", [80, 90])
def test_lm_head_topk_kernels_compile_for_gpu(capability):
    compile_offline(COMPILE_SCRIPT, capability)
