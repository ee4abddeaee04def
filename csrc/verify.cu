// Rejection resampling over draft chains and trees. Same algorithm, counter layout and rounding
// choices as crossspec_kernels/triton/verify.py (read its docstring for the why); the spec is
// crossspec_kernels/reference.py.
//
// Launch 1, verify_nodes_kernel: one CTA per (slot, request). A node's decision (accepted child,
// else emitted token) depends only on its own logits row, q row and children, so every node
// decides in parallel and each logits row is streamed once. Launch 2, verify_walk_kernel: one
// thread per request follows the accepted children from the root.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>

#include "philox.cuh"
#include "verify.cuh"

namespace crossspec {
namespace {

constexpr int kThreads = 512;
constexpr uint32_t kAcceptCounter = 0xFFFFFFFFu;  // token word of acceptance uniforms

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

struct ArgMax {
  float key;
  int32_t index;
};

struct MaxOp {
  __device__ float operator()(float a, float b) const { return a > b ? a : b; }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MinOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
// Larger key wins; equal keys go to the lower vocabulary id, as torch.argmax does.
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (a.key != b.key) return a.key > b.key ? a : b;
    return a.index <= b.index ? a : b;
  }
};

// Reduces over the CTA and returns the result to every thread. Callers are block-uniform.
template <typename T, typename Op>
__device__ T block_all_reduce(T value, Op op) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ T result;
  const T reduced = Reduce(storage).Reduce(value, op);
  if (threadIdx.x == 0) result = reduced;
  __syncthreads();
  const T out = result;
  __syncthreads();  // storage and result are reused by the next call
  return out;
}

// Per-node view of the inputs, with the row pointers already offset (int64 arithmetic).
template <typename LogitT, typename ProbT>
struct Node {
  const LogitT* logits;
  const ProbT* probs;
  const int64_t* draft_tokens;
  const int64_t* parents;
  int64_t num_nodes;
  int32_t vocab;
  int64_t node;  // -1 = root
  float temperature;
  uint64_t seed;
  uint64_t offset;
  uint32_t row;
  uint32_t slot;

  __device__ float logit(int32_t x) const {
    const float v = to_float(logits[x]);
    return isnan(v) ? -INFINITY : v;  // a NaN must never win an argmax or a race
  }
  __device__ float scaled(int32_t x) const { return logit(x) / temperature; }
  __device__ float q(int32_t x) const {
    const float v = to_float(probs[x]);
    return v > 0.f && v < INFINITY ? v : 0.f;  // NaN, inf, 0 or negative: never drawn from q
  }
  // Race noise E ~ Exp(1) of tokens base .. base+3 come from one Philox call.
  __device__ uint4 race_words(int32_t base) const {
    return philox_words(seed, offset, row, slot, static_cast<uint32_t>(base) >> 2);
  }

  // Lowest node j > after under this node whose token is present (and == want if want >= 0);
  // num_nodes when there is none.
  __device__ int64_t first_child(int64_t after, int64_t want) const {
    int64_t best = num_nodes;
    for (int64_t j = after + 1 + threadIdx.x; j < num_nodes; j += kThreads) {
      const int64_t token = draft_tokens[j];
      if (parents[j] == node && token >= 0 && token < vocab && (want < 0 || token == want)) {
        best = j < best ? j : best;
      }
    }
    return block_all_reduce(best, MinOp{});
  }
};

__device__ __forceinline__ float softmax_weight(float z, float z_max) {
  if (z_max == INFINITY) return z == INFINITY ? 1.f : 0.f;
  if (z_max == -INFINITY) return 1.f;
  return expf(z - z_max);
}

__device__ __forceinline__ void race_update(ArgMax& best, float key, int32_t x) {
  if (key > best.key) best = ArgMax{key, x};  // x increases: ties keep the lower id
}

__device__ __forceinline__ float exponential(const uint4& words, int lane) {
  return -logf(to_uniform(word_of(words, lane)));
}

// Each thread visits four consecutive ids per step: a warp reads 128 contiguous elements, and a
// race needs one Philox call per visit. `visit(base, lane)` handles id base + lane < vocab.
template <typename Visit>
__device__ __forceinline__ void for_each_quad(int32_t vocab, Visit&& visit) {
  for (int32_t base = 4 * threadIdx.x; base < vocab; base += 4 * kThreads) {
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      if (base + lane < vocab) visit(base, lane);
    }
  }
}

template <typename LogitT, typename ProbT>
__device__ int32_t greedy_token(const Node<LogitT, ProbT>& n) {
  ArgMax best{-INFINITY, 0};
  for_each_quad(n.vocab, [&](int32_t base, int lane) {
    race_update(best, n.logit(base + lane), base + lane);
  });
  return block_all_reduce(best, ArgMaxOp{}).index;
}

template <typename LogitT, typename ProbT>
__device__ float scaled_max(const Node<LogitT, ProbT>& n) {
  float m = -INFINITY;
  for_each_quad(n.vocab, [&](int32_t base, int lane) { m = fmaxf(m, n.scaled(base + lane)); });
  return block_all_reduce(m, MaxOp{});
}

// y ~ softmax(logits / T) by the exponential race.
template <typename LogitT, typename ProbT>
__device__ int32_t sample_target(const Node<LogitT, ProbT>& n, float z_max) {
  ArgMax best{-1.f, 0};
  uint4 words;
  for_each_quad(n.vocab, [&](int32_t base, int lane) {
    if (lane == 0) words = n.race_words(base);
    const int32_t x = base + lane;
    race_update(best, softmax_weight(n.scaled(x), z_max) / exponential(words, lane), x);
  });
  return block_all_reduce(best, ArgMaxOp{}).index;
}

// Recursive rejection sampling at one node (children drawn i.i.d. from q). The residual after
// i rejections is (p - shift * q)+ / scale: see the Triton module's docstring.
template <typename LogitT, typename ProbT>
__device__ void recursive_rejection(const Node<LogitT, ProbT>& n, float z_max, int64_t& child,
                                    int64_t& emitted) {
  float total = 0.f;
  for_each_quad(n.vocab, [&](int32_t base, int lane) {
    total += softmax_weight(n.scaled(base + lane), z_max);
  });
  total = block_all_reduce(total, SumOp{});
  float shift = 0.f, scale = 1.f;
  for (int64_t candidate = n.first_child(n.node, -1); candidate < n.num_nodes;
       candidate = n.first_child(candidate, -1)) {
    const int32_t x = static_cast<int32_t>(n.draft_tokens[candidate]);
    const float p_x = softmax_weight(n.scaled(x), z_max) / total;
    const float q_x = n.q(x);
    if (q_x == 0.f) continue;  // x cannot have been drawn from q: skip it, keep the residual
    const float residual_x = fmaxf(p_x - shift * q_x, 0.f) / scale;
    const float u = philox_uniform(n.seed, n.offset, n.row, static_cast<uint32_t>(candidate + 1),
                                   kAcceptCounter);
    if (u * q_x < residual_x) {
      child = candidate;
      return;
    }
    const float next_shift = shift + scale;
    float next_total = 0.f;
    for_each_quad(n.vocab, [&](int32_t base, int lane) {
      const float p = softmax_weight(n.scaled(base + lane), z_max) / total;
      next_total += fmaxf(p - next_shift * n.q(base + lane), 0.f);
    });
    next_total = block_all_reduce(next_total, SumOp{});
    if (next_total > 0.f) {  // an all-zero residual keeps the current distribution
      shift = next_shift;
      scale = next_total;
    }
  }
  ArgMax best{-1.f, 0};
  uint4 words;
  for_each_quad(n.vocab, [&](int32_t base, int lane) {
    if (lane == 0) words = n.race_words(base);
    const int32_t x = base + lane;
    const float p = softmax_weight(n.scaled(x), z_max) / total;
    race_update(best, fmaxf(p - shift * n.q(x), 0.f) / exponential(words, lane), x);
  });
  emitted = block_all_reduce(best, ArgMaxOp{}).index;
}

template <typename LogitT, typename ProbT, bool kHasProbs>
__global__ void __launch_bounds__(kThreads) verify_nodes_kernel(VerifyParams params) {
  const int64_t slot = blockIdx.x;
  const int64_t row = blockIdx.y;
  const int64_t num_nodes = params.num_nodes;
  Node<LogitT, ProbT> n;
  n.logits = static_cast<const LogitT*>(params.target_logits) + row * params.logits_stride_batch +
             slot * params.logits_stride_slot;
  n.probs = kHasProbs ? static_cast<const ProbT*>(params.draft_probs) +
                            row * params.probs_stride_batch + slot * params.probs_stride_slot
                      : nullptr;
  n.draft_tokens = params.draft_tokens + row * num_nodes;
  n.parents = params.parents + row * num_nodes;
  n.num_nodes = num_nodes;
  n.vocab = static_cast<int32_t>(params.vocab);
  n.node = slot - 1;
  n.temperature = params.temperature[row];
  n.seed = static_cast<uint64_t>(params.seed[row]);
  n.offset = static_cast<uint64_t>(params.offset[row]);
  n.row = static_cast<uint32_t>(row);
  n.slot = static_cast<uint32_t>(slot);

  int64_t child = -1;
  int64_t emitted = -1;
  const int64_t own_token = slot > 0 ? n.draft_tokens[slot - 1] : 0;
  const bool sampled =
      n.temperature > 0.f && n.temperature < INFINITY;  // else greedy (0, NaN, inf)
  if (own_token >= 0 && own_token < params.vocab) {     // absent nodes decide nothing
    if (sampled) {
      const float z_max = scaled_max(n);
      if constexpr (kHasProbs) {
        recursive_rejection(n, z_max, child, emitted);
      } else {
        emitted = sample_target(n, z_max);
      }
    } else {
      emitted = greedy_token(n);
    }
    if (!kHasProbs || !sampled) {
      const int64_t match = n.first_child(n.node, emitted);
      child = match < num_nodes ? match : -1;
    }
  }
  if (threadIdx.x == 0) {
    const int64_t out = row * (num_nodes + 1) + slot;
    params.next_child[out] = static_cast<int32_t>(child);
    params.emitted[out] = emitted;
  }
}

__global__ void verify_walk_kernel(VerifyParams params) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= params.batch) return;
  const int64_t num_nodes = params.num_nodes;
  const int64_t slots = num_nodes + 1;
  int64_t* tokens = params.tokens + row * slots;
  int64_t* path = params.path + row * num_nodes;
  int64_t slot = 0, count = 0;
  // A child's index exceeds its parent's, so this ends within N steps.
  for (int32_t child; (child = params.next_child[row * slots + slot]) >= 0; slot = child + 1) {
    tokens[count] = params.draft_tokens[row * num_nodes + child];
    path[count] = child;
    ++count;
  }
  tokens[count] = params.emitted[row * slots + slot];
  for (int64_t column = count + 1; column < slots; ++column) tokens[column] = -1;
  for (int64_t column = count; column < num_nodes; ++column) path[column] = -1;
  params.num_accepted[row] = count;
}

template <typename LogitT, typename ProbT, bool kHasProbs>
void launch_nodes(const VerifyParams& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.num_nodes + 1), static_cast<unsigned>(params.batch));
  verify_nodes_kernel<LogitT, ProbT, kHasProbs><<<grid, kThreads, 0, stream>>>(params);
}

template <typename LogitT>
cudaError_t launch_nodes_for_probs(const VerifyParams& params, cudaStream_t stream) {
  if (params.draft_probs == nullptr) {
    launch_nodes<LogitT, float, false>(params, stream);
    return cudaSuccess;
  }
  switch (params.probs_dtype) {
    case DType::kFloat32:
      launch_nodes<LogitT, float, true>(params, stream);
      return cudaSuccess;
    case DType::kFloat16:
      launch_nodes<LogitT, __half, true>(params, stream);
      return cudaSuccess;
    case DType::kBFloat16:
      launch_nodes<LogitT, __nv_bfloat16, true>(params, stream);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t verify(const VerifyParams& params, cudaStream_t stream) {
  // Limits of the counter layout and the grid (grid.y <= 65535); the Python layer checks them
  // first with named errors, this is the last line of defence for direct callers.
  if (params.batch < 1 || params.batch > 65535 || params.num_nodes < 0 ||
      params.num_nodes + 1 > 65536 || params.vocab < 1 || params.vocab > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t status = cudaErrorInvalidValue;
  switch (params.logits_dtype) {
    case DType::kFloat32:
      status = launch_nodes_for_probs<float>(params, stream);
      break;
    case DType::kFloat16:
      status = launch_nodes_for_probs<__half>(params, stream);
      break;
    case DType::kBFloat16:
      status = launch_nodes_for_probs<__nv_bfloat16>(params, stream);
      break;
  }
  if (status != cudaSuccess) return status;
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  constexpr int kWalkThreads = 128;
  const unsigned walk_blocks =
      static_cast<unsigned>((params.batch + kWalkThreads - 1) / kWalkThreads);
  verify_walk_kernel<<<walk_blocks, kWalkThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace crossspec
