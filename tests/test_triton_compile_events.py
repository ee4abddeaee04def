"""The events_to_frames Triton kernels compile for sm_80 and sm_90 without a GPU, with the properties
the interpreter cannot show: the scatters use integer atomics only (atom.or.b32 for the EventGPT
flags, atom.add.u32 for the histogram, atom.add.u64 for the voxel fixed point, and never a float
atomic, whose order dependence would break bit-reproducibility), the voxel time normalisation is
an IEEE fp64 division (div.rn.f64, not an approximation), and the conversion rounds int64 -> fp32
once (cvt.rn.f32.s64).

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
    from crossspec_kernels.reference import VOXEL_FIXED_POINT_BITS
    from crossspec_kernels.triton import events_to_frames as tk

    capability = int(sys.argv[1])
    target = GPUTarget("cuda", capability, 32)

    def lower(kernel, types, constexprs):
        signature = dict(zip(kernel.arg_names, types + ["constexpr"] * len(constexprs)))
        source = ASTSource(kernel, signature, constexprs=constexprs)
        return triton.compile(source, target=target, options={"num_warps": 4, "num_stages": 1}).asm["ptx"]

    def atomics(ptx):
        return set(re.findall(r"\\b(?:atom|red)\\.[\\w.]+", ptx))

    def no_float_atomics(case, ptx):
        found = [a for a in atomics(ptx) if re.search(r"\\.f(16|32|64)\\b|\\.bf16", a)]
        assert not found, f"{case}: float atomics {found}"

    for coord in ("i16", "i32", "i64"):
        for polarity in ("i8", "u8", "i32", "i64"):
            case = f"x,y {coord} p {polarity}"
            events = ["*" + coord, "*" + coord, "*" + polarity]
            ptx = lower(tk._eventgpt_scatter_kernel, events + ["*i32", "i32", "i32", "i32"],
                        {"NUM_FRAMES": 5, "BLOCK": tk.EVENT_BLOCK})
            assert atomics(ptx) and all(".or.b32" in a for a in atomics(ptx)), f"{case}: {atomics(ptx)}"

            ptx = lower(tk._histogram_kernel, events + ["*i32", "i32", "i32", "i32"], {"BLOCK": tk.EVENT_BLOCK})
            assert atomics(ptx) and all(re.search(r"\\.add\\.[us]32$", a) for a in atomics(ptx)), f"{case}: {atomics(ptx)}"

            ptx = lower(tk._voxel_scatter_kernel,
                        ["*" + coord, "*" + coord, "*i64", "*" + polarity, "*i64", "i32", "i32", "i32"],
                        {"NUM_BINS": 5, "FRAC_BITS": VOXEL_FIXED_POINT_BITS, "BLOCK": tk.EVENT_BLOCK})
            assert atomics(ptx) and all(re.search(r"\\.add\\.[us]64$", a) for a in atomics(ptx)), f"{case}: {atomics(ptx)}"
            no_float_atomics(case, ptx)
            assert "div.rn.f64" in ptx, f"{case}: the time normalisation is not an IEEE fp64 division"
            assert not re.search(r"div\\.(approx|full)", ptx), f"{case}: approximate division"

    ptx = lower(tk._eventgpt_color_kernel, ["*i32", "*u8", "i64"], {"BLOCK": tk.PIXEL_BLOCK})
    assert not atomics(ptx) and "st.global" in ptx
    ptx = lower(tk._voxel_convert_kernel, ["*i64", "*fp32", "i64"],
                {"SCALE": 2.0 ** -VOXEL_FIXED_POINT_BITS, "BLOCK": tk.PIXEL_BLOCK})
    assert not atomics(ptx) and "cvt.rn.f32.s64" in ptx, "int64 -> fp32 must round to nearest once"
    print("compiled for sm_%d" % capability)
    """
)


@pytest.mark.parametrize("capability", [80, 90])
def test_events_to_frames_kernels_compile_for_gpu(capability):
    compile_offline(COMPILE_SCRIPT, capability)
