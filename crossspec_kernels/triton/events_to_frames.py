"""Triton kernels for event rasterization (crossspec_kernels.events_to_frames).

Every representation is two passes with integer atomics in between, so the result does not depend
on the order in which events land (bit-reproducible run to run):

* eventgpt: a scatter pass sets 2-bit flags per pixel (bit 0: a negative event, bit 1: a positive
  one) with ``atomic_or`` on int32 words that pack 16 pixels each (5 frames of 480x640 = 384 KiB:
  the atomics stay in L2), then a pass turns the flags of each pixel into RGB.
* histogram: one scatter pass, ``atomic_add`` of 1 on the int32 output.
* voxel: a scatter pass adds fixed-point weights (units of 2**-VOXEL_FIXED_POINT_BITS) with int64
  ``atomic_add``, then a pass converts int64 -> float32 (one rounding, the same in every backend).

One program handles a block of BLOCK events; the event index decides the EventGPT chunk (chunk
f holds events [f*n // F, (f+1)*n // F), so event e is in chunk ((e+1)*F - 1) // n). Offsets are
int64: frame * H * W passes 2**31 for long clips at high resolution. Events with coordinates
outside the sensor are skipped (the CUDA path does not check values: that would be a host sync),
and voxel bins outside [0, num_bins) are never written, so malformed input cannot write out of
bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crossspec_kernels.reference import VOXEL_FIXED_POINT_BITS
from crossspec_kernels.triton._launch import interpreter_serialized

EVENT_BLOCK = 1024  # events per program of a scatter pass
PIXEL_BLOCK = 1024  # pixels (or cells) per program of a conversion pass
PIXELS_PER_WORD = 16  # 2-bit EventGPT flags packed into an int32
_NUM_WARPS = 4


@triton.jit
def _load_event_pixels(x_ptr, y_ptr, p_ptr, offs, num_events, height, width):
    """(in-bounds mask, y * W + x as int64, positive) of the events at offs."""
    live = offs < num_events
    x = tl.load(x_ptr + offs, mask=live, other=0).to(tl.int64)
    y = tl.load(y_ptr + offs, mask=live, other=0).to(tl.int64)
    positive = tl.load(p_ptr + offs, mask=live, other=0).to(tl.int32) > 0
    inside = live & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return inside, y * width + x, positive


@triton.jit
def _eventgpt_scatter_kernel(
    x_ptr, y_ptr, p_ptr, flags_ptr, num_events, height, width, NUM_FRAMES: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside, pixel, positive = _load_event_pixels(x_ptr, y_ptr, p_ptr, offs, num_events, height, width)
    frame = ((offs + 1) * NUM_FRAMES - 1) // num_events
    cell = frame * (height * width) + pixel
    bit = tl.where(positive, 2, 1).to(tl.int32) << ((cell % 16) * 2).to(tl.int32)
    tl.atomic_or(flags_ptr + cell // 16, bit, mask=inside, sem="relaxed")


@triton.jit
def _eventgpt_color_kernel(flags_ptr, out_ptr, frame_pixels, BLOCK: tl.constexpr):
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    frame = tl.program_id(1).to(tl.int64)
    live = pix < frame_pixels
    cell = frame * frame_pixels + pix
    word = tl.load(flags_ptr + cell // 16, mask=live, other=0)
    flags = (word >> ((cell % 16) * 2).to(tl.int32)) & 3
    positive = (flags & 2) != 0
    negative_only = flags == 1
    empty = flags == 0
    # White background, red for any positive event, else blue for any negative one.
    red = tl.where(negative_only, 0, 255).to(tl.uint8)
    green = tl.where(empty, 255, 0).to(tl.uint8)
    blue = tl.where(positive, 0, 255).to(tl.uint8)
    base = out_ptr + frame * 3 * frame_pixels + pix
    tl.store(base, red, mask=live)
    tl.store(base + frame_pixels, green, mask=live)
    tl.store(base + 2 * frame_pixels, blue, mask=live)


@triton.jit
def _histogram_kernel(x_ptr, y_ptr, p_ptr, out_ptr, num_events, height, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside, pixel, positive = _load_event_pixels(x_ptr, y_ptr, p_ptr, offs, num_events, height, width)
    cell = positive.to(tl.int64) * (height * width) + pixel
    ones = tl.full((BLOCK,), 1, dtype=tl.int32)
    tl.atomic_add(out_ptr + cell, ones, mask=inside, sem="relaxed")


@triton.jit
def _voxel_scatter_kernel(
    x_ptr,
    y_ptr,
    t_ptr,
    p_ptr,
    acc_ptr,
    num_events,
    height,
    width,
    NUM_BINS: tl.constexpr,
    FRAC_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside, pixel, positive = _load_event_pixels(x_ptr, y_ptr, p_ptr, offs, num_events, height, width)
    t = tl.load(t_ptr + offs, mask=offs < num_events, other=0)
    t_first = tl.load(t_ptr)
    t_last = tl.load(t_ptr + num_events - 1)
    span = (t_last - t_first).to(tl.float64)
    # Same operation order as the fp64 reference: (B - 1) * (t - t0), then / span.
    t_norm = (NUM_BINS - 1) * (t - t_first).to(tl.float64) / tl.where(span > 0, span, 1.0)
    t_norm = tl.where(span > 0, t_norm, 0.0)
    # Only unsorted t (refused by the checks) leaves [0, B - 1]; the clamp keeps the int64
    # conversion defined, and the bin masks below keep every write in bounds.
    t_norm = tl.minimum(tl.maximum(t_norm, -1.0), NUM_BINS * 1.0)
    lower = t_norm.to(tl.int64)  # truncation == floor for t_norm >= 0
    one = 1 << FRAC_BITS
    upper_weight = ((t_norm - lower.to(tl.float64)) * one + 0.5).to(tl.int64)
    lower_weight = one - upper_weight
    sign = tl.where(positive, 1, -1).to(tl.int64)
    cell = lower * (height * width) + pixel
    lower_ok = inside & (lower >= 0) & (lower < NUM_BINS)
    tl.atomic_add(acc_ptr + cell, sign * lower_weight, mask=lower_ok, sem="relaxed")
    upper_ok = inside & (lower + 1 >= 0) & (lower + 1 < NUM_BINS) & (upper_weight != 0)
    tl.atomic_add(acc_ptr + cell + height * width, sign * upper_weight, mask=upper_ok, sem="relaxed")


@triton.jit
def _voxel_convert_kernel(acc_ptr, out_ptr, num_cells, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < num_cells
    acc = tl.load(acc_ptr + offs, mask=live, other=0)
    # int64 -> fp32 rounds once; the power-of-two scale is exact.
    tl.store(out_ptr + offs, acc.to(tl.float32) * SCALE, mask=live)


@interpreter_serialized
def events_to_frames(
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    p: torch.Tensor,
    *,
    height: int,
    width: int,
    representation: str,
    num_slices: int,
) -> torch.Tensor:
    """Launcher. Inputs come checked from ops/events_to_frames.py: x, y, t, p [n] contiguous on one
    device (x, y int16/32/64, t int64, p bool or integer). ``num_slices`` is num_frames (eventgpt) or
    num_bins (voxel). Returns the eventgpt frames, the histogram or the un-normalized voxel grid."""
    num_events = x.numel()
    device = x.device
    frame_pixels = height * width
    if p.dtype == torch.bool:
        p = p.view(torch.uint8)  # same bytes; an i8 pointer is friendlier to both backends
    event_grid = (triton.cdiv(num_events, EVENT_BLOCK),)
    if representation == "eventgpt":
        cells = num_slices * frame_pixels
        flags = torch.zeros(triton.cdiv(cells, PIXELS_PER_WORD), dtype=torch.int32, device=device)
        if num_events:
            _eventgpt_scatter_kernel[event_grid](
                x, y, p, flags, num_events, height, width, NUM_FRAMES=num_slices, BLOCK=EVENT_BLOCK,
                num_warps=_NUM_WARPS,
            )  # fmt: skip
        out = torch.empty((num_slices, 3, height, width), dtype=torch.uint8, device=device)
        grid = (triton.cdiv(frame_pixels, PIXEL_BLOCK), num_slices)
        _eventgpt_color_kernel[grid](flags, out, frame_pixels, BLOCK=PIXEL_BLOCK, num_warps=_NUM_WARPS)
        return out
    if representation == "histogram":
        out = torch.zeros((2, height, width), dtype=torch.int32, device=device)
        if num_events:
            _histogram_kernel[event_grid](
                x, y, p, out, num_events, height, width, BLOCK=EVENT_BLOCK, num_warps=_NUM_WARPS
            )
        return out
    if representation == "voxel":
        cells = num_slices * frame_pixels
        acc = torch.zeros(cells, dtype=torch.int64, device=device)
        if num_events:
            _voxel_scatter_kernel[event_grid](
                x, y, t, p, acc, num_events, height, width, NUM_BINS=num_slices,
                FRAC_BITS=VOXEL_FIXED_POINT_BITS, BLOCK=EVENT_BLOCK, num_warps=_NUM_WARPS,
            )  # fmt: skip
        out = torch.empty((num_slices, height, width), dtype=torch.float32, device=device)
        _voxel_convert_kernel[(triton.cdiv(cells, PIXEL_BLOCK),)](
            acc, out, cells, SCALE=2.0**-VOXEL_FIXED_POINT_BITS, BLOCK=PIXEL_BLOCK, num_warps=_NUM_WARPS
        )
        return out
    raise ValueError(f"triton events_to_frames: unknown representation {representation!r}")
