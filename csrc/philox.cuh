// Philox4x32-10 (Salmon et al., SC'11): the counter-based generator every backend shares.
// The counter layout is documented once, in crossspec_kernels/reference.py; keep them in step.
#pragma once

#include <cstdint>

namespace crossspec {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      key.x += kPhiloxW0;
      key.y += kPhiloxW1;
    }
    const uint32_t hi0 = __umulhi(kPhiloxM0, counter.x);
    const uint32_t lo0 = kPhiloxM0 * counter.x;
    const uint32_t hi1 = __umulhi(kPhiloxM1, counter.z);
    const uint32_t lo1 = kPhiloxM1 * counter.z;
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
  }
  return counter;
}

// The four words for counter word 0 = `quad` (tokens 4*quad .. 4*quad+3), under the layout of
// crossspec_kernels/reference.py: counter = (quad, row << 16 | slot, offset lo, offset hi).
__device__ __forceinline__ uint4 philox_words(uint64_t seed, uint64_t offset, uint32_t row,
                                              uint32_t slot, uint32_t quad) {
  const uint4 counter = make_uint4(quad, (row << 16) | slot, static_cast<uint32_t>(offset),
                                   static_cast<uint32_t>(offset >> 32));
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return philox4x32_10(counter, key);
}

// Uniform strictly inside (0, 1), exact in fp32: ((w >> 9) + 0.5) * 2^-23. Neither end may occur:
// -log(1) = 0 would divide a race key by zero, -log(0) = inf would zero a likely token's key.
__device__ __forceinline__ float to_uniform(uint32_t word) {
  return (static_cast<float>(word >> 9) + 0.5f) * 0x1p-23f;
}

__device__ __forceinline__ uint32_t word_of(const uint4& words, uint32_t lane) {
  return lane == 0 ? words.x : lane == 1 ? words.y : lane == 2 ? words.z : words.w;
}

// The uniform of one token (or of an acceptance counter such as 0xFFFFFFFF).
__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t offset, uint32_t row,
                                                uint32_t slot, uint32_t token) {
  return to_uniform(word_of(philox_words(seed, offset, row, slot, token >> 2), token & 3u));
}

}  // namespace crossspec
