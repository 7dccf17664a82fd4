// Row sums and row products of the combines (combine_kernels.cu, low_latency_kernels.cu): rows
// in 8-element (16-byte) chunks per lane when H % 8 == 0, one element per lane otherwise (the Vec
// template), with the exact numerics of plan/numerics.hpp: one fma per term (weight 1 for an
// unweighted term, the same bits as the add), plain adds for biases, one RNE rounding to bf16.
// Also the host-side choices of a launch between the shapes (vector_width, wide_sums).
#pragma once

#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "cuda/device/bf16_rounding.cuh"
#include "cuda/device/device_primitives.cuh"
#include "cuda/kernels/kernels.hpp"
#include "plan/numerics.hpp"

namespace epx::cuda {

template <int Vec>
struct Chunk;

// Vec bf16 values of a row still packed, two to a 32-bit word (half the registers of a Chunk
// while a load is in flight; one 16-byte access when Vec == 8). Unpacking is a shift or a mask
// per element: a uint16 array here cost a 16-bit conversion per element, which made
// combine_backward 53% slower at 4096 tokens (docs/performance.md).
template <int Vec>
struct PackedChunk {
  static_assert(Vec == 1 || Vec == 8, "rows go in 8-element chunks, or one element per lane");
  uint32_t words[(Vec + 1) / 2];  // element 2i in the low half of word i, 2i + 1 in the high
  __device__ __forceinline__ void load(const uint16_t* p) {
    if constexpr (Vec == 8) {
      *reinterpret_cast<uint4*>(words) = *reinterpret_cast<const uint4*>(p);
    } else {
      words[0] = p[0];
    }
  }
  __device__ __forceinline__ void store(uint16_t* p) const {
    if constexpr (Vec == 8) {
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(words);
    } else {
      p[0] = static_cast<uint16_t>(words[0]);
    }
  }
  __device__ __forceinline__ Chunk<Vec> unpack() const;
};

// The same Vec elements as fp32, the form they are summed in; stored with one RNE rounding to
// bf16 per element (two at a time, cuda/device/bf16_rounding.cuh).
template <int Vec>
struct Chunk {
  float v[Vec];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < Vec; ++i) v[i] = 0.0f;
  }
  __device__ __forceinline__ void load(const uint16_t* p) {
    PackedChunk<Vec> packed;
    packed.load(p);
    *this = packed.unpack();
  }
  __device__ __forceinline__ void store(uint16_t* p) const {
    PackedChunk<Vec> packed;
    if constexpr (Vec == 8) {
      round_to_bf16<4>(v, packed.words);
    } else {
      packed.words[0] = plan::float_to_bf16_bits(v[0]);
    }
    packed.store(p);
  }
  __device__ __forceinline__ void add(const Chunk& x) {
#pragma unroll
    for (int i = 0; i < Vec; ++i) v[i] = plan::accumulate(v[i], x.v[i]);
  }
  __device__ __forceinline__ void fma(float w, const Chunk& x) {
#pragma unroll
    for (int i = 0; i < Vec; ++i) v[i] = plan::accumulate_weighted(v[i], w, x.v[i]);
  }
};

template <int Vec>
__device__ __forceinline__ Chunk<Vec> PackedChunk<Vec>::unpack() const {
  Chunk<Vec> out;
#pragma unroll
  for (int i = 0; i < Vec; ++i) {
    const uint32_t word = words[i / 2];
    out.v[i] = __uint_as_float(i % 2 == 0 ? word << 16 : word & 0xffff0000u);
  }
  return out;
}

// Row sums, the inner loop of both reductions. A lane covers Span positions of the row
// (h0 + u * kWarpSize * Vec, u < Span, those < end) and loads Terms terms at all of them before
// summing: Terms x Span loads in flight per lane instead of one, which is what bounds these
// loops (memory latency, not bandwidth). Every element still sums its terms in term order, then
// the caller adds biases: the numerics of plan/numerics.hpp are unchanged.
//
// Two shapes, picked per launch by the terms a row sum is expected to have present
// (wide_sums): 8 terms x 2 positions when that is six or more (the top-k rows of a token summed
// at the source, or at the expert on one rank), 5-8% faster there than 2 x 4; 2 x 4 otherwise:
// the loads a shape keeps in flight are its present terms times its positions, and rows of one
// to five terms fill a fraction of 8 x 2 (a compact combine over four thread ranks was 5%
// slower with it). The expert-side sum with the narrow shape also leaves absent terms out of
// its term cache (cache_terms); docs/performance.md has the figures. The one-element path
// (odd H or unaligned tensors) keeps the narrow shape.
constexpr int kNarrowTerms = 2, kNarrowSpan = 4;
constexpr int kWideTerms = 8, kWideSpan = 2;

template <int Vec, int Span>
struct RowSpan {
  Chunk<Vec> v[Span];
  int64_t h0, end;
  __device__ __forceinline__ bool has(int u) const {
    return h0 + int64_t(u) * kWarpSize * Vec < end;
  }
  __device__ __forceinline__ int64_t at(int u) const { return h0 + int64_t(u) * kWarpSize * Vec; }
};

// term(i, w) returns term i's row, or null when the term is absent, and sets its weight w
// (WeightsBeside: where its weight is, w, null for weight 1, loaded beside the row's chunks). An
// unweighted term has w = 1: fma(1, x, acc) rounds once, exactly as acc + x does
// (plan::accumulate), so both kinds take the same instructions, without a branch per term
// (docs/performance.md).
template <int Vec, int Terms, int Span, bool WeightsBeside, typename Term>
__device__ __forceinline__ void sum_terms(RowSpan<Vec, Span>& acc, int num_terms, Term term) {
#pragma unroll
  for (int u = 0; u < Span; ++u) acc.v[u].zero();
  for (int i0 = 0; i0 < num_terms; i0 += Terms) {
    PackedChunk<Vec> x[Terms][Span];
    const uint16_t* rows[Terms];
    float weight[Terms];
#pragma unroll
    for (int j = 0; j < Terms; ++j) {
      const float* w = nullptr;
      if constexpr (WeightsBeside) {
        rows[j] = i0 + j < num_terms ? term(i0 + j, w) : nullptr;
      } else {
        weight[j] = 0.0f;
        rows[j] = i0 + j < num_terms ? term(i0 + j, weight[j]) : nullptr;
      }
#pragma unroll
      for (int u = 0; u < Span; ++u) {
        if (rows[j] && acc.has(u)) {
          // Rows are in global memory; read back from the term cache, the compiler cannot
          // tell and would issue generic loads.
          __builtin_assume(__isGlobal(rows[j]));
          x[j][u].load(rows[j] + acc.at(u));
        }
      }
      if constexpr (WeightsBeside) weight[j] = rows[j] && w ? *w : 1.0f;
    }
#pragma unroll
    for (int j = 0; j < Terms; ++j) {
      if (!rows[j]) continue;
#pragma unroll
      for (int u = 0; u < Span; ++u) {
        if (acc.has(u)) acc.v[u].fma(weight[j], x[j][u].unpack());
      }
    }
  }
}

// The terms of one row sum, resolved once per (row, part) instead of at every position: lane i
// resolves term i (its row and weight, behind one to three dependent index loads) into the
// warp's slot of shared memory, and the position loop reads them there (docs/performance.md).
// Up to kCachedTerms terms; with more, every position resolves them again.
//
// WeightsBeside (a term that gives its weight's address, as in sum_terms): the cache keeps the
// address, and the position loop loads the weight beside the row's chunks, where otherwise
// the lane loads it first: a row sum of one pass (the low-latency combine: parts of a decode
// batch's rows) then waits one round trip fewer, -0.6 us at 128 tokens; a sum of many passes
// loads the weight again at each, which made the normal path's 4 096-token combines 2-9% slower
// (docs/performance.md).
constexpr int kCachedTerms = 8;
struct CachedTerms {
  const uint16_t* row[kCachedTerms];
  float weight[kCachedTerms];
  const float* weight_at[kCachedTerms];  // WeightsBeside; null: weight 1
};

// What a term gives for its weight: the value, or (WeightsBeside) its address, null for 1.
template <bool WeightsBeside>
using TermWeight = std::conditional_t<WeightsBeside, const float*, float>;
__device__ __forceinline__ void cache_weight(CachedTerms& cache, int slot, float w) {
  cache.weight[slot] = w;
}
__device__ __forceinline__ void cache_weight(CachedTerms& cache, int slot, const float* w) {
  cache.weight_at[slot] = w;
}

// Fills `cache` from term(i, w), i < num_terms, in order; the warp, all lanes. Returns how many
// slots the sum reads, or -1 when there are more terms than slots. With SkipAbsent the absent
// terms take no slot (a ballot per row): worth it where most of a row's terms are absent, the
// expert-side sum over several ranks (-9% at 2 thread ranks, -13% at 4), not where they
// are present (the ballot costs ~25 us per 4 096 rows; docs/performance.md).
template <bool SkipAbsent, bool WeightsBeside, typename Term>
__device__ __forceinline__ int cache_terms(CachedTerms& cache, int num_terms, int lane, Term term) {
  if (num_terms > kCachedTerms) return -1;
  __syncwarp();  // the previous row's reads of the cache are done
  if constexpr (SkipAbsent) {
    TermWeight<WeightsBeside> w{};
    const uint16_t* row = lane < num_terms ? term(lane, w) : nullptr;
    const unsigned present = __ballot_sync(0xffffffffu, row != nullptr);
    if (row) {
      const int slot = __popc(present & ((1u << lane) - 1u));
      cache.row[slot] = row;
      cache_weight(cache, slot, w);
    }
    __syncwarp();
    return __popc(present);
  } else {
    if (lane < num_terms) {
      TermWeight<WeightsBeside> w{};
      cache.row[lane] = term(lane, w);
      cache_weight(cache, lane, w);
    }
    __syncwarp();
    return num_terms;
  }
}

// The warp's cache in shared memory (one per warp of the block).
__device__ __forceinline__ CachedTerms& warp_term_cache() {
  __shared__ CachedTerms caches[kBlockThreads / kWarpSize];
  return caches[warp_in_block()];
}

// A row of one present term (weight w) under the narrow shape would keep only kNarrowSpan loads
// in flight per lane; it loads kSingleSpan positions at once instead (6 was faster than 8, whose
// extra registers spill), and each sum is the same single fma on zero that sum_terms computes
// (docs/performance.md).
constexpr int kSingleSpan = 6;

template <int Vec, typename Finish>
__device__ __forceinline__ void sum_single_term(const uint16_t* row, float w, int64_t begin,
                                                int64_t end, int lane, Finish finish) {
  __builtin_assume(__isGlobal(row));  // read back from the term cache, as in sum_terms
  constexpr int64_t kStride = kWarpSize * Vec;
  for (int64_t h0 = begin + int64_t(lane) * Vec; h0 < end; h0 += kSingleSpan * kStride) {
    PackedChunk<Vec> x[kSingleSpan];
#pragma unroll
    for (int u = 0; u < kSingleSpan; ++u) {
      if (h0 + u * kStride < end) x[u].load(row + h0 + u * kStride);
    }
#pragma unroll
    for (int u = 0; u < kSingleSpan; ++u) {
      if (h0 + u * kStride >= end) continue;
      Chunk<Vec> sum;
      sum.zero();
      sum.fma(w, x[u].unpack());
      finish(h0 + u * kStride, sum);
    }
  }
}

// One row sum (elements [begin, end) of it), run by the whole warp: the terms are cached first
// (warp-collective, so before the position loop, whose trip count differs between lanes:
// docs/performance.md), then each lane sums its positions and hands every sum to
// finish(h, chunk), which adds what the caller adds and stores it.
// OneTermPath: rows of one present term take sum_single_term (the reduce kernel, where every
// row of a compact combine on one rank, and of the second half of an expert-side combine there,
// is one term; the expert-side kernel stays without it, as its registers slowed that sum by 7%
// at two thread ranks). WeightsBeside: see CachedTerms.
template <int Vec, int Terms, int Span, bool SkipAbsent, bool OneTermPath, bool WeightsBeside,
          typename Term, typename Finish>
__device__ __forceinline__ void sum_row(int num_terms, int64_t begin, int64_t end, int lane,
                                        Term term, Finish finish) {
  CachedTerms& cache = warp_term_cache();
  const int cached = cache_terms<SkipAbsent, WeightsBeside>(cache, num_terms, lane, term);
  // The cached terms, in the form the term gives them (TermWeight).
  auto from_cache = [&](int i, auto& w) -> const uint16_t* {
    if constexpr (WeightsBeside) {
      w = cache.weight_at[i];
      __builtin_assume(w == nullptr || __isGlobal(w));  // as the rows (sum_terms)
    } else {
      w = cache.weight[i];
    }
    return cache.row[i];
  };
  if (OneTermPath && cached == 1 && cache.row[0] != nullptr) {
    TermWeight<WeightsBeside> w{};
    from_cache(0, w);
    if constexpr (WeightsBeside) {
      sum_single_term<Vec>(cache.row[0], w ? *w : 1.0f, begin, end, lane, finish);
    } else {
      sum_single_term<Vec>(cache.row[0], w, begin, end, lane, finish);
    }
    return;
  }
  for (int64_t h0 = begin + int64_t(lane) * Vec; h0 < end; h0 += Span * kWarpSize * Vec) {
    RowSpan<Vec, Span> acc{{}, h0, end};
    if (cached >= 0) {
      sum_terms<Vec, Terms, Span, WeightsBeside>(acc, cached, from_cache);
    } else {
      sum_terms<Vec, Terms, Span, WeightsBeside>(acc, num_terms, term);
    }
#pragma unroll
    for (int u = 0; u < Span; ++u) {
      if (acc.has(u)) finish(acc.at(u), acc.v[u]);
    }
  }
}

// The fused backward of one weighted row (combine_backward): grad_x_row = bf16(w * grad)
// element by element (fp32 product, one rounding), and the returned dot(grad, x_row), summed in
// fp32 by each lane and then across the warp (any order is allowed there: docs/semantics.md).
// The warp, all lanes.
constexpr int kProductBatch = 8;  // chunks of grad and of x in flight together
template <int Vec>
__device__ __forceinline__ float scale_and_dot_row(const uint16_t* grad, const uint16_t* x_row,
                                                   float w, uint16_t* grad_x_row, int64_t hidden,
                                                   int lane) {
  float dot = 0.0f;
  constexpr int64_t kStride = kWarpSize * Vec;
  for (int64_t h0 = int64_t(lane) * Vec; h0 < hidden; h0 += kProductBatch * kStride) {
    // kProductBatch chunks of grad and x loaded before any is used (memory latency), held packed
    // until then (half the registers; docs/performance.md).
    PackedChunk<Vec> g[kProductBatch], x[kProductBatch];
#pragma unroll
    for (int j = 0; j < kProductBatch; ++j) {
      const int64_t h = h0 + j * kStride;
      if (h < hidden) {
        g[j].load(grad + h);
        x[j].load(x_row + h);
      }
    }
#pragma unroll
    for (int j = 0; j < kProductBatch; ++j) {
      const int64_t h = h0 + j * kStride;
      if (h >= hidden) continue;
      const Chunk<Vec> gj = g[j].unpack(), xj = x[j].unpack();
      Chunk<Vec> scaled;
#pragma unroll
      for (int i = 0; i < Vec; ++i) {
        scaled.v[i] = __fmul_rn(w, gj.v[i]);
        dot = __fmaf_rn(gj.v[i], xj.v[i], dot);
      }
      scaled.store(grad_x_row + h);
    }
  }
  return warp_sum(dot);
}

// 16-byte chunks need H % 8 == 0 and 16-byte aligned rows in every tensor the kernel reads or
// writes in chunks: staging and epx's outputs are, a caller's tensor may be a view at any
// element offset (one that is not takes the one-element path).
inline int vector_width(int64_t hidden, std::initializer_list<const void*> tensors) {
  if (hidden % 8 != 0) return 1;
  for (const void* tensor : tensors) {
    if (!aligned16(tensor)) return 1;
  }
  return 8;
}

// What a row sum's terms are: a token's top-k rows summed at the source or at an expert's rank,
// or one row per rank (compact).
enum class RowTerms { kTopkAtSource, kTopkAtExpert, kRanks };

// Whether a row sum has six or more present terms, expected under uniform routing, which picks
// the wide shape (above): at the source a token's K rows; at the expert the token's terms held
// by one rank, K/R given at least one; a compact combine's ranks holding any of the token's K
// experts, R(1 - (1 - 1/R)^K).
inline bool wide_sums(int vec, RowTerms terms, int num_topk, int num_ranks) {
  const double miss = std::pow(1.0 - 1.0 / num_ranks, num_topk);  // no term on a given rank
  const double present = terms == RowTerms::kTopkAtSource ? num_topk
                         : terms == RowTerms::kTopkAtExpert
                             ? double(num_topk) / num_ranks / (1.0 - miss)
                             : num_ranks * (1.0 - miss);
  return vec == 8 && present >= 6.0;
}

}  // namespace epx::cuda
