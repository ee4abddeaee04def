"""Synthetic clips: one moving scene seen by an event camera and a video camera at once.

The scene is a textured background panning slowly plus rectangles of constant velocity that bounce
off the borders, some brighter and some darker than the background. Video frames are renders of
the scene at the frame times; events come from the same renders at fine time steps: a pixel fires
each time its log luminance moves one contrast threshold C away from the level of its last event
(an idealised DVS pixel, as in event simulators), with timestamps interpolated inside the step.
So events appear where, and when, the video changes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from crossspec_kernels.events.stream import EventStream

# Luminance weights (ITU-R BT.601): events see luminance, the video sees RGB, and compositing is
# linear, so the luminance of a rendered RGB frame equals the rendered luminance exactly.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_LOG_EPS = 0.01  # keeps log luminance finite on black
_MAX_STEP_PX = 1.0  # displacement per fine step: at most a pixel, so edges sweep pixels smoothly
_EDGE_SOFTNESS_PX = 0.5  # anti-aliased object edges, so sub-pixel motion changes luminance
_DEFAULT_THRESHOLD = 0.2  # log-luminance contrast threshold when no rate is requested (DVS-like)
_RATE_HEADROOM = 1.2  # aim the threshold at this many times the requested events, then subsample
_RATE_SHORTFALL_WARNING = 0.05  # warn when a scene falls this far short of the requested count
_THRESHOLD_RANGE = (0.005, 2.0)  # contrast thresholds tried for a requested rate (log luminance)
_NUM_THRESHOLDS = 24  # geometric grid: neighbours 30% apart
_SUBGRID_PIXELS = 2500  # pixels simulated to estimate the event count of each threshold
_NEGLIGIBLE_COVER = 1e-6  # an object's soft edge beyond ~7 px: too faint to cross any threshold
_PIXELS_PER_CHUNK = 2_000_000  # pixel-steps simulated at once (a few of these float32 arrays live at a time)


@dataclass
class _Scene:
    texture_amplitude: torch.Tensor  # [J] background: sum_j a_j sin(kx_j x' + phx_j) sin(ky_j y' + phy_j)
    texture_kx: torch.Tensor  # [J]
    texture_ky: torch.Tensor  # [J]
    texture_phase_x: torch.Tensor  # [J]
    texture_phase_y: torch.Tensor  # [J]
    background_velocity: tuple[float, float]  # (vx, vy) px/s of the panning texture
    background_tint: torch.Tensor  # [3] RGB multiplier of the gray texture
    object_center: torch.Tensor  # [O, 2] (x, y) at t = 0, px
    object_velocity: torch.Tensor  # [O, 2] px/s
    object_half_size: torch.Tensor  # [O, 2] half width, half height, px
    object_color: torch.Tensor  # [O, 3] RGB in [0, 1]


def frame_times_us(num_frames: int, duration_us: int) -> torch.Tensor:
    """[num_frames] int64: frame f of a synthetic clip shows the scene at the middle of its
    1/num_frames share of [0, duration_us), i.e. at (2f + 1) * duration_us / (2 * num_frames)."""
    return (torch.arange(num_frames, dtype=torch.float64) * 2 + 1).mul(duration_us / (2 * num_frames)).long()


def synthetic_clip(
    num_frames: int = 8,
    height: int = 260,
    width: int = 346,
    duration_us: int = 1_000_000,
    events_per_second: float | None = 200_000.0,
    seed: int = 0,
    num_objects: int = 4,
    *,
    max_speed_px_per_s: float = 150.0,
    contrast_threshold: float | None = None,
) -> tuple[EventStream, torch.Tensor]:
    """A matching event stream and video of one synthetic scene.

    Returns:
        events: EventStream on the CPU, sensor_size (height, width), t in [0, duration_us).
        video: [num_frames, 3, height, width] uint8 RGB; frame f is the scene at
            ``frame_times_us(num_frames, duration_us)[f]``.

    Rate: with ``events_per_second`` set and no ``contrast_threshold``, the threshold is the
    largest one expected to give at least 1.2x the requested count (24 thresholds between 0.005
    and 2, simulated together on a subgrid of about 2,500 pixels; rerun once with a corrected
    estimate if the full frame falls short), and a uniform random subset of exactly
    round(events_per_second * duration) events is kept. A scene that cannot produce that many
    (a static one, say) yields fewer, with a warning when more than 5% short. With
    ``contrast_threshold`` given, that threshold is used and, if ``events_per_second`` is also set,
    the events are subsampled down to the rate when above it; ``events_per_second=None`` keeps
    every event (threshold 0.2 by default). The same seed gives the same clip on the same machine.
    """
    _check_args(
        num_frames,
        height,
        width,
        duration_us,
        events_per_second,
        num_objects,
        max_speed_px_per_s,
        contrast_threshold,
    )
    generator = torch.Generator().manual_seed(seed)
    scene = _random_scene(height, width, num_objects, max_speed_px_per_s, generator)
    duration_s = duration_us / 1e6
    num_steps = max(16, math.ceil(duration_s * max_speed_px_per_s / _MAX_STEP_PX))
    step_times = torch.linspace(0.0, duration_s, num_steps + 1, dtype=torch.float64)

    target = None if events_per_second is None else round(events_per_second * duration_s)
    if contrast_threshold is not None or target is None:
        x, y, t, p = _simulate_events(
            scene, step_times, height, width, contrast_threshold or _DEFAULT_THRESHOLD
        )
    else:
        thresholds, expected = _expected_counts(scene, step_times, height, width)
        wanted = _RATE_HEADROOM * target
        chosen = _pick_threshold(expected, wanted)
        x, y, t, p = _simulate_events(scene, step_times, height, width, float(thresholds[chosen]))
        if len(t) < target and chosen > 0:
            # The subgrid overestimated this scene: scale the estimates by what it got wrong, once.
            chosen = _pick_threshold(expected, wanted * float(expected[chosen]) / max(len(t), 1))
            x, y, t, p = _simulate_events(scene, step_times, height, width, float(thresholds[chosen]))
    t = (t * 1e6).floor().long().clamp_(0, duration_us - 1)
    order = torch.sort(t, stable=True).indices
    x, y, t, p = x[order], y[order], t[order], p[order]
    if target is not None and len(t) > target:
        keep = torch.randperm(len(t), generator=generator)[:target].sort().values
        x, y, t, p = x[keep], y[keep], t[keep], p[keep]
    elif target is not None and len(t) < (1 - _RATE_SHORTFALL_WARNING) * target:
        warnings.warn(
            f"synthetic_clip: the scene produced {len(t)} events, fewer than the {target} requested "
            f"(events_per_second={events_per_second}); add objects or speed, or lower contrast_threshold",
            stacklevel=2,
        )
    events = EventStream._trusted(x.to(torch.int16), y.to(torch.int16), t, p.to(torch.int8), (height, width))

    frame_times = frame_times_us(num_frames, duration_us).double() / 1e6
    frames = _render(
        scene,
        frame_times,
        torch.arange(height),
        torch.arange(width),
        scene.object_color,
        scene.background_tint,
        (height, width),
    )
    video = frames.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return events, video


def _check_args(
    num_frames, height, width, duration_us, events_per_second, num_objects, max_speed, threshold
) -> None:
    for name, value in (
        ("num_frames", num_frames),
        ("height", height),
        ("width", width),
        ("duration_us", duration_us),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"synthetic_clip: {name} must be a positive int, got {value!r}")
    if max(height, width) > 2**15:
        raise ValueError(f"synthetic_clip: height and width must be <= 32768, got ({height}, {width})")
    if not isinstance(num_objects, int) or num_objects < 0:
        raise ValueError(f"synthetic_clip: num_objects must be an int >= 0, got {num_objects!r}")
    if events_per_second is not None and not events_per_second > 0:
        raise ValueError(f"synthetic_clip: events_per_second must be > 0 or None, got {events_per_second!r}")
    if not max_speed > 0:
        raise ValueError(f"synthetic_clip: max_speed_px_per_s must be > 0, got {max_speed!r}")
    if threshold is not None and not threshold > 0:
        raise ValueError(f"synthetic_clip: contrast_threshold must be > 0 or None, got {threshold!r}")


def _random_scene(height: int, width: int, num_objects: int, max_speed: float, generator) -> _Scene:
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    num_waves = 6
    # Wavelengths of 6 to 60 px: texture at the scale of objects, so panning produces events.
    wavelength_x, wavelength_y = uniform(6, 60, num_waves), uniform(6, 60, num_waves)
    amplitude = uniform(0.5, 1.0, num_waves)
    amplitude *= 0.3 / amplitude.sum()  # background stays within 0.45 +- 0.3
    pan_angle = float(uniform(0, 2 * math.pi, 1))
    pan_speed = 0.15 * max_speed

    short_side = min(height, width)
    half_size = uniform(0.04, 0.12, num_objects, 2) * short_side + 1
    center = torch.stack([uniform(0, width, num_objects), uniform(0, height, num_objects)], dim=1)
    speed = uniform(0.4, 1.0, num_objects) * max_speed
    angle = uniform(0, 2 * math.pi, num_objects)
    velocity = torch.stack([speed * torch.cos(angle), speed * torch.sin(angle)], dim=1)
    # Alternate bright and dark objects so both polarities come from leading and trailing edges.
    bright = torch.arange(num_objects) % 2 == 0
    target_luma = torch.where(bright, uniform(0.85, 1.0, num_objects), uniform(0.02, 0.1, num_objects))
    hue = uniform(0.6, 1.4, num_objects, 3)
    color = (hue * (target_luma / (hue @ _LUMA))[:, None]).clamp(0, 1)
    return _Scene(
        texture_amplitude=amplitude,
        texture_kx=2 * math.pi / wavelength_x,
        texture_ky=2 * math.pi / wavelength_y,
        texture_phase_x=uniform(0, 2 * math.pi, num_waves),
        texture_phase_y=uniform(0, 2 * math.pi, num_waves),
        background_velocity=(pan_speed * math.cos(pan_angle), pan_speed * math.sin(pan_angle)),
        background_tint=uniform(0.85, 1.15, 3),
        object_center=center,
        object_velocity=velocity,
        object_half_size=half_size,
        object_color=color,
    )


def _bounce(position: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Constant-speed motion reflected at low and high (a triangle wave)."""
    span = (high - low).clamp_min(1e-6)
    phase = torch.remainder(position - low, 2 * span)
    return low + span - (phase - span).abs()


def _render(scene: _Scene, times_s, ys, xs, colors, tint, sensor_size: tuple[int, int]) -> torch.Tensor:
    """[K, C, len(ys), len(xs)] float32 scene at times_s [K], sampled at pixel rows ys and columns xs.

    ``colors`` [O, C] and ``tint`` [C] pick the channels: RGB for video, luminance for events.
    Background and objects are separable in x and y, so each is an outer product (a matmul).
    """
    xs, ys, times_s = xs.float(), ys.float(), times_s.float()
    times = times_s[:, None, None]
    vx, vy = scene.background_velocity
    wave_x = torch.sin(
        scene.texture_kx[None, :, None] * (xs - vx * times) + scene.texture_phase_x[None, :, None]
    )
    wave_y = torch.sin(scene.texture_ky[None, None, :] * (ys[:, None] - vy * times) + scene.texture_phase_y)
    background = 0.45 + (wave_y * scene.texture_amplitude) @ wave_x  # [K, H, W]
    image = background[:, None] * tint[None, :, None, None]

    height_px, width_px = sensor_size
    half = scene.object_half_size
    moved = scene.object_center[None] + scene.object_velocity[None] * times_s[:, None, None]  # [K, O, 2]
    center_x = _bounce(moved[..., 0], half[:, 0], width_px - half[:, 0])
    center_y = _bounce(moved[..., 1], half[:, 1], height_px - half[:, 1])
    cover_x, cover_y = _coverage(xs, center_x, half[:, 0]), _coverage(ys, center_y, half[:, 1])
    for index in range(colors.shape[0]):  # painter's order: later objects occlude earlier ones
        # Composite only over the object's bounding box during these steps: it covers a few % of the frame.
        columns, rows = _support(cover_x[:, index]), _support(cover_y[:, index])
        if columns is None or rows is None:
            continue
        region = image[:, :, rows, columns]
        alpha = (cover_y[:, index, rows, None] * cover_x[:, index, None, columns])[:, None]
        region += alpha * (colors[index][None, :, None, None] - region)
    return image


def _coverage(axis: torch.Tensor, center: torch.Tensor, half_size: torch.Tensor) -> torch.Tensor:
    """[K, O, len(axis)] soft 1-D box: 1 inside, 0 outside, a sigmoid ramp at the edges."""
    offset = axis - center[..., None]
    size = half_size[None, :, None]
    return torch.sigmoid((offset + size) / _EDGE_SOFTNESS_PX) * torch.sigmoid(
        (size - offset) / _EDGE_SOFTNESS_PX
    )


def _support(cover: torch.Tensor) -> slice | None:
    """The index range where a [K, n] coverage is not negligible at any step (None if nowhere)."""
    inside = (cover.amax(0) > _NEGLIGIBLE_COVER).nonzero()
    if inside.numel() == 0:
        return None
    return slice(int(inside[0, 0]), int(inside[-1, 0]) + 1)


def _log_luminance_chunks(scene, step_times, ys, xs, sensor_size, pixels_per_chunk=_PIXELS_PER_CHUNK):
    """Yields [k, len(ys) * len(xs)] float32 log luminance for consecutive chunks of step_times."""
    luminance = (scene.object_color @ _LUMA)[:, None]
    tint = (scene.background_tint @ _LUMA).reshape(1)
    per_chunk = max(1, pixels_per_chunk // max(1, len(ys) * len(xs)))
    for begin in range(0, len(step_times), per_chunk):
        frames = _render(scene, step_times[begin : begin + per_chunk], ys, xs, luminance, tint, sensor_size)
        yield torch.log(frames[:, 0].flatten(1) + _LOG_EPS)


def _advance_levels(q: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """[K + 1, ...] levels of each pixel: ``level`` then the level after each step of q [K, ...].

    An idealised DVS pixel fires when its log luminance moves a whole threshold away from the level
    of its last event: level_k = clamp(level_{k-1}, floor q_k, ceil q_k). Sequential in k (it is a
    hysteresis), vectorised over pixels.
    """
    lower, upper = q.floor(), q.ceil()
    levels = torch.empty((q.shape[0] + 1, *q.shape[1:]))
    levels[0] = level
    for k in range(q.shape[0]):
        torch.maximum(levels[k], lower[k], out=levels[k + 1])
        torch.minimum(levels[k + 1], upper[k], out=levels[k + 1])
    return levels


def _expected_counts(scene, step_times, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Event counts expected at each threshold of a geometric grid: (thresholds [T], counts [T]).

    Every threshold is simulated at once on a grid of about _SUBGRID_PIXELS pixels (every s-th row
    and column), scaled to the full frame: objects and texture sweep the subgrid the way they sweep
    the frame, at a fraction of the cost.
    """
    stride = max(1, math.ceil(math.sqrt(height * width / _SUBGRID_PIXELS)))
    ys, xs = torch.arange(0, height, stride), torch.arange(0, width, stride)
    low, high = _THRESHOLD_RANGE
    thresholds = torch.logspace(math.log10(low), math.log10(high), _NUM_THRESHOLDS)
    counts = torch.zeros(_NUM_THRESHOLDS, dtype=torch.float64)
    level = None
    for chunk in _log_luminance_chunks(
        scene, step_times, ys, xs, (height, width), _PIXELS_PER_CHUNK // _NUM_THRESHOLDS
    ):
        if level is None:
            base, chunk = chunk[0], chunk[1:]
            level = torch.zeros(_NUM_THRESHOLDS, base.shape[0])
        levels = _advance_levels((chunk[:, None, :] - base) / thresholds[:, None], level)  # [k, T, pixels]
        counts += levels.diff(dim=0).abs().sum(dim=(0, 2)).double()
        level = levels[-1]
    return thresholds, counts * (height * width) / (len(ys) * len(xs))


def _pick_threshold(expected: torch.Tensor, wanted: float) -> int:
    """Index of the largest threshold expected to give at least ``wanted`` events (else the smallest)."""
    enough = (expected >= wanted).nonzero()
    return int(enough[-1, 0]) if enough.numel() else 0


def _simulate_events(scene, step_times, height: int, width: int, threshold: float):
    """Events of every pixel over the fine steps: x, y (int64), t (float64 s), p (bool), unsorted.

    One event per level crossed (see _advance_levels), ON when rising, timestamped where q crossed
    that level by linear interpolation between the two steps around it.
    """
    num_pixels = height * width
    level = None
    first_step = 1  # step_times index of each chunk's first row (step 0 only sets the base)
    xs_out, ys_out, ts_out, ps_out = [], [], [], []
    for chunk in _log_luminance_chunks(
        scene, step_times, torch.arange(height), torch.arange(width), (height, width)
    ):
        if level is None:
            base, chunk = chunk[0], chunk[1:]
            level, previous_q = torch.zeros(num_pixels), torch.zeros(num_pixels)
        q = torch.cat([previous_q[None], (chunk - base) / threshold])  # row 0: the step before the chunk
        levels = _advance_levels(q[1:], level)
        crossed = levels.diff(dim=0).flatten()
        flat = crossed.nonzero().squeeze(1)
        if flat.numel():
            count = crossed[flat].abs().long()
            flat_event = flat.repeat_interleave(count)
            sign = crossed[flat].sign().repeat_interleave(count)
            first = torch.cumsum(count, 0) - count
            rank = (
                torch.arange(len(flat_event)) - first.repeat_interleave(count) + 1
            )  # 1st, 2nd.. level crossed
            crossed_level = levels.flatten()[flat_event] + sign * rank
            q_before, q_after = q.flatten()[flat_event], q.flatten()[flat_event + num_pixels]
            fraction = ((crossed_level - q_before) / (q_after - q_before)).clamp(0, 1).double()
            step = first_step + flat_event // num_pixels
            t_before = step_times[step - 1]
            ts_out.append(t_before + fraction * (step_times[step] - t_before))
            pixel = flat_event % num_pixels
            xs_out.append(pixel % width)
            ys_out.append(pixel // width)
            ps_out.append(sign > 0)
        level, previous_q = levels[-1], q[-1]
        first_step += chunk.shape[0]
    if not ts_out:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(xs_out), torch.cat(ys_out), torch.cat(ts_out), torch.cat(ps_out)
