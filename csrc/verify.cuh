// Rejection resampling over draft chains and trees (crossspec_kernels.verify).
//
// Raw pointers, sizes, strides and a stream in; cudaError_t out. No torch here: the Python layer
// (crossspec_kernels/ops/verify.py) validates, normalises and allocates everything below.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace crossspec {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct VerifyParams {
  // [B, N+1, V]; last dim contiguous, other dims strided (elements).
  const void* target_logits;
  DType logits_dtype;
  int64_t logits_stride_batch;
  int64_t logits_stride_slot;
  // [B, N+1, V] or nullptr (deterministic candidates).
  const void* draft_probs;
  DType probs_dtype;
  int64_t probs_stride_batch;
  int64_t probs_stride_slot;
  const int64_t* draft_tokens;  // [B, N] contiguous
  const int64_t* parents;       // [B, N] contiguous
  const float* temperature;     // [B]; not > 0 (incl. NaN) means greedy
  const int64_t* seed;          // [B] Philox keys (uint64 bits)
  const int64_t* offset;        // [B] Philox counter high words (uint64 bits)
  int64_t batch;                // B <= 65536
  int64_t num_nodes;            // N; N + 1 <= 65536
  int64_t vocab;                // V <= 2^30 (int32 ids with headroom)
  int32_t* next_child;          // workspace [B, N+1]: accepted child of each slot's node, or -1
  int64_t* emitted;             // workspace [B, N+1]: token emitted if the walk stops there
  int64_t* tokens;              // out [B, N+1]
  int64_t* num_accepted;        // out [B]
  int64_t* path;                // out [B, N]
};

// Enqueues the whole op on `stream` (two kernels: per-node decisions, then the per-row walk).
cudaError_t verify(const VerifyParams& params, cudaStream_t stream);

}  // namespace crossspec
