// Event rasterization: events -> EventGPT frames, polarity histogram, or DSEC voxel grid
// (crossspec_kernels.events_to_frames).
//
// Raw pointers, sizes and a stream in; cudaError_t out. No torch here: the Python layer
// (crossspec_kernels/ops/events_to_frames.py) validates and allocates everything below.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace crossspec {

enum class EventRepresentation : int { kEventGPT = 0, kHistogram = 1, kVoxel = 2 };

// Element type of the coordinate and polarity arrays. bool travels as kUInt8 (same bytes).
enum class IntDType : int { kInt8 = 0, kUInt8 = 1, kInt16 = 2, kInt32 = 3, kInt64 = 4 };

struct EventsToFramesParams {
  EventRepresentation representation;
  const void* x;  // [n] contiguous; kInt16, kInt32 or kInt64 (x and y share the type)
  const void* y;  // [n] contiguous
  IntDType coord_dtype;
  const int64_t* t;  // [n] microseconds, sorted; read by kVoxel only
  const void* p;     // [n] contiguous; p > 0 is a positive event
  IntDType polarity_dtype;
  int64_t num_events;    // n >= 0
  int64_t height;        // H >= 1
  int64_t width;         // W >= 1
  int64_t num_slices;    // frames (kEventGPT) or bins (kVoxel), >= 1; ignored by kHistogram
  int fixed_point_bits;  // kVoxel: weights are accumulated in units of 2^-bits, 1 <= bits <= 30
  // kEventGPT: int32 [ceil(F*H*W / 16)], 2-bit flags per pixel; kVoxel: int64 [B*H*W] fixed-point
  // sums; kHistogram: unused (nullptr). Zeroed by the launcher.
  void* workspace;
  // kEventGPT: uint8 [F, 3, H, W]; kHistogram: int32 [2, H, W]; kVoxel: float32 [B, H, W].
  void* output;
};

// Enqueues the whole op on `stream` (a memset, a scatter over events with integer atomics, and,
// for kEventGPT and kVoxel, a conversion pass). Events outside [0, W) x [0, H) are skipped, and
// voxel bins outside [0, B) are never written, so unchecked input cannot write out of bounds.
// Deterministic: only integer atomics, whose sums do not depend on the order of arrival.
cudaError_t events_to_frames(const EventsToFramesParams& params, cudaStream_t stream);

}  // namespace crossspec
