"""adapter_lm_head_topk and the fused bottleneck-adapter Triton kernel.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py; not bf16);
the offline-compile test lowers it to sm_80 / sm_90 cubins for real.
"""

import textwrap

import pytest
import torch

from crossspec_kernels.models.adapters import AdapterConfig, BottleneckAdapter, EagleAdapter, LinearAdapter
from crossspec_kernels.ops.adapter_projection import adapter_lm_head_topk
from crossspec_kernels.testing import compile_offline

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_bottleneck(d_draft, d_target, rank, bias, dtype, seed=0):
    torch.manual_seed(seed)
    adapter = BottleneckAdapter(AdapterConfig("bottleneck", d_draft, d_target, rank=rank, bias=bias))
    with torch.no_grad():  # move LayerNorm off its (1, 0) init so the affine part is exercised
        adapter.norm.weight.add_(0.2 * torch.randn_like(adapter.norm.weight))
        adapter.norm.bias.add_(0.2 * torch.randn_like(adapter.norm.bias))
        adapter.up.weight.mul_(4.0)
    return adapter.to(device=DEVICE, dtype=dtype).eval()


def fp32_forward(adapter, x):
    """The module's forward in fp32 on the same (rounded) weights: the ground truth."""
    ref = BottleneckAdapter(adapter.config).to(DEVICE)
    ref.load_state_dict({name: t.float() for name, t in adapter.state_dict().items()})
    with torch.no_grad():
        return ref(x.float())


SHAPES = [  # (d_draft, d_target, rank, M, bias)
    (64, 96, 16, 1, True),
    (96, 64, 48, 5, False),
    (64, 64, 48, 64, True),
    (96, 96, 16, 5, False),
    (96, 64, 16, 64, True),
    (64, 64, 16, 1, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("d_draft", "d_target", "rank", "rows", "bias"), SHAPES)
def test_fused_kernel_matches_module(d_draft, d_target, rank, rows, bias, dtype):
    from crossspec_kernels.triton.bottleneck_adapter import bottleneck_adapter

    adapter = make_bottleneck(d_draft, d_target, rank, bias, dtype)
    torch.manual_seed(1)
    x = (torch.randn(rows, d_draft) * 2 + 0.5).to(device=DEVICE, dtype=dtype)
    params = {name: None if t is None else t.detach() for name, t in adapter.fused_params().items()}
    out = bottleneck_adapter(x, **params, eps=adapter.eps)
    assert out.shape == (rows, d_target) and out.dtype == dtype
    expected = fp32_forward(adapter, x)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        # fp16 output rounding (~5e-4 relative) plus fp16 operands of the dots, as the module has.
        torch.testing.assert_close(out.float(), expected, rtol=5e-3, atol=5e-3)
        with torch.no_grad():
            module_fp16 = adapter(x).float()
        # never further from the fp32 truth than the module's own fp16 forward, by more than a rounding
        fused_err = (out.float() - expected).abs().max()
        module_err = (module_fp16 - expected).abs().max()
        assert fused_err <= module_err + 2e-3 * expected.abs().max()


def test_fused_kernel_rank_and_dims_not_multiple_of_tiles():
    from crossspec_kernels.triton.bottleneck_adapter import bottleneck_adapter

    adapter = make_bottleneck(70, 45, 33, True, torch.float32)
    x = torch.randn(3, 70, device=DEVICE)
    params = {name: None if t is None else t.detach() for name, t in adapter.fused_params().items()}
    torch.testing.assert_close(
        bottleneck_adapter(x, **params, eps=adapter.eps), fp32_forward(adapter, x), rtol=1e-5, atol=1e-5
    )


def _assert_topk_agree(fused, unfused, atol):
    (lp_f, ids_f, probs_f), (lp_u, ids_u, probs_u) = fused, unfused
    torch.testing.assert_close(lp_f, lp_u, rtol=0, atol=atol)
    # ids must agree wherever the unfused top-k has no near-tie with its neighbours
    gaps = (lp_u[:, :-1] - lp_u[:, 1:]).abs()
    clear = torch.ones_like(ids_u, dtype=torch.bool)
    clear[:, :-1] &= gaps > 4 * atol
    clear[:, 1:] &= gaps > 4 * atol
    assert torch.equal(ids_f[clear], ids_u[clear])
    if probs_u is not None:
        torch.testing.assert_close(probs_f, probs_u, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("d_draft", "d_target", "rank", "rows", "bias"), SHAPES[:4])
def test_adapter_lm_head_topk_fused_vs_unfused(d_draft, d_target, rank, rows, bias, dtype):
    adapter = make_bottleneck(d_draft, d_target, rank, bias, dtype)
    torch.manual_seed(2)
    hidden = torch.randn(rows, d_draft).to(device=DEVICE, dtype=dtype)
    weight = (torch.randn(300, d_target) * 0.3).to(device=DEVICE, dtype=dtype)
    kwargs = dict(k=8, temperature=0.7, return_probs=True)
    fused = adapter_lm_head_topk(hidden, adapter, weight, backend="triton", **kwargs)
    unfused = adapter_lm_head_topk(hidden, adapter, weight, backend="reference", **kwargs)
    assert fused[0].shape == (rows, 8) and fused[1].dtype == torch.int64
    _assert_topk_agree(fused, unfused, atol=1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("kind", ["linear", "none", "eagle"])
def test_other_adapters_run_module_forward(kind):
    from crossspec_kernels.ops.lm_head_topk import lm_head_topk

    torch.manual_seed(3)
    d_draft, d_target = 48, 64
    if kind == "none":
        adapter, d_draft, extra = None, d_target, {}
    elif kind == "linear":
        adapter, extra = LinearAdapter(AdapterConfig("linear", d_draft, d_target)), {}
    else:
        adapter = EagleAdapter(AdapterConfig("eagle", d_draft, d_target, vocab_size=100))
        extra = {"prev_tokens": torch.randint(0, 100, (4,))}
    hidden = torch.randn(4, d_draft)
    weight = torch.randn(100, d_target) * 0.3
    got = adapter_lm_head_topk(hidden, adapter, weight, 5, backend="reference", **extra)
    with torch.no_grad():
        adapted = hidden if adapter is None else adapter(hidden, **extra)
    want = lm_head_topk(adapted, weight, 5, backend="reference")
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1]) and got[2] is None


def test_default_backend_large_m_falls_back_to_module():
    adapter = make_bottleneck(64, 64, 16, True, torch.float32)
    hidden = torch.randn(65, 64, device=DEVICE)
    weight = torch.randn(50, 64, device=DEVICE)
    logprobs, ids, _ = adapter_lm_head_topk(hidden, adapter, weight, 3)
    assert logprobs.shape == (65, 3) and ids.shape == (65, 3)


BAD_CASES = {
    "hidden d != d_draft": (lambda a, h, w: (h[:, :32], a, w), {}, "d_draft is 64"),
    "weight d != d_target": (lambda a, h, w: (h, a, w[:, :64]), {}, "d_target is 96"),
    "hidden not 2-D": (lambda a, h, w: (h[0], a, w), {}, "must be 2-D"),
    "M > 64 on triton": (lambda a, h, w: (h.repeat(20, 1), a, w), {"backend": "triton"}, "M in \\[1, 64\\]"),
    "bad adapter type": (lambda a, h, w: (h, torch.nn.Linear(64, 96), w), {}, "adapter must be"),
    "adapter dtype != hidden": (lambda a, h, w: (h.half(), a, w.half()), {}, "is torch.float32 but hidden"),
    "integer hidden": (lambda a, h, w: (h.long(), a, w), {}, "fp16, bf16 or fp32"),
    "cuda backend": (lambda a, h, w: (h, a, w), {"backend": "cuda"}, "no 'cuda'"),
    "unknown backend": (lambda a, h, w: (h, a, w), {"backend": "cutlass"}, "backend must be"),
    "bf16 in interpreter": (
        lambda a, h, w: (h.bfloat16(), a.to(torch.bfloat16), w.bfloat16()),
        {"backend": "triton"},
        "bf16",
    ),
    "k too large": (lambda a, h, w: (h, a, w), {"k": 17}, "k must be in"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_raise_named_errors(case):
    if case == "bf16 in interpreter" and DEVICE == "cuda":
        pytest.skip("bf16 is fine on a GPU")
    make, kwargs, match = BAD_CASES[case]
    adapter = BottleneckAdapter(AdapterConfig("bottleneck", 64, 96, rank=16)).to(DEVICE)
    hidden = torch.randn(4, 64, device=DEVICE)
    weight = torch.randn(50, 96, device=DEVICE)
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        adapter_lm_head_topk(*make(adapter, hidden, weight), **kwargs)


def test_device_mismatch_raises():
    adapter = BottleneckAdapter(AdapterConfig("bottleneck", 64, 96, rank=16))
    hidden, weight = torch.randn(4, 64), torch.randn(50, 96)
    with pytest.raises(ValueError, match="one device"):
        adapter_lm_head_topk(hidden, adapter, weight.to("meta"), 4)
    with pytest.raises(ValueError, match="adapter parameter 'norm.weight' is on meta"):
        adapter_lm_head_topk(hidden, adapter.to("meta"), weight, 4)


COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from crossspec_kernels.triton import bottleneck_adapter as ba

    capability = int(sys.argv[1])
    target = GPUTarget("cuda", capability, 32)
    max_shared = {80: 166912, 90: 232448}[capability]
    kernel_fn = ba._bottleneck_adapter_kernel
    flags = {"HAS_NORM_W", "HAS_NORM_B", "HAS_DOWN_B", "HAS_UP_B", "HAS_PROJ"}
    constexpr_names = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "DOT_PRECISION"} | flags
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel_fn.arg_names)
               if name.endswith("_ptr") or name.startswith("stride_") or name in ("d_in", "d_out", "rank")}
    torch_dtypes = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}
    variants = [  # (dtype, M, rank, proj, biases)
        ("*bf16", 1, 256, True, True),
        ("*bf16", 64, 1024, False, True),
        ("*fp16", 37, 64, True, False),
        ("*fp32", 1, 16, False, False),
        ("*fp32", 64, 512, True, True),
    ]
    for dtype, rows, rank, proj, biases in variants:
        plan = ba.launch_plan(rows, 4096, rank, torch_dtypes[dtype])
        signature = {}
        for name in kernel_fn.arg_names:
            if name in constexpr_names:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = dtype
            elif name == "eps":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        constexprs = dict(BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                          BLOCK_R=plan.block_r, HAS_NORM_W=True, HAS_NORM_B=True, HAS_DOWN_B=biases,
                          HAS_UP_B=biases, HAS_PROJ=proj, DOT_PRECISION="ieee" if dtype == "*fp32" else "tf32")
        kernel = triton.compile(ASTSource(kernel_fn, signature, constexprs=constexprs, attrs=aligned),
                                target=target, options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})
        ptx = kernel.asm["ptx"]
        where = f"{dtype} M={rows} r={rank} proj={proj} sm_{capability}"
        assert kernel.metadata.shared <= max_shared, f"{kernel.metadata.shared} B of shared memory: {where}"
        if dtype == "*fp32":
            assert "tf32" not in ptx, f"fp32 must not use tf32 MMAs: {where}"
        else:
            assert "mma" in ptx, f"no tensor-core MMA: {where}"
    print("compiled for sm_%d" % capability)
    """
)


@pytest.mark.parametrize("capability", [80, 90])
def test_bottleneck_adapter_kernel_compiles_for_gpu(capability):
    compile_offline(COMPILE_SCRIPT, capability)


# ----------------------------------------------------------------------------------------------
# torch.compile: the fused kernel is the crossspec::bottleneck_adapter custom op, the LM head
# crossspec::lm_head_topk, the reference path the module itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiles_with_fullgraph(backend):
    torch._dynamo.reset()
    adapter = make_bottleneck(64, 96, 16, True, torch.float32)
    torch.manual_seed(4)
    hidden = torch.randn(5, 64, device=DEVICE)
    weight = torch.randn(300, 96, device=DEVICE) * 0.3

    def draft(hidden, weight):
        return adapter_lm_head_topk(
            hidden, adapter, weight, 8, temperature=0.7, return_probs=True, backend=backend
        )

    got = torch.compile(draft, fullgraph=True, backend="aot_eager")(hidden, weight)
    for x, y in zip(got, draft(hidden, weight), strict=True):
        assert torch.equal(x, y)


def test_bottleneck_custom_op_passes_opcheck():
    adapter = make_bottleneck(64, 96, 16, True, torch.float32)
    params = {name: None if t is None else t.detach() for name, t in adapter.fused_params().items()}
    hidden = torch.randn(5, 64, device=DEVICE)
    torch.library.opcheck(
        torch.ops.crossspec.bottleneck_adapter.default, (hidden,), {**params, "eps": adapter.eps}
    )
