// Event rasterization. Same semantics as crossspec_kernels/triton/events_to_frames.py (read its
// docstring for the layout of the passes); the spec is crossspec_kernels/reference.py.
//
// Scatter kernels: one thread per event (grid-stride), integer atomics only, so outputs are
// bit-reproducible. EventGPT packs 16 pixels of 2-bit flags into an int32 word (5 frames of 480x640
// are 384 KiB: the atomics stay in L2); the colour pass then writes each pixel's RGB. Voxel weights
// are int64 fixed point (two per event, summing to exactly 2^bits), converted to float32 once with
// the same rounding as the Triton kernel (int64 -> fp32 round-to-nearest, then an exact scale).
#include "events_to_frames.cuh"

namespace crossspec {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65536;  // grid-stride beyond this: enough to fill any current GPU
constexpr int kPixelsPerWord = 16;

int blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

template <typename CoordT, typename PolarityT>
struct EventReader {
  const CoordT* x;
  const CoordT* y;
  const PolarityT* p;
  int64_t height;
  int64_t width;

  // Returns false for events outside the sensor; otherwise the pixel index and the polarity.
  __device__ __forceinline__ bool read(int64_t event, int64_t* pixel, bool* positive) const {
    const int64_t xi = static_cast<int64_t>(x[event]);
    const int64_t yi = static_cast<int64_t>(y[event]);
    *positive = p[event] > PolarityT(0);
    *pixel = yi * width + xi;
    return xi >= 0 && xi < width && yi >= 0 && yi < height;
  }
};

template <typename CoordT, typename PolarityT>
__global__ void __launch_bounds__(kThreads)
    eventgpt_scatter_kernel(EventReader<CoordT, PolarityT> events, int64_t num_events,
                            int64_t num_frames, unsigned int* flags) {
  const int64_t frame_pixels = events.height * events.width;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < num_events;
       e += int64_t(gridDim.x) * kThreads) {
    int64_t pixel;
    bool positive;
    if (!events.read(e, &pixel, &positive)) continue;
    // Chunk f holds events [f*n / F, (f+1)*n / F): event e is in chunk ((e+1)*F - 1) / n.
    const int64_t frame = ((e + 1) * num_frames - 1) / num_events;
    const int64_t cell = frame * frame_pixels + pixel;
    const unsigned int bit = (positive ? 2u : 1u) << (2 * (cell % kPixelsPerWord));
    atomicOr(flags + cell / kPixelsPerWord, bit);
  }
}

// One thread per 4 consecutive pixels of a frame; uchar4 stores when a frame's size allows them.
__global__ void __launch_bounds__(kThreads)
    eventgpt_color_kernel(const unsigned int* flags, int64_t frame_pixels, int64_t num_frames,
                          uint8_t* out) {
  const int64_t quads_per_frame = (frame_pixels + 3) / 4;
  const int64_t total = quads_per_frame * num_frames;
  const bool vector_stores = frame_pixels % 4 == 0;
  for (int64_t q = blockIdx.x * int64_t(kThreads) + threadIdx.x; q < total;
       q += int64_t(gridDim.x) * kThreads) {
    const int64_t frame = q / quads_per_frame;
    const int64_t first = (q % quads_per_frame) * 4;
    uint8_t rgb[3][4];
    for (int k = 0; k < 4; ++k) {
      const int64_t pixel = first + k;
      unsigned int f = 0;
      if (pixel < frame_pixels) {
        const int64_t cell = frame * frame_pixels + pixel;
        f = (flags[cell / kPixelsPerWord] >> (2 * (cell % kPixelsPerWord))) & 3u;
      }
      // White background; red for any positive event, else blue for any negative one.
      rgb[0][k] = f == 1u ? 0 : 255;
      rgb[1][k] = f == 0u ? 255 : 0;
      rgb[2][k] = (f & 2u) ? 0 : 255;
    }
    uint8_t* base = out + frame * 3 * frame_pixels + first;
    for (int c = 0; c < 3; ++c) {
      uint8_t* dst = base + c * frame_pixels;
      if (vector_stores) {
        *reinterpret_cast<uchar4*>(dst) = make_uchar4(rgb[c][0], rgb[c][1], rgb[c][2], rgb[c][3]);
      } else {
        for (int k = 0; k < 4 && first + k < frame_pixels; ++k) dst[k] = rgb[c][k];
      }
    }
  }
}

template <typename CoordT, typename PolarityT>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(EventReader<CoordT, PolarityT> events, int64_t num_events, int* out) {
  const int64_t frame_pixels = events.height * events.width;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < num_events;
       e += int64_t(gridDim.x) * kThreads) {
    int64_t pixel;
    bool positive;
    if (!events.read(e, &pixel, &positive)) continue;
    atomicAdd(out + (positive ? frame_pixels : 0) + pixel, 1);
  }
}

template <typename CoordT, typename PolarityT>
__global__ void __launch_bounds__(kThreads)
    voxel_scatter_kernel(EventReader<CoordT, PolarityT> events, const int64_t* t,
                         int64_t num_events, int64_t num_bins, int fixed_point_bits,
                         unsigned long long* acc) {
  const int64_t frame_pixels = events.height * events.width;
  const int64_t t_first = t[0];
  const double span = static_cast<double>(t[num_events - 1] - t_first);
  const int64_t one = int64_t(1) << fixed_point_bits;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < num_events;
       e += int64_t(gridDim.x) * kThreads) {
    int64_t pixel;
    bool positive;
    if (!events.read(e, &pixel, &positive)) continue;
    // Same operation order as the fp64 reference: (B - 1) * (t - t0), then / span; __dmul_rn and
    // __ddiv_rn keep nvcc from contracting or reordering them.
    double t_norm = 0.0;
    if (span > 0.0) {
      t_norm = __ddiv_rn(__dmul_rn(double(num_bins - 1), double(t[e] - t_first)), span);
    }
    // Only unsorted t (refused by the checks) leaves [0, B - 1]: the clamp keeps the conversion
    // defined and the bin tests below keep every write in bounds.
    t_norm = fmin(fmax(t_norm, -1.0), double(num_bins));
    const int64_t lower = static_cast<int64_t>(t_norm);  // truncation == floor for t_norm >= 0
    const double frac = t_norm - double(lower);
    const int64_t upper_weight = static_cast<int64_t>(__dadd_rn(__dmul_rn(frac, double(one)), 0.5));
    const int64_t lower_weight = one - upper_weight;
    const int64_t sign = positive ? 1 : -1;
    const int64_t cell = lower * frame_pixels + pixel;
    // Two's-complement wrap-around makes unsigned adds of negative weights exact.
    if (lower >= 0 && lower < num_bins) {
      atomicAdd(acc + cell, static_cast<unsigned long long>(sign * lower_weight));
    }
    if (upper_weight != 0 && lower + 1 >= 0 && lower + 1 < num_bins) {
      atomicAdd(acc + cell + frame_pixels, static_cast<unsigned long long>(sign * upper_weight));
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    voxel_convert_kernel(const long long* acc, int64_t num_cells, float scale, float* out) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < num_cells;
       i += int64_t(gridDim.x) * kThreads) {
    // int64 -> fp32 rounds once (to nearest); the power-of-two scale is exact.
    out[i] = __fmul_rn(__ll2float_rn(acc[i]), scale);
  }
}

template <typename CoordT, typename PolarityT>
cudaError_t launch(const EventsToFramesParams& params, cudaStream_t stream) {
  const EventReader<CoordT, PolarityT> events{
      static_cast<const CoordT*>(params.x), static_cast<const CoordT*>(params.y),
      static_cast<const PolarityT*>(params.p), params.height, params.width};
  const int64_t n = params.num_events;
  const int64_t frame_pixels = params.height * params.width;
  const int64_t cells = params.num_slices * frame_pixels;
  cudaError_t status = cudaSuccess;
  switch (params.representation) {
    case EventRepresentation::kEventGPT: {
      auto* flags = static_cast<unsigned int*>(params.workspace);
      const int64_t words = (cells + kPixelsPerWord - 1) / kPixelsPerWord;
      status = cudaMemsetAsync(flags, 0, words * sizeof(unsigned int), stream);
      if (status != cudaSuccess) return status;
      if (n > 0) {
        eventgpt_scatter_kernel<<<blocks_for(n), kThreads, 0, stream>>>(events, n,
                                                                        params.num_slices, flags);
      }
      const int64_t quads = (frame_pixels + 3) / 4 * params.num_slices;
      eventgpt_color_kernel<<<blocks_for(quads), kThreads, 0, stream>>>(
          flags, frame_pixels, params.num_slices, static_cast<uint8_t*>(params.output));
      break;
    }
    case EventRepresentation::kHistogram: {
      auto* out = static_cast<int*>(params.output);
      status = cudaMemsetAsync(out, 0, 2 * frame_pixels * sizeof(int), stream);
      if (status != cudaSuccess) return status;
      if (n > 0) histogram_kernel<<<blocks_for(n), kThreads, 0, stream>>>(events, n, out);
      break;
    }
    case EventRepresentation::kVoxel: {
      auto* acc = static_cast<unsigned long long*>(params.workspace);
      status = cudaMemsetAsync(acc, 0, cells * sizeof(unsigned long long), stream);
      if (status != cudaSuccess) return status;
      if (n > 0) {
        voxel_scatter_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
            events, params.t, n, params.num_slices, params.fixed_point_bits, acc);
      }
      const float scale = 1.0f / static_cast<float>(int64_t(1) << params.fixed_point_bits);
      voxel_convert_kernel<<<blocks_for(cells), kThreads, 0, stream>>>(
          reinterpret_cast<const long long*>(acc), cells, scale,
          static_cast<float*>(params.output));
      break;
    }
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename CoordT>
cudaError_t launch_for_polarity(const EventsToFramesParams& params, cudaStream_t stream) {
  switch (params.polarity_dtype) {
    case IntDType::kInt8:
      return launch<CoordT, int8_t>(params, stream);
    case IntDType::kUInt8:
      return launch<CoordT, uint8_t>(params, stream);
    case IntDType::kInt16:
      return launch<CoordT, int16_t>(params, stream);
    case IntDType::kInt32:
      return launch<CoordT, int32_t>(params, stream);
    case IntDType::kInt64:
      return launch<CoordT, int64_t>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t events_to_frames(const EventsToFramesParams& params, cudaStream_t stream) {
  if (params.num_events < 0 || params.height < 1 || params.width < 1 || params.num_slices < 1 ||
      params.fixed_point_bits < 1 || params.fixed_point_bits > 30 || params.output == nullptr ||
      (params.representation != EventRepresentation::kHistogram && params.workspace == nullptr) ||
      (params.num_events > 0 && (params.x == nullptr || params.y == nullptr ||
                                 params.p == nullptr || params.t == nullptr))) {
    return cudaErrorInvalidValue;
  }
  switch (params.coord_dtype) {
    case IntDType::kInt16:
      return launch_for_polarity<int16_t>(params, stream);
    case IntDType::kInt32:
      return launch_for_polarity<int32_t>(params, stream);
    case IntDType::kInt64:
      return launch_for_polarity<int64_t>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace crossspec
