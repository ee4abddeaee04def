"""The compact_kv Triton kernel compiles for sm_80 and sm_90 without a GPU, with the properties the
interpreter cannot show: a barrier between the loads and the stores of a chunk (rows move in place
and a source row can be another row's destination), and 16-byte vector accesses when aligned.

Runs in a subprocess with TRITON_INTERPRET off, as tests/test_triton_compile.py does.
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
    from crossspec_kernels.triton import compact_kv as tk

    capability = int(sys.argv[1])
    target = GPUTarget("cuda", capability, 32)
    kernel = tk._compact_kv_kernel
    scalars = ["i32"] * 5  # num_nodes, kv_len, stride_batch, stride_head, stride_pos
    divisible = {kernel.arg_names.index(name) for name in
                 ("table_ptr", "like_ptr", "path_ptr", "num_accepted_ptr", "tree_start_ptr",
                  "stride_batch", "stride_head", "stride_pos")}

    def compile_ptx(element, head_dim, aligned, num_nodes=64):
        types = ["*i64", "*" + element, "*i64", "*i64", "*i64"] + scalars + ["constexpr"] * 4
        block_n, block_d = tk.block_sizes(head_dim, num_nodes)
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_N": block_n, "BLOCK_D": block_d, "ALIGNED": aligned}
        # What Triton's launcher specialises for 16-byte-aligned pointers and strides divisible by 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i in divisible} if aligned else {}
        source = ASTSource(kernel, dict(zip(kernel.arg_names, types)), constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=target, options={"num_warps": 4, "num_stages": 1})
        return compiled.asm["ptx"]

    for element in ("fp32", "fp16", "bf16"):
        for head_dim in (64, 80, 128, 320):
            for aligned in (True, False):
                ptx = compile_ptx(element, head_dim, aligned)
                lines = ptx.splitlines()
                loads = [i for i, l in enumerate(lines) if re.search(r"ld\\.global", l) and ".b64" not in l]
                stores = [i for i, l in enumerate(lines) if "st.global" in l]
                barriers = [i for i, l in enumerate(lines) if re.search(r"\\bbar\\.sync|barrier\\.sync", l)]
                case = f"{element} D={head_dim} aligned={aligned}"
                assert loads and stores and barriers, f"{case}: missing loads, stores or barrier"
                if head_dim <= 256:  # one D block: one loop of loads, barrier, stores
                    assert max(loads) < barriers[0] < min(stores), f"{case}: a store can overtake a load"
                if aligned:
                    assert any("ld.global.v4" in l for l in lines), f"{case}: loads are not 16-byte vectors"
                    assert any("st.global.v4" in l for l in lines), f"{case}: stores are not 16-byte vectors"
    print("compiled for sm_%d" % capability)
    """
)


@pytest.mark.parametrize("capability", [80, 90])
def test_compact_kv_kernel_compiles_for_gpu(capability):
    compile_offline(COMPILE_SCRIPT, capability)
