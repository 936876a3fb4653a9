// heron's CPU kernels.
// paged_decode: paged attention for decode rows; reads K/V blocks in place (no gathered copy),
//   online softmax in float32, one work item per (request, kv head) in torch's thread pool.
//   The cache is in the model dtype, or 8-bit codes + a float32 scale per row (int8 or
//   float8_e4m3fn), dequantized in registers.
// argmax_rows: index of the first maximum of each row of [R, V] logits (bf16 or float32),
//   rows or columns contiguous, split over the vocabulary across threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  // 16 partial sums so the compiler can keep one vector accumulator without -ffast-math
  float part[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += part[j];
  return s;
}

// Optional outputs for a part of the keys (cascade attention, heron/runner/attention/cpu_backend.py):
// row b attends to keys [max(window start, starts[b]), seq_len) only; its output goes to out_f32
// (float32, not normalised to bf16) and its log-sum-exp of the scaled scores to lse [B, Hq], so
// that the caller can merge it with the other part of the keys.
struct PartOut {
  const int64_t* starts = nullptr;
  float* out_f32 = nullptr;
  float* lse = nullptr;
};

// The end of one query head's online softmax: acc / l into out (row `row` of [B * Hq, D], in T),
// or with a PartOut into its float32 output, with the log-sum-exp m + log(l) of the scaled
// scores (-inf and zeros when the part had no key).
template <typename T>
inline void finish_row(const PartOut& part, T* out, int64_t row, const float* acc, float m, float l, int64_t D) {
  if (part.lse) part.lse[row] = l > 0.f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
  const float inv = l > 0.f ? 1.f / l : 0.f;
  if (part.out_f32) {
    float* o = part.out_f32 + row * D;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
  } else {
    T* o = out + row * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
  }
}

// Each (request, kv head) item is one task; when there are fewer items than threads (one
// stream decoding), each item's keys are split into up to that many spans of whole blocks, each
// span's online softmax run as a task of its own, and the spans merged by their maxima and sums.
template <typename T>
void decode_kernel(const T* q, const T* kv, const int64_t* block_tables, const int64_t* seq_lens, T* out,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t num_blocks, int64_t bs,
                   int64_t max_blocks, int64_t window, float scale, PartOut part = PartOut()) {
  const int64_t G = Hq / Hkv;
  const int64_t v_offset = num_blocks * bs * Hkv * D;  // kv[1] starts here
  const int64_t items = B * Hkv;
  const int64_t threads = at::get_num_threads();
  // spans per item: 1 unless the items alone leave threads idle (at least 4 blocks a span)
  int64_t spans = 1;
  if (items < threads) {
    int64_t most_blocks = 0;
    for (int64_t b = 0; b < B; ++b) most_blocks = std::max(most_blocks, (seq_lens[b] + bs - 1) / bs);
    spans = std::max<int64_t>(1, std::min((threads + items - 1) / items, most_blocks / 4));
  }
  // per (item, span): acc [G * D], m [G], l [G]; spans == 1 finishes in place
  std::vector<float> span_acc(spans > 1 ? items * spans * G * D : 0), span_m(spans > 1 ? items * spans * G : 0),
      span_l(spans > 1 ? items * spans * G : 0);
  at::parallel_for(0, items * spans, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(bs * D), vf(D), scores(G * bs), m(G), l(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t item = task / spans, span = task % spans;
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t seq_len = seq_lens[b];
      int64_t start = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
      if (part.starts) start = std::max(start, part.starts[b]);
      // this span's blocks: [blk0, blk1) of the item's [start / bs, ceil(seq_len / bs))
      const int64_t first = start / bs, last = (seq_len + bs - 1) / bs;
      const int64_t per = (std::max<int64_t>(last - first, 0) + spans - 1) / spans;
      const int64_t blk0 = first + span * per, blk1 = std::min(last, blk0 + per);
      for (int64_t g = 0; g < G; ++g) {
        load_row(q + (b * Hq + h * G + g) * D, qf.data() + g * D, D);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t* table = block_tables + b * max_blocks;
      for (int64_t blk = blk0; blk < blk1 && blk * bs < seq_len; ++blk) {
        const int64_t t0 = std::max(blk * bs, start), t1 = std::min((blk + 1) * bs, seq_len);
        const int64_t n = t1 - t0;
        if (n <= 0) continue;
        const int64_t base = ((table[blk] * bs + (t0 - blk * bs)) * Hkv + h) * D;
        for (int64_t t = 0; t < n; ++t) load_row(kv + base + t * Hkv * D, kf.data() + t * D, D);
        for (int64_t g = 0; g < G; ++g) {
          float bmax = m[g];
          for (int64_t t = 0; t < n; ++t) {
            float s = dot(qf.data() + g * D, kf.data() + t * D, D);
            scores[g * bs + t] = s;
            bmax = std::max(bmax, s);
          }
          const float corr = std::exp(m[g] - bmax);  // exp(-inf) = 0 on the first block
          l[g] *= corr;
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          m[g] = bmax;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(scores[g * bs + t] - bmax);
            scores[g * bs + t] = p;
            l[g] += p;
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          load_row(kv + v_offset + base + t * Hkv * D, vf.data(), D);
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * bs + t];
            float* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
          }
        }
      }
      if (spans == 1) {
        for (int64_t g = 0; g < G; ++g) finish_row(part, out, b * Hq + h * G + g, acc.data() + g * D, m[g], l[g], D);
      } else {
        std::copy(acc.begin(), acc.end(), span_acc.begin() + task * G * D);
        std::copy(m.begin(), m.end(), span_m.begin() + task * G);
        std::copy(l.begin(), l.end(), span_l.begin() + task * G);
      }
    }
  });
  if (spans == 1) return;
  std::vector<float> acc(D);
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / Hkv, h = item % Hkv;
    for (int64_t g = 0; g < G; ++g) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t sp = 0; sp < spans; ++sp) mx = std::max(mx, span_m[(item * spans + sp) * G + g]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      for (int64_t sp = 0; sp < spans; ++sp) {
        const int64_t t = item * spans + sp;
        if (span_l[t * G + g] <= 0.f) continue;   // an empty span
        const float c = std::exp(span_m[t * G + g] - mx);
        l += span_l[t * G + g] * c;
        const float* a = span_acc.data() + (t * G + g) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += a[d] * c;
      }
      finish_row(part, out, b * Hq + h * G + g, acc.data(), mx, l, D);
    }
  }
}


#if defined(__AVX512F__)
// bf16 fast path: keys/values are read in place (no float copy of the block), each key is
// loaded once for all G query heads of its group, softmax weights are computed 16 at a time.
// With AVX512-BF16 and D % 32 == 0 the q.k products use VDPBF16PS on the raw bf16 query and
// key (bf16 x bf16 products are exact in float32; the scale is applied to the float32 score).
inline __m512 load_bf16x16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// exp on [-87, 88] (clamped; Cephes' expf polynomial on the reduced argument, ~1 ulp); below
// -87 it returns ~1e-38 instead of 0, harmless for softmax weights.
inline __m512 exp_any(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)),
                                                      _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// The next block's keys and values (n rows of D elements of `elem` bytes, row_stride elements
// apart; values v_offset elements after the keys) are prefetched while this block is worked on:
// blocks are scattered over the pool, so the hardware prefetcher restarts at every one. (18
// layers of 64 rows with 32-640 cached tokens each, bf16: 36.6 -> 26.6-28.1 ms a step, 10.6 ->
// 13.8-14.6 GB/s of K/V read.) Prefetching changes no result.
template <typename T>
inline void prefetch_block(const T* k, int64_t v_offset, int64_t n, int64_t row_stride, int64_t D, int64_t elem) {
  const int64_t step = 64 / elem;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < D; d += step) {
      _mm_prefetch(reinterpret_cast<const char*>(k + t * row_stride + d), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(k + v_offset + t * row_stride + d), _MM_HINT_T0);
    }
}

// G (query heads per KV head) is a compile-time constant so that the per-head accumulators
// live in registers; two keys at a time in q.k and two 16-wide chunks of D at a time in p.v
// give the FMA units independent dependency chains.

template <int G, bool kBf16Dot>
void decode_kernel_bf16_avx512(const c10::BFloat16* q, const c10::BFloat16* kv, const int64_t* block_tables,
                               const int64_t* seq_lens, c10::BFloat16* out, int64_t B, int64_t Hq, int64_t Hkv,
                               int64_t D, int64_t num_blocks, int64_t bs, int64_t max_blocks, int64_t window,
                               float scale, PartOut part = PartOut()) {
  const int64_t v_offset = num_blocks * bs * Hkv * D;
  const int64_t row_stride = Hkv * D;  // between consecutive tokens of one block
  const int64_t bs_pad = (bs + 15) / 16 * 16 + 16;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores(G * bs_pad);
    float m[G], l[G];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t seq_len = seq_lens[b];
      int64_t start = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
      if (part.starts) start = std::max(start, part.starts[b]);
      const c10::BFloat16* qbase = q + (b * Hq + h * G) * D;  // G consecutive query rows
      for (int g = 0; g < G; ++g) {
        if (!kBf16Dot)
          for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(qbase[g * D + d]) * scale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t* table = block_tables + b * max_blocks;
      for (int64_t blk = start / bs; blk * bs < seq_len; ++blk) {
        const int64_t t0 = std::max(blk * bs, start), t1 = std::min((blk + 1) * bs, seq_len);
        const int64_t n = t1 - t0;
        if (n <= 0) break;   // a part starting at or after seq_len: no key
        const c10::BFloat16* kbase = kv + ((table[blk] * bs + (t0 - blk * bs)) * Hkv + h) * D;
        const c10::BFloat16* vbase = kbase + v_offset;
        if ((blk + 1) * bs < seq_len) prefetch_block(kv + (table[blk + 1] * bs * Hkv + h) * D, v_offset,
                                                     std::min(bs, seq_len - (blk + 1) * bs), row_stride, D, 2);
        // scores[g][t] = scale * q_g . k_t, two keys per pass (the second one repeats the
        // first when n is odd; its score lands in the padding)
        for (int64_t t = 0; t < n; t += 2) {
          const c10::BFloat16* k0 = kbase + t * row_stride;
          const c10::BFloat16* k1 = t + 1 < n ? k0 + row_stride : k0;
          __m512 s0[G], s1[G];
          for (int g = 0; g < G; ++g) s0[g] = s1[g] = _mm512_setzero_ps();
          if constexpr (kBf16Dot) {
#if defined(__AVX512BF16__)
            for (int64_t d = 0; d < D; d += 32) {
              const __m512bh kx0 = (__m512bh)_mm512_loadu_si512(k0 + d);
              const __m512bh kx1 = (__m512bh)_mm512_loadu_si512(k1 + d);
              for (int g = 0; g < G; ++g) {
                const __m512bh qx = (__m512bh)_mm512_loadu_si512(qbase + g * D + d);
                s0[g] = _mm512_dpbf16_ps(s0[g], qx, kx0);
                s1[g] = _mm512_dpbf16_ps(s1[g], qx, kx1);
              }
            }
            for (int g = 0; g < G; ++g) {
              scores[g * bs_pad + t] = _mm512_reduce_add_ps(s0[g]) * scale;
              scores[g * bs_pad + t + 1] = _mm512_reduce_add_ps(s1[g]) * scale;
            }
#endif
          } else {
            for (int64_t d = 0; d < D; d += 16) {
              const __m512 kx0 = load_bf16x16(k0 + d), kx1 = load_bf16x16(k1 + d);
              for (int g = 0; g < G; ++g) {
                const __m512 qx = _mm512_loadu_ps(&qf[g * D + d]);
                s0[g] = _mm512_fmadd_ps(qx, kx0, s0[g]);
                s1[g] = _mm512_fmadd_ps(qx, kx1, s1[g]);
              }
            }
            for (int g = 0; g < G; ++g) {
              scores[g * bs_pad + t] = _mm512_reduce_add_ps(s0[g]);
              scores[g * bs_pad + t + 1] = _mm512_reduce_add_ps(s1[g]);
            }
          }
        }
        // online softmax update per head, 16 scores at a time
        for (int g = 0; g < G; ++g) {
          float* sc = &scores[g * bs_pad];
          __m512 vmax = _mm512_set1_ps(m[g]);
          for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 mask = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
            vmax = _mm512_mask_max_ps(vmax, mask, vmax, _mm512_maskz_loadu_ps(mask, sc + t));
          }
          const float bmax = _mm512_reduce_max_ps(vmax);
          const float corr = std::exp(m[g] - bmax);  // exp(-inf) = 0 on the first block
          m[g] = bmax;
          __m512 vsum = _mm512_setzero_ps();
          const __m512 vb = _mm512_set1_ps(bmax);
          for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 mask = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
            const __m512 p = exp_any(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc + t), vb));
            _mm512_mask_storeu_ps(sc + t, mask, p);
            vsum = _mm512_mask_add_ps(vsum, mask, vsum, p);
          }
          l[g] = l[g] * corr + _mm512_reduce_add_ps(vsum);
          if (corr != 1.f) {
            const __m512 c = _mm512_set1_ps(corr);
            float* a = &acc[g * D];
            for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), c));
          }
        }
        // acc[g] += p[g][t] * v_t, each v chunk loaded once for all heads
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
          __m512 a0[G], a1[G];
          for (int g = 0; g < G; ++g) {
            a0[g] = _mm512_loadu_ps(&acc[g * D + d]);
            a1[g] = _mm512_loadu_ps(&acc[g * D + d + 16]);
          }
          for (int64_t t = 0; t < n; ++t) {
            const __m512 vx0 = load_bf16x16(vbase + t * row_stride + d);
            const __m512 vx1 = load_bf16x16(vbase + t * row_stride + d + 16);
            for (int g = 0; g < G; ++g) {
              const __m512 p = _mm512_set1_ps(scores[g * bs_pad + t]);
              a0[g] = _mm512_fmadd_ps(p, vx0, a0[g]);
              a1[g] = _mm512_fmadd_ps(p, vx1, a1[g]);
            }
          }
          for (int g = 0; g < G; ++g) {
            _mm512_storeu_ps(&acc[g * D + d], a0[g]);
            _mm512_storeu_ps(&acc[g * D + d + 16], a1[g]);
          }
        }
        for (; d < D; d += 16) {
          __m512 a0[G];
          for (int g = 0; g < G; ++g) a0[g] = _mm512_loadu_ps(&acc[g * D + d]);
          for (int64_t t = 0; t < n; ++t) {
            const __m512 vx0 = load_bf16x16(vbase + t * row_stride + d);
            for (int g = 0; g < G; ++g) a0[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * bs_pad + t]), vx0, a0[g]);
          }
          for (int g = 0; g < G; ++g) _mm512_storeu_ps(&acc[g * D + d], a0[g]);
        }
      }
      for (int g = 0; g < G; ++g) finish_row(part, out, b * Hq + h * G + g, &acc[g * D], m[g], l[g], D);
    }
  });
}

// runs the AVX-512 kernel for a supported group size; false if G has no instantiation
template <bool kBf16Dot>
bool dispatch_bf16_avx512(int64_t G, const c10::BFloat16* q, const c10::BFloat16* kv, const int64_t* tables,
                          const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t N, int64_t bs, int64_t mb, int64_t window, float scale,
                          PartOut part = PartOut()) {
  switch (G) {
    case 1: decode_kernel_bf16_avx512<1, kBf16Dot>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale, part); return true;
    case 2: decode_kernel_bf16_avx512<2, kBf16Dot>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale, part); return true;
    case 4: decode_kernel_bf16_avx512<4, kBf16Dot>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale, part); return true;
    case 8: decode_kernel_bf16_avx512<8, kBf16Dot>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale, part); return true;
    default: return false;
  }
}
#endif


// ---- paged decode over an 8-bit KV cache (--kv-cache-dtype int8 | fp8) ---------------------
// Each (token, kv head) row of the cache is D one-byte codes followed by a float32 scale
// (heron/runner/kv_cache.py); value = code * scale, code an int8 or a float8_e4m3fn. The
// kernels read the codes in place and dequantize in registers: q.k = scale_k * (q . codes_k),
// and p * v = (p * scale_v) * codes_v, so no dequantized copy of a block is ever made.
constexpr int64_t kScaleBytes = 4;

inline float row_scale(const uint8_t* row, int64_t D) {
  float s;
  std::memcpy(&s, row + D, sizeof(float));
  return s;
}

template <bool kFp8>
inline float code_to_float(uint8_t c) {
  if constexpr (kFp8) return static_cast<float>(c10::Float8_e4m3fn(c, c10::Float8_e4m3fn::from_bits()));
  else return static_cast<float>(static_cast<int8_t>(c));
}

template <bool kFp8>
inline void load_row_q8(const uint8_t* __restrict row, float* __restrict dst, int64_t D) {
  const float s = row_scale(row, D);
  for (int64_t i = 0; i < D; ++i) dst[i] = code_to_float<kFp8>(row[i]) * s;
}

// portable version (any q dtype, any D): one block's rows dequantized into a small scratch
// buffer per work item, as decode_kernel does for bf16 rows
template <typename T, bool kFp8>
void decode_kernel_q8(const T* q, const uint8_t* kv, const int64_t* block_tables, const int64_t* seq_lens, T* out,
                      int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t num_blocks, int64_t bs,
                      int64_t max_blocks, int64_t window, float scale) {
  const int64_t G = Hq / Hkv;
  const int64_t W = D + kScaleBytes;                   // bytes per row
  const int64_t v_offset = num_blocks * bs * Hkv * W;  // kv[1] starts here
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(bs * D), vf(D), scores(G * bs), m(G), l(G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t seq_len = seq_lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
      for (int64_t g = 0; g < G; ++g) {
        load_row(q + (b * Hq + h * G + g) * D, qf.data() + g * D, D);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t* table = block_tables + b * max_blocks;
      for (int64_t blk = start / bs; blk * bs < seq_len; ++blk) {
        const int64_t t0 = std::max(blk * bs, start), t1 = std::min((blk + 1) * bs, seq_len);
        const int64_t n = t1 - t0;
        const int64_t base = ((table[blk] * bs + (t0 - blk * bs)) * Hkv + h) * W;
        for (int64_t t = 0; t < n; ++t) load_row_q8<kFp8>(kv + base + t * Hkv * W, kf.data() + t * D, D);
        for (int64_t g = 0; g < G; ++g) {
          float bmax = m[g];
          for (int64_t t = 0; t < n; ++t) {
            float s = dot(qf.data() + g * D, kf.data() + t * D, D);
            scores[g * bs + t] = s;
            bmax = std::max(bmax, s);
          }
          const float corr = std::exp(m[g] - bmax);
          l[g] *= corr;
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          m[g] = bmax;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(scores[g * bs + t] - bmax);
            scores[g * bs + t] = p;
            l[g] += p;
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          load_row_q8<kFp8>(kv + v_offset + base + t * Hkv * W, vf.data(), D);
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * bs + t];
            float* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / l[g];
        T* o = out + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

#if defined(__AVX512F__)
// 16 codes -> 16 floats. int8: the code itself. fp8 (e4m3fn): the code's bits moved into a
// float16 (sign to bit 15, exponent and mantissa to bits 7..13), which is exactly the fp8 value
// times 2^-8 for normal and subnormal codes alike; the 2^8 is folded into the row's scale.
// Sign-extending the byte to 16 bits and shifting left by 7 puts the sign in bit 15 (and a
// copy in bit 14, which the mask clears) and exponent/mantissa in bits 7..13.
template <bool kFp8>
inline __m512 load_q8x16(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (kFp8) {
    const __m256i x = _mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7);
    return _mm512_cvtph_ps(_mm256_and_si256(x, _mm256_set1_epi16(static_cast<short>(0xBF80))));
  } else {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  }
}
template <bool kFp8>
constexpr float kQ8ScaleFactor = kFp8 ? 256.0f : 1.0f;

// The structure of decode_kernel_bf16_avx512 (G compile-time, two keys per q.k pass, online
// softmax 16 scores at a time, two 16-wide chunks of D per p.v pass) with the codes converted
// in registers and the row scales applied to the scores (keys) and to the softmax weights
// (values).
template <typename T, int G, bool kFp8>
void decode_kernel_q8_avx512(const T* q, const uint8_t* kv, const int64_t* block_tables, const int64_t* seq_lens,
                             T* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t num_blocks, int64_t bs,
                             int64_t max_blocks, int64_t window, float scale) {
  const int64_t W = D + kScaleBytes;
  const int64_t v_offset = num_blocks * bs * Hkv * W;
  const int64_t row_stride = Hkv * W;  // between consecutive tokens of one block
  const int64_t bs_pad = (bs + 15) / 16 * 16 + 16;
  const float factor = kQ8ScaleFactor<kFp8>;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores(G * bs_pad), vscale(bs_pad, 0.f);
    float m[G], l[G];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t seq_len = seq_lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
      const T* qbase = q + (b * Hq + h * G) * D;
      for (int g = 0; g < G; ++g) {
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(qbase[g * D + d]) * scale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t* table = block_tables + b * max_blocks;
      for (int64_t blk = start / bs; blk * bs < seq_len; ++blk) {
        const int64_t t0 = std::max(blk * bs, start), t1 = std::min((blk + 1) * bs, seq_len);
        const int64_t n = t1 - t0;
        const uint8_t* kbase = kv + ((table[blk] * bs + (t0 - blk * bs)) * Hkv + h) * W;
        const uint8_t* vbase = kbase + v_offset;
        if ((blk + 1) * bs < seq_len) prefetch_block(kv + (table[blk + 1] * bs * Hkv + h) * W, v_offset,
                                                     std::min(bs, seq_len - (blk + 1) * bs), row_stride, W, 1);
        for (int64_t t = 0; t < n; t += 2) {
          const uint8_t* k0 = kbase + t * row_stride;
          const uint8_t* k1 = t + 1 < n ? k0 + row_stride : k0;
          __m512 s0[G], s1[G];
          for (int g = 0; g < G; ++g) s0[g] = s1[g] = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 kx0 = load_q8x16<kFp8>(k0 + d), kx1 = load_q8x16<kFp8>(k1 + d);
            for (int g = 0; g < G; ++g) {
              const __m512 qx = _mm512_loadu_ps(&qf[g * D + d]);
              s0[g] = _mm512_fmadd_ps(qx, kx0, s0[g]);
              s1[g] = _mm512_fmadd_ps(qx, kx1, s1[g]);
            }
          }
          const float ks0 = row_scale(k0, D) * factor, ks1 = row_scale(k1, D) * factor;
          for (int g = 0; g < G; ++g) {
            scores[g * bs_pad + t] = _mm512_reduce_add_ps(s0[g]) * ks0;
            scores[g * bs_pad + t + 1] = _mm512_reduce_add_ps(s1[g]) * ks1;
          }
        }
        for (int64_t t = 0; t < n; ++t) vscale[t] = row_scale(vbase + t * row_stride, D) * factor;
        // online softmax per head; the stored weights carry the value rows' scales
        for (int g = 0; g < G; ++g) {
          float* sc = &scores[g * bs_pad];
          __m512 vmax = _mm512_set1_ps(m[g]);
          for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 mask = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
            vmax = _mm512_mask_max_ps(vmax, mask, vmax, _mm512_maskz_loadu_ps(mask, sc + t));
          }
          const float bmax = _mm512_reduce_max_ps(vmax);
          const float corr = std::exp(m[g] - bmax);  // exp(-inf) = 0 on the first block
          m[g] = bmax;
          __m512 vsum = _mm512_setzero_ps();
          const __m512 vb = _mm512_set1_ps(bmax);
          for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 mask = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
            const __m512 p = exp_any(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc + t), vb));
            vsum = _mm512_mask_add_ps(vsum, mask, vsum, p);
            _mm512_mask_storeu_ps(sc + t, mask, _mm512_mul_ps(p, _mm512_maskz_loadu_ps(mask, &vscale[t])));
          }
          l[g] = l[g] * corr + _mm512_reduce_add_ps(vsum);
          if (corr != 1.f) {
            const __m512 c = _mm512_set1_ps(corr);
            float* a = &acc[g * D];
            for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), c));
          }
        }
        // acc[g] += (p[g][t] * scale_v[t]) * codes_v[t]
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
          __m512 a0[G], a1[G];
          for (int g = 0; g < G; ++g) {
            a0[g] = _mm512_loadu_ps(&acc[g * D + d]);
            a1[g] = _mm512_loadu_ps(&acc[g * D + d + 16]);
          }
          for (int64_t t = 0; t < n; ++t) {
            const __m512 vx0 = load_q8x16<kFp8>(vbase + t * row_stride + d);
            const __m512 vx1 = load_q8x16<kFp8>(vbase + t * row_stride + d + 16);
            for (int g = 0; g < G; ++g) {
              const __m512 p = _mm512_set1_ps(scores[g * bs_pad + t]);
              a0[g] = _mm512_fmadd_ps(p, vx0, a0[g]);
              a1[g] = _mm512_fmadd_ps(p, vx1, a1[g]);
            }
          }
          for (int g = 0; g < G; ++g) {
            _mm512_storeu_ps(&acc[g * D + d], a0[g]);
            _mm512_storeu_ps(&acc[g * D + d + 16], a1[g]);
          }
        }
        for (; d < D; d += 16) {
          __m512 a0[G];
          for (int g = 0; g < G; ++g) a0[g] = _mm512_loadu_ps(&acc[g * D + d]);
          for (int64_t t = 0; t < n; ++t) {
            const __m512 vx0 = load_q8x16<kFp8>(vbase + t * row_stride + d);
            for (int g = 0; g < G; ++g) a0[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * bs_pad + t]), vx0, a0[g]);
          }
          for (int g = 0; g < G; ++g) _mm512_storeu_ps(&acc[g * D + d], a0[g]);
        }
      }
      for (int g = 0; g < G; ++g) {
        const float inv = 1.f / l[g];
        T* o = out + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

template <typename T, bool kFp8>
bool dispatch_q8_avx512(int64_t G, const T* q, const uint8_t* kv, const int64_t* tables, const int64_t* lens, T* out,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t N, int64_t bs, int64_t mb,
                        int64_t window, float scale) {
  switch (G) {
    case 1: decode_kernel_q8_avx512<T, 1, kFp8>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale); return true;
    case 2: decode_kernel_q8_avx512<T, 2, kFp8>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale); return true;
    case 4: decode_kernel_q8_avx512<T, 4, kFp8>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale); return true;
    case 8: decode_kernel_q8_avx512<T, 8, kFp8>(q, kv, tables, lens, out, B, Hq, Hkv, D, N, bs, mb, window, scale); return true;
    default: return false;
  }
}
#endif

// Quantize rows of D values (each token's H rows contiguous, tokens `src_stride` elements
// apart) into cache slots: the same float32 operations as heron.runner.kv_cache.quantize_kv
// (amax / qmax, x / scale clamped, then round-half-even to int8 or to float8_e4m3fn), so
// both writers store the same bytes.
template <typename T, bool kFp8>
void quantize_into_slots(const T* src, int64_t src_stride, const int64_t* slots, int64_t T_, int64_t H, int64_t D,
                         uint8_t* dst) {
  const int64_t W = D + kScaleBytes;
  const float qmax = kFp8 ? 448.0f : 127.0f;
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const T* x = src + t * src_stride + h * D;
      uint8_t* row = dst + (slots[t] * H + h) * W;
      float amax = 0.f;
      for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(to_float(x[d])));
      const float s = amax / qmax;
      const float safe = s > 0.f ? s : 1.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float y = std::min(std::max(to_float(x[d]) / safe, -qmax), qmax);
        if constexpr (kFp8) row[d] = c10::Float8_e4m3fn(y).x;
        else row[d] = static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(y)));
      }
      std::memcpy(row + D, &s, sizeof(float));
    }
  }
}


// ---- argmax over logits rows -----------------------------------------------------------
constexpr int64_t kArgmaxChunk = 8192;  // vocabulary entries per work item

template <typename T>
void argmax_chunk_scalar(const T* x, int64_t R, int64_t s0, int64_t s1, int64_t c0, int64_t c1, float* best,
                         int64_t* idx) {
  for (int64_t r = 0; r < R; ++r) {
    float bv = -std::numeric_limits<float>::infinity();
    int64_t bi = c0;
    for (int64_t n = c0; n < c1; ++n) {
      const float v = to_float(x[r * s0 + n * s1]);
      if (v > bv) { bv = v; bi = n; }
    }
    best[r] = bv;
    idx[r] = bi;
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// rows contiguous: each row's chunk scanned 16 entries at a time; every lane keeps the
// first position of its own maximum, so the row's first maximum is the smallest position
// among the lanes holding the largest value
template <typename T>
void argmax_chunk_rows(const T* x, int64_t R, int64_t s0, int64_t c0, int64_t c1, float* best, int64_t* idx) {
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t r = 0; r < R; ++r) {
    const T* row = x + r * s0;
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512i vpos = _mm512_set1_epi32(static_cast<int>(c0));
    __m512i cur = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c0)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (int64_t n = c0; n < c1; n += 16) {
      const __mmask16 m = c1 - n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (c1 - n)) - 1);
      const __m512 v = load16(row + n, m);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_blend_ps(gt, vmax, v);
      vpos = _mm512_mask_blend_epi32(gt, vpos, cur);
      cur = _mm512_add_epi32(cur, step);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    const __mmask16 at = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(mx), _CMP_EQ_OQ);
    const int pos = _mm512_mask_reduce_min_epi32(at, vpos);
    best[r] = mx;
    idx[r] = at ? pos : c0;
  }
}

// columns contiguous ([V, R] storage, e.g. W @ h^T): 16 rows per vector, one position at a time
template <typename T>
void argmax_chunk_cols(const T* x, int64_t R, int64_t s1, int64_t c0, int64_t c1, float* best, int64_t* idx) {
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const __mmask16 m = R - r0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (R - r0)) - 1);
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512i vpos = _mm512_set1_epi32(static_cast<int>(c0));
    for (int64_t n = c0; n < c1; ++n) {
      const __m512 v = load16(x + n * s1 + r0, m);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_blend_ps(gt, vmax, v);
      vpos = _mm512_mask_blend_epi32(gt, vpos, _mm512_set1_epi32(static_cast<int>(n)));
    }
    float bv[16];
    int32_t bp[16];
    _mm512_storeu_ps(bv, vmax);
    _mm512_storeu_si512(bp, vpos);
    for (int64_t r = r0; r < std::min(R, r0 + 16); ++r) {
      best[r] = bv[r - r0];
      idx[r] = bp[r - r0];
    }
  }
}
#endif

template <typename T>
void argmax_rows_impl(const T* x, int64_t R, int64_t V, int64_t s0, int64_t s1, int64_t* out) {
  const int64_t chunks = (V + kArgmaxChunk - 1) / kArgmaxChunk;
  std::vector<float> best(chunks * R);
  std::vector<int64_t> idx(chunks * R);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * kArgmaxChunk, c1 = std::min(V, c0 + kArgmaxChunk);
      float* b = best.data() + c * R;
      int64_t* i = idx.data() + c * R;
#if defined(__AVX512F__)
      if (s1 == 1) { argmax_chunk_rows(x, R, s0, c0, c1, b, i); continue; }
      if (s0 == 1) { argmax_chunk_cols(x, R, s1, c0, c1, b, i); continue; }
#endif
      argmax_chunk_scalar(x, R, s0, s1, c0, c1, b, i);
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    float bv = best[r];
    int64_t bi = idx[r];
    for (int64_t c = 1; c < chunks; ++c)
      if (best[c * R + r] > bv) { bv = best[c * R + r]; bi = idx[c * R + r]; }  // ties keep the earlier chunk
    out[r] = bi;
  }
}


// ---- fused elementwise ops for bf16 activations --------------------------------------------
// Each reproduces the rounding steps of the torch expression it replaces (float32 math,
// bf16 results where torch rounds), in one pass and one op instead of 5-10.
inline float bf2f(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2bf(float f) {  // round to nearest even, as c10::BFloat16 (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float round_bf(float f) { return bf2f(f2bf(f)); }

#if defined(__AVX512F__)
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
inline __m512 ldbf(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512i rne_bits(__m512 v) {  // float bits rounded to the nearest even bf16, NaN kept NaN
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
}
inline void stbf(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rne_bits(v), 16)));
}
inline __m512 rbf(__m512 v) {  // round to bf16 and back
  return _mm512_castsi512_ps(_mm512_and_si512(rne_bits(v), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
// tanh as Cephes' tanhf: an odd polynomial below |y| = 0.625 (no cancellation near 0), else
// sign(y) (1 - 2 / (exp(2|y|) + 1))
inline __m512 tanh512(__m512 y) {
  const __m512 ay = _mm512_abs_ps(y);
  const __m512 s = _mm512_mul_ps(y, y);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, s), y, y);
  const __m512 e = exp_any(_mm512_add_ps(ay, ay));
  __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  big = _mm512_or_ps(big, _mm512_and_ps(y, _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)))));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ay, _mm512_set1_ps(0.625f), _CMP_LT_OQ), big, small);
}
#endif

inline int64_t rows_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// out = norm(x) or residual + norm(x); gemma: norm = bf16((h*r) * (1 + w)), else bf16(w * bf16(h*r))
void rms_norm_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* res, uint16_t* out, int64_t R, int64_t D,
                   float eps, bool gemma) {
  std::vector<float> wf(D);
  for (int64_t d = 0; d < D; ++d) wf[d] = gemma ? 1.0f + bf2f(w[d]) : bf2f(w[d]);
  at::parallel_for(0, R, rows_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* xr = x + r * D;
      uint16_t* o = out + r * D;
      const uint16_t* rr = res ? res + r * D : nullptr;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 v = ldbf(xr + d, tail_mask(D - d));
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(D) + eps);
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = tail_mask(D - d);
        const __m512 h = _mm512_mul_ps(ldbf(xr + d, m), vinv);
        const __m512 wv = _mm512_maskz_loadu_ps(m, wf.data() + d);
        __m512 y = rbf(gemma ? _mm512_mul_ps(h, wv) : _mm512_mul_ps(wv, rbf(h)));
        if (rr) y = _mm512_add_ps(ldbf(rr + d, m), y);
        stbf(o + d, y, m);
      }
#else
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) { const float v = bf2f(xr[d]); ss += v * v; }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (int64_t d = 0; d < D; ++d) {
        const float h = bf2f(xr[d]) * inv;
        float y = round_bf(gemma ? h * wf[d] : wf[d] * round_bf(h));
        if (rr) y = bf2f(rr[d]) + y;
        o[d] = f2bf(y);
      }
#endif
    }
  });
}

// out[r] = act(x[r, :F]) * x[r, F:], act rounded to bf16 first as torch does in bf16
void act_and_mul_bf16(const uint16_t* x, uint16_t* out, int64_t R, int64_t F, bool gelu_tanh) {
  at::parallel_for(0, R, rows_grain(2 * F), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* g = x + r * 2 * F;
      const uint16_t* u = g + F;
      uint16_t* o = out + r * F;
#if defined(__AVX512F__)
      for (int64_t i = 0; i < F; i += 16) {
        const __mmask16 m = tail_mask(F - i);
        const __m512 gv = ldbf(g + i, m);
        __m512 a;
        if (gelu_tanh) {
          // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
          const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(gv, gv), gv);
          const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                             _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, gv));
          const __m512 th = tanh512(inner);
          a = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), gv), _mm512_add_ps(_mm512_set1_ps(1.0f), th));
        } else {
          a = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_any(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        }
        stbf(o + i, _mm512_mul_ps(rbf(a), ldbf(u + i, m)), m);
      }
#else
      for (int64_t i = 0; i < F; ++i) {
        const float gv = bf2f(g[i]);
        const float a = gelu_tanh ? 0.5f * gv * (1.0f + std::tanh(0.7978845608028654f * (gv + 0.044715f * gv * gv * gv)))
                                  : gv / (1.0f + std::exp(-gv));
        o[i] = f2bf(round_bf(a) * bf2f(u[i]));
      }
#endif
    }
  });
}

// The rows of a rope's x [T, H, D] (rows of D contiguous, tokens and heads strided), each
// rotated into its row of a contiguous out by row(v, o, cos row, sin row).
template <typename E, typename RowFn>
inline void rope_rows(const E* src, E* out, const E* cos, const E* sin, int64_t T, int64_t H, int64_t D,
                      int64_t token_stride, int64_t head_stride, RowFn row) {
  at::parallel_for(0, T, rows_grain(H * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < H; ++h)
        row(src + t * token_stride + h * head_stride, out + (t * H + h) * D, cos + t * D, sin + t * D);
  });
}

// NEOX layout: x*cos + rotate_half(x)*sin with both products and the sum rounded to bf16
void rope_bf16(const uint16_t* src, uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t T, int64_t H,
               int64_t D, int64_t token_stride, int64_t head_stride) {
  const int64_t half = D / 2;
  rope_rows(src, x, cos, sin, T, H, D, token_stride, head_stride,
            [&](const uint16_t* v, uint16_t* o, const uint16_t* c, const uint16_t* s) {
              for (int64_t d = 0; d < D; ++d) {
                const float rot = d < half ? -bf2f(v[d + half]) : bf2f(v[d - half]);
                o[d] = f2bf(round_bf(bf2f(v[d]) * bf2f(c[d])) + round_bf(rot * bf2f(s[d])));
              }
            });
}


// ---- rms_norm and rope on float32 activations (quantized models only: see heron/ops/cpu.py) ----
// Not bit-identical to torch's float32 expressions (the sum of squares is added in another
// order), which is why float32 models without quantization keep torch's.

// 1 / rms(x) of one row of D floats (the same sum for every caller: the fused ops' results agree)
inline float inv_rms_f32(const float* xr, int64_t D, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
  return 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
}

// out = norm(x) * wf (+ residual); wf = 1 + w (gemma) or w
void rms_norm_f32(const float* x, const float* w, const float* res, float* out, int64_t R, int64_t D, float eps,
                  bool gemma) {
  std::vector<float> wf(D);
  for (int64_t d = 0; d < D; ++d) wf[d] = gemma ? 1.0f + w[d] : w[d];
  const float* wp = wf.data();
  at::parallel_for(0, R, rows_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * D;
      float* o = out + r * D;
      const float inv = inv_rms_f32(xr, D, eps);
      if (res) {
        const float* rr = res + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = rr[d] + (xr[d] * inv) * wp[d];
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = (xr[d] * inv) * wp[d];
      }
    }
  });
}

// one row in the NEOX layout: o = v*cos + rotate_half(v)*sin
inline void rope_row_f32(const float* v, float* o, const float* c, const float* s, int64_t D) {
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) o[d] = v[d] * c[d] - v[d + half] * s[d];
#pragma omp simd
  for (int64_t d = half; d < D; ++d) o[d] = v[d] * c[d] + v[d - half] * s[d];
}

void rope_f32(const float* src, float* out, const float* cos, const float* sin, int64_t T, int64_t H, int64_t D,
              int64_t token_stride, int64_t head_stride) {
  rope_rows(src, out, cos, sin, T, H, D, token_stride, head_stride,
            [&](const float* v, float* o, const float* c, const float* s) { rope_row_f32(v, o, c, s, D); });
}

// Gemma's attention input in one call: qkv [T, (Hq + 2 Hkv) D] (row stride qkv_stride) -> q [T, Hq, D] and
// k [T, Hkv, D], each head row normalised ((1 + w) weights, like rms_norm_f32 with gemma) and then
// rotated (rope_row_f32): the very values of rms_norm then rope, without the tensors between.
void qk_norm_rope_f32(const float* qkv, int64_t qkv_stride, const float* qw, const float* kw, const float* cos,
                      const float* sin, float* q, float* k, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, float eps) {
  std::vector<float> wf(2 * D);
  for (int64_t d = 0; d < D; ++d) {
    wf[d] = 1.0f + qw[d];
    wf[D + d] = 1.0f + kw[d];
  }
  const float* wq = wf.data();
  const float* wk = wq + D;
  const int64_t H = Hq + Hkv;
  at::parallel_for(0, T * H, std::max<int64_t>(1, rows_grain(D) / 4), [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(D);
    float* h = tmp.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / H, head = i % H;
      const float* xr = qkv + t * qkv_stride + head * D;
      const float* wp = head < Hq ? wq : wk;
      const float inv = inv_rms_f32(xr, D, eps);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) h[d] = (xr[d] * inv) * wp[d];
      float* o = head < Hq ? q + (t * Hq + head) * D : k + (t * Hkv + head - Hq) * D;
      rope_row_f32(h, o, cos + t * D, sin + t * D, D);
    }
  });
}

// exp and tanh on 8 floats (AVX2), as exp_any / tanh512 do on 16 (the same Cephes polynomials)
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // times 2^n, n in [-126, 127]: n added to the exponent of 1.0
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 tanh256(__m256 y) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 ay = _mm256_andnot_ps(sign, y);
  const __m256 s = _mm256_mul_ps(y, y);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, s), y, y);
  const __m256 e = exp256(_mm256_add_ps(ay, ay));
  __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  big = _mm256_or_ps(big, _mm256_and_ps(y, sign));
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ay, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}
#endif

// out[r] = act(x[r, :F]) * x[r, F:] in float32 (gelu_tanh, else silu)
inline float act_f32(float g, bool gelu_tanh) {
  return gelu_tanh ? 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                   : g / (1.0f + std::exp(-g));
}

void act_and_mul_f32(const float* x, float* out, int64_t R, int64_t F, bool gelu_tanh) {
  at::parallel_for(0, R, rows_grain(2 * F), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = x + r * 2 * F;
      const float* u = g + F;
      float* o = out + r * F;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      for (; i + 8 <= F; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        __m256 a;
        if (gelu_tanh) {
          // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
          const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(gv, gv), gv);
          const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                             _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, gv));
          a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), gv), _mm256_add_ps(_mm256_set1_ps(1.0f), tanh256(inner)));
        } else {
          a = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        }
        _mm256_storeu_ps(o + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < F; ++i) o[i] = act_f32(g[i], gelu_tanh) * u[i];
    }
  });
}

// ---- small-batch bf16 GEMV: out[m, n] = x[m] . w[n] (+ bias[n]) for a few rows m ---------------
// Memory-bound at a few rows: the weight is streamed once, split over threads by output rows,
// one weight row at a time with its chunks loaded once for all rows (x stays in L1);
// VDPBF16PS multiplies bf16 pairs exactly into float32 accumulators. Each output is
// accumulated in the same order whatever M is, so a row's result does not depend on how many
// rows share the call. (Two weight rows per iteration measured ~2x slower on the 262k-row
// LM head.)
#if defined(__AVX512BF16__)
template <int M>
void gemv_bf16_impl(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t N,
                    int64_t K) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* w0 = w + n * K;
      // (fully unrolled over m so the accumulators stay in registers: without the pragma GCC
      // keeps them on the stack from 8 rows on, ~3x slower)
      __m512 a0[M];
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) a0[m] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        const __m512bh wv0 = (__m512bh)_mm512_loadu_si512(w0 + k);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv0);
      }
      const float b0 = bias ? bf2f(bias[n]) : 0.f;
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) out[m * N + n] = f2bf(_mm512_reduce_add_ps(a0[m]) + b0);
    }
  });
}
#endif

// ---- weight-only int8 / int4 GEMV for a few rows (heron.quant.weight_only) ---------------------
// Memory-bound like the bf16 GEMV, so the codes are widened to bf16 in registers and multiplied
// with VDPBF16PS: bf16 x times an integer code is exact in float32, so only the summation order
// differs from torch's packed kernels. Each output's accumulation order does not depend on M.
#if defined(__AVX512BF16__)
// int8 per output channel: w [N, K] int8 row-major (K a multiple of 32), scales [N] bf16;
// out[m, n] = bf16(scale[n] * sum_k x[m, k] * w[n, k]). One weight row at a time, as gemv_bf16_impl.
// The weight rows kGemvPrefetchRows ahead are prefetched by hand: widening the codes costs
// enough per cache line that the hardware prefetcher alone fell behind (LM head, 262k x 640,
// 1 row: 19.4 -> 11.1 ms on a VM where the bf16 GEMV, which gains nothing from it, takes 15.5 ms).
// Prefetching changes no result.
constexpr int64_t kGemvPrefetchRows = 16;

template <int M>
void gemv_q8_impl(const uint16_t* x, const int8_t* w, const uint16_t* scales, uint16_t* out, int64_t N,
                  int64_t K) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* w0 = w + n * K;
      if (n + kGemvPrefetchRows < end)
        for (int64_t o = 0; o < K; o += 64) _mm_prefetch(reinterpret_cast<const char*>(w0 + kGemvPrefetchRows * K + o), _MM_HINT_T0);
      __m512 a0[M];
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) a0[m] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w0 + k))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w0 + k + 16))));
        const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);   // elements 0..15 from lo: x's order
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
      }
      const float s = bf2f(scales[n]);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) out[m * N + n] = f2bf(_mm512_reduce_add_ps(a0[m]) * s);
    }
  });
}

#if defined(__AVX512VBMI__)
// int4 in torch's AVX-512 packed layout (_convert_weight_to_int4pack_for_cpu, see
// heron/quant/weight_only.py): rows in blocks of 64, a block stored as [K, 32] bytes, byte j of
// row k holding the code of output row j (low nibble) and row j + 32 (high nibble);
// sz [N/64, G, 64] (scale, zero) bf16 pairs per block, group g of `gs` inputs and row:
// w = (q - 8) * scale + zero. (Torch's own [G, N] order puts a block's scales in G streams a
// row of scales apart, which measured ~1.6x slower on the LM head.)
// Output rows go 16 to a float32 vector, one per lane, two inputs k, k+1 per step: one 64-byte
// load holds both rows of codes; VPERMB moves (code_k, code_k+1) of each output row into a lane
// as bytes 0 and 2, and OR-ing 0x43 into bytes 1 and 3 makes the words bf16 128 + code, so
//   sum_k x_k w_k = scale * sum_k x_k (128 + q_k) + (zero - 136 scale) * sum_k x_k   per group.
// S slabs of 16 rows share each load (S = 4: the whole block; fewer for many rows M, so that the
// 2 * M * S accumulators stay in registers). xsum [M, G]: the per-group sums of x in float32.
constexpr int64_t kQ4PrefetchBytes = 4096;

template <int M, int S>
void gemv_q4_impl(const uint16_t* x, const uint8_t* w, const uint32_t* sz, const float* xsum, uint16_t* out,
                  int64_t N, int64_t K, int64_t gs) {
  static_assert(S == 1 || S == 2 || S == 4, "S: 1, 2 or 4 slabs per pass");
  const int64_t G = K / gs;
  // slab part (rows 16*part .. 16*part + 15 of a block): lo nibbles (part < 2) or hi, bytes
  // (16 * (part % 2) + r) and (32 + 16 * (part % 2) + r) of the load into lane r
  alignas(64) uint8_t idx_b[2][64];
  for (int sl = 0; sl < 2; ++sl)
    for (int r = 0; r < 16; ++r) {
      idx_b[sl][4 * r] = static_cast<uint8_t>(16 * sl + r);
      idx_b[sl][4 * r + 1] = 0;
      idx_b[sl][4 * r + 2] = static_cast<uint8_t>(32 + 16 * sl + r);
      idx_b[sl][4 * r + 3] = 0;
    }
  const __m512i idx_tab[2] = {_mm512_load_si512(idx_b[0]), _mm512_load_si512(idx_b[1])};
  const __mmask64 keep = 0x5555555555555555ull;                 // the code bytes (even)
  const __m512i magic = _mm512_set1_epi16(0x4300), nib = _mm512_set1_epi8(0x0F);
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 bias = _mm512_set1_ps(136.f);
  constexpr int passes = 4 / S;
  at::parallel_for(0, N / 64 * passes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / passes, pass = item % passes;
      int part[S];
      for (int j = 0; j < S; ++j) part[j] = S == 4 ? j : S == 2 ? static_cast<int>(pass) + 2 * j : static_cast<int>(pass);
      const uint8_t* wb = w + b * K * 32;
      __m512 tot[M][S];
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < S; ++j) tot[m][j] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc[M][S];
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
          for (int j = 0; j < S; ++j) acc[m][j] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 2) {
          // blocks lie one after another, so a fixed distance ahead runs into the next block
          // (hand prefetch, as in gemv_q8_impl: LM head, 1 row, 8.4 -> 2.9 ms on the same VM)
          if (b + 1 < N / 64) _mm_prefetch(reinterpret_cast<const char*>(wb + k * 32 + kQ4PrefetchBytes), _MM_HINT_T0);
          const __m512i ab = _mm512_loadu_si512(wb + k * 32);
          const __m512i lo = _mm512_and_si512(ab, nib), hi = _mm512_and_si512(_mm512_srli_epi16(ab, 4), nib);
          __m512bh wv[S];
#pragma GCC unroll 4
          for (int j = 0; j < S; ++j)
            wv[j] = (__m512bh)_mm512_or_si512(
                _mm512_maskz_permutexvar_epi8(keep, idx_tab[part[j] & 1], part[j] >= 2 ? hi : lo), magic);
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + m * K + k));
#pragma GCC unroll 4
            for (int j = 0; j < S; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
          }
        }
#pragma GCC unroll 4
        for (int j = 0; j < S; ++j) {
          const __m512i p = _mm512_loadu_si512(sz + (b * G + g) * 64 + part[j] * 16);
          const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
          const __m512 c = _mm512_fnmadd_ps(s, bias, _mm512_castsi512_ps(_mm512_and_si512(p, hi_mask)));
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m)
            tot[m][j] = _mm512_fmadd_ps(c, _mm512_set1_ps(xsum[m * G + g]), _mm512_fmadd_ps(acc[m][j], s, tot[m][j]));
        }
      }
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < S; ++j) {
          alignas(64) float v[16];
          _mm512_store_ps(v, tot[m][j]);
          uint16_t* o = out + m * N + b * 64 + part[j] * 16;
          for (int r = 0; r < 16; ++r) o[r] = f2bf(v[r]);
        }
    }
  });
}
#endif
#endif

// ---- the same int8 / int4 GEMVs on AVX2 + FMA CPUs (no AVX-512) ------------------------------
// No bf16 dot product here: the codes are widened to float32 in registers and x (bf16, widened
// once) is multiplied in with float32 FMAs; the scales are applied per row (int8) or per group
// (int4, group-wise int8). Each output is summed in the same order whatever M is (gemv_q8g: up to
// kQ8gGemmRows - 1 rows; from there on its GEMM-style variant), and rounded once to bf16
// (gemv_q8g: to x's dtype).
#if defined(__AVX2__)
// the sum of a vector's 8 floats (the AVX2 GEMVs below, int4_mse_grid)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !(defined(__AVX512BF16__) && defined(__AVX512VBMI__))
// a result rounded to bf16, stored as bf16 bits or as the float32 of that value (float32 callers)
inline void store_bf(uint16_t* o, float v) { *o = f2bf(v); }
inline void store_bf(float* o, float v) { *o = round_bf(v); }

constexpr int64_t kQ8PrefetchRows = 16;

// acc[m][r] += x[m, k0:k1] * w[r, k0:k1] in lanes of 8 (k1 - k0 a multiple of 8), for R weight
// rows starting at w0 (row stride K); the rows kQ8PrefetchRows ahead are prefetched when `ahead`.
template <int M, int R>
inline void q8_dot_avx2(const float* xf, const int8_t* w0, int64_t K, int64_t k0, int64_t k1, bool ahead,
                        __m256 (&acc)[M][R]) {
  for (int64_t k = k0; k < k1; k += 8) {
    if (ahead && (k & 63) == 0)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w0 + (kQ8PrefetchRows + r) * K + k), _MM_HINT_T0);
    __m256 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w0 + r * K + k))));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(xf + m * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
}

// int8 per output channel, w [N, K] int8 row-major (K a multiple of 8), scales [N] bf16:
// R weight rows at a time (independent accumulators keep the FMA units busy), M rows of x.
template <int M, int R, typename O>
inline void q8_rows_avx2(const float* xf, const int8_t* w, const uint16_t* scales, O* out, int64_t n,
                         int64_t N, int64_t K, int64_t end) {
  __m256 acc[M][R];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  q8_dot_avx2<M, R>(xf, w + n * K, K, 0, K, n + R + kQ8PrefetchRows <= end, acc);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float s = bf2f(scales[n + r]);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) store_bf(out + m * N + n + r, hsum8(acc[m][r]) * s);
  }
}

template <int M, typename O>
void gemv_q8_avx2(const float* xf, const int8_t* w, const uint16_t* scales, O* out, int64_t N, int64_t K) {
  constexpr int R = M <= 2 ? 4 : M <= 4 ? 2 : 1;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + R <= end; n += R) q8_rows_avx2<M, R, O>(xf, w, scales, out, n, N, K, end);
    for (; n < end; ++n) q8_rows_avx2<M, 1, O>(xf, w, scales, out, n, N, K, end);
  });
}

// int4 in torch's AVX2 packed layout: rows in blocks of 32, a block stored as [K, 16] bytes,
// byte j of input k holding output row j (low nibble) and row j + 16 (high nibble);
// sz [N/32, G, 32] (scale, zero) bf16 pairs per block, group and row. A block's 16 bytes per
// input go in two halves of 8 (bytes 0-7 / 8-15 = rows 0-7 and 16-23 / rows 8-15 and 24-31),
// each spread one byte per float32 lane: the 16 bytes of an input are broadcast to both halves
// of a vector and VPSHUFB puts byte r of a half in lane r (one in-lane shuffle a half;
// VPMOVSXBD from a register measured ~1.5x slower on Zen 3). A byte b = 16 h + l is used whole:
// two FMA chains per half sum x_k * b and x_k * l (the low nibble, b & 15), and the high
// nibbles' sum is (sum x b - sum x l) / 16 -- one conversion of the byte and one of its low
// nibble instead of a shift, two masks and two conversions. The products of a bf16 x and an
// integer below 256 are exact in float32. Per group, with q the code 0..15 and
// w = (q - 8) * scale + zero:
//   sum_k x_k w_k = scale * sum_k x_k q_k + (zero - 8 scale) * sum_k x_k.
// One pass over a block's codes handles the halves H0, H0 + STEP (2 / STEP of them), so that
// the accumulators fit in the 16 vector registers. xsum [M, G]: per-group sums of x.
constexpr int64_t kQ4PrefetchBytesAvx2 = 2048;

// 8 rows' (scale, zero) bf16 pairs of one group (as uint32: scale low, zero high) -> the scales
// and c = zero - 8 scale (one rounding), so that w = code * scale + c
inline void q4_scale_zero8(const uint32_t* pairs, __m256& sc, __m256& c) {
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
  sc = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
  c = _mm256_fnmadd_ps(sc, _mm256_set1_ps(8.f),
                       _mm256_castsi256_ps(_mm256_and_si256(p, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))));
}

template <int M, int H0, int STEP, typename O>
inline void q4_block_avx2(const float* xf, const float* xsum, const uint8_t* wb, const uint32_t* szb, O* out,
                          int64_t N, int64_t K, int64_t G, int64_t gs, int64_t row0, bool ahead) {
  constexpr int S = 2 / STEP;
  const __m256i nib = _mm256_set1_epi32(0x0F);
  const __m256i idx0 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                        4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
  const __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(8));   // bytes 8-15 (-1 stays negative)
  __m256 tot[M][S][2];   // [.][.][0]: rows of the low nibbles, [.][.][1]: of the high ones
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
    for (int j = 0; j < S; ++j) tot[m][j][0] = tot[m][j][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 accb[M][S], accl[M][S];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
      for (int j = 0; j < S; ++j) accb[m][j] = accl[m][j] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      if (ahead && (k & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wb + k * 16 + kQ4PrefetchBytesAvx2), _MM_HINT_T0);
      const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k * 16)));
      __m256 bv[S], lv[S];
#pragma GCC unroll 2
      for (int j = 0; j < S; ++j) {
        const __m256i src = _mm256_shuffle_epi8(bytes, (H0 + j * STEP) ? idx1 : idx0);
        bv[j] = _mm256_cvtepi32_ps(src);
        lv[j] = _mm256_cvtepi32_ps(_mm256_and_si256(src, nib));
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_broadcast_ss(xf + m * K + k);
#pragma GCC unroll 2
        for (int j = 0; j < S; ++j) {
          accb[m][j] = _mm256_fmadd_ps(xv, bv[j], accb[m][j]);
          accl[m][j] = _mm256_fmadd_ps(xv, lv[j], accl[m][j]);
        }
      }
    }
#pragma GCC unroll 2
    for (int j = 0; j < S; ++j)
#pragma GCC unroll 2
      for (int hi = 0; hi < 2; ++hi) {
        const int part = (H0 + j * STEP) + 2 * hi;   // rows 8 part .. 8 part + 7 of the block
        __m256 sc, c;
        q4_scale_zero8(szb + g * 32 + part * 8, sc, c);
        const __m256 scq = hi ? _mm256_mul_ps(sc, _mm256_set1_ps(1.f / 16)) : sc;   // exact: a power of two
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m256 sq = hi ? _mm256_sub_ps(accb[m][j], accl[m][j]) : accl[m][j];   // 16 * sum x h, or sum x l
          tot[m][j][hi] = _mm256_fmadd_ps(sq, scq, _mm256_fmadd_ps(c, _mm256_set1_ps(xsum[m * G + g]), tot[m][j][hi]));
        }
      }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
    for (int j = 0; j < S; ++j)
#pragma GCC unroll 2
      for (int hi = 0; hi < 2; ++hi) {
        alignas(32) float v[8];
        _mm256_store_ps(v, tot[m][j][hi]);
        O* o = out + m * N + row0 + ((H0 + j * STEP) + 2 * hi) * 8;
        for (int r = 0; r < 8; ++r) store_bf(o + r, v[r]);
      }
}

template <int M, typename O>
void gemv_q4_avx2(const float* xf, const float* xsum, const uint8_t* w, const uint32_t* sz, O* out,
                  int64_t N, int64_t K, int64_t gs) {
  static_assert(M >= 1 && M <= 4, "gemv_q4_avx2: 1-4 rows of x (the wrapper splits larger calls)");
  constexpr int STEP = M <= 2 ? 1 : 2;   // halves per pass: 2 or 1 (keeps the accumulators in registers)
  const int64_t G = K / gs, blocks = N / 32;
  at::parallel_for(0, blocks * STEP, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / STEP;
      const uint8_t* wb = w + b * K * 16;
      const uint32_t* szb = sz + b * G * 32;
      const bool ahead = b + 1 < blocks;
      if constexpr (STEP == 1) {
        q4_block_avx2<M, 0, 1, O>(xf, xsum, wb, szb, out, N, K, G, gs, b * 32, ahead);
      } else {
        if (item % STEP == 0) q4_block_avx2<M, 0, 2, O>(xf, xsum, wb, szb, out, N, K, G, gs, b * 32, ahead);
        else q4_block_avx2<M, 1, 2, O>(xf, xsum, wb, szb, out, N, K, G, gs, b * 32, ahead);
      }
    }
  });
}

// group-wise int8 (gemv_q8g): q [N, K] int8, scales [N, K/gs] float32 (gs a multiple of 8), x
// widened to float32: per group, eight lanes of products summed in float32 FMAs, then times the
// group's scale into the row's total; R weight rows and M (<= 4) rows of x at a time.
template <int M, int R>
inline void q8g_rows_avx2(const float* xf, const int8_t* q, const float* sc, float* out, int64_t n, int64_t N,
                          int64_t K, int64_t gs, int64_t end) {
  const int64_t G = K / gs;
  __m256 tot[M][R];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) tot[m][r] = _mm256_setzero_ps();
  const int8_t* q0 = q + n * K;
  const bool ahead = n + R + kQ8PrefetchRows <= end;
  for (int64_t g = 0; g < G; ++g) {
    __m256 part[M][R];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) part[m][r] = _mm256_setzero_ps();
    q8_dot_avx2<M, R>(xf, q0, K, g * gs, (g + 1) * gs, ahead, part);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(sc[(n + r) * G + g]);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) tot[m][r] = _mm256_fmadd_ps(part[m][r], s, tot[m][r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) out[m * N + n + r] = hsum8(tot[m][r]);
}

template <int M>
void gemv_q8g_avx2(const float* xf, const int8_t* q, const float* sc, float* out, int64_t N, int64_t K, int64_t gs) {
  constexpr int R = M <= 1 ? 4 : M <= 2 ? 2 : 1;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + R <= end; n += R) q8g_rows_avx2<M, R>(xf, q, sc, out, n, N, K, gs, end);
    for (; n < end; ++n) q8g_rows_avx2<M, 1>(xf, q, sc, out, n, N, K, gs, end);
  });
}

// gemv_q8g for many rows of x (at least kQ8gGemmRows), GEMM-style: the float32 FMAs, not memory,
// bound such calls (the LM head at 64 rows took 16 passes of 4 rows, each widening every code
// again, with 4 accumulators to feed per code). Each thread dequantizes kQ8gTileN weight rows at a time into
// float32 (w = q * scale, one rounding; in cache), and x is transposed once so that 8 of its rows
// lie in one vector per input column: a block of NR weight rows times 16 rows of x is NR x 2
// accumulators fed by one broadcast weight and two x loads per column. out[m, n] = the float32 sum
// over k, in order, of x[m, k] * w[n, k], so a row's result does not depend on the other rows of
// the call (as long as the call takes this path).
constexpr int64_t kQ8gGemmRows = 8;
constexpr int64_t kQ8gTileN = 48;

template <int NR, int MV>
inline void q8g_gemm_block(const float* xt, int64_t ldx, const float* wf, int64_t K, float* out, int64_t N,
                           int64_t m0, int64_t rows) {
  __m256 acc[NR][MV];
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 xv[MV];
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xt + k * ldx + m0 + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_broadcast_ss(wf + r * K + k);
#pragma GCC unroll 2
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(w, xv[v], acc[r][v]);
    }
  }
  alignas(32) float lanes[8];
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) {
      _mm256_store_ps(lanes, acc[r][v]);
      const int64_t mb = m0 + 8 * v;
      for (int j = 0; j < 8 && mb + j < rows; ++j) out[(mb + j) * N + r] = lanes[j];
    }
}

template <int NR>
inline void q8g_gemm_rows(const float* xt, int64_t ldx, const float* wf, int64_t K, float* out, int64_t N,
                          int64_t rows) {
  int64_t m0 = 0;
  for (; m0 + 16 <= ldx; m0 += 16) q8g_gemm_block<NR, 2>(xt, ldx, wf, K, out, N, m0, rows);
  if (m0 < ldx) q8g_gemm_block<NR, 1>(xt, ldx, wf, K, out, N, m0, rows);
}

void gemm_q8g_avx2(const float* xp, const int8_t* q, const float* sc, float* op, int64_t rows, int64_t N,
                   int64_t K, int64_t gs) {
  const int64_t ldx = (rows + 7) / 8 * 8, G = K / gs;
  std::vector<float> xt(K * ldx, 0.f);   // x transposed, rows padded with zeros to a multiple of 8
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < K; ++k) xt[k * ldx + m] = xp[m * K + k];
  const float* xtp = xt.data();
  const int64_t tiles = (N + kQ8gTileN - 1) / kQ8gTileN;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> wf(kQ8gTileN * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kQ8gTileN, nt = std::min<int64_t>(kQ8gTileN, N - n0);
      for (int64_t j = 0; j < nt; ++j) {
        const int8_t* qr = q + (n0 + j) * K;
        float* wr = wf.data() + j * K;
        for (int64_t g = 0; g < G; ++g) {
          const __m256 s = _mm256_set1_ps(sc[(n0 + j) * G + g]);
          for (int64_t k = g * gs; k < (g + 1) * gs; k += 8)
            _mm256_storeu_ps(wr + k, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + k))))));
        }
      }
      int64_t j = 0;
      for (; j + 6 <= nt; j += 6) q8g_gemm_rows<6>(xtp, ldx, wf.data() + j * K, K, op + n0 + j, N, rows);
      switch (nt - j) {
        case 1: q8g_gemm_rows<1>(xtp, ldx, wf.data() + j * K, K, op + n0 + j, N, rows); break;
        case 2: q8g_gemm_rows<2>(xtp, ldx, wf.data() + j * K, K, op + n0 + j, N, rows); break;
        case 3: q8g_gemm_rows<3>(xtp, ldx, wf.data() + j * K, K, op + n0 + j, N, rows); break;
        case 4: q8g_gemm_rows<4>(xtp, ldx, wf.data() + j * K, K, op + n0 + j, N, rows); break;
        case 5: q8g_gemm_rows<5>(xtp, ldx, wf.data() + j * K, K, op + n0 + j, N, rows); break;
        default: break;
      }
    }
  });
}

// gemv_q4 for many rows of x (at least kQ4GemmRows), GEMM-style, for the reason gemm_q8g_avx2
// is: the LM head at 64 rows took 16 passes of 4 rows over the codes. Each thread dequantizes one
// block of 32 weight rows at a time into float32, input-major as the layout stores them (wt[k][j],
// j the row within the block; per group and 8 rows c = zero - 8 scale, one rounding, then
// w = code * scale + c, one FMA). The weights are the vector dimension here: 16 weight rows (two
// vectors per input) times MR (up to 6) rows of x, each x value broadcast, so x needs no
// transposing and each accumulator holds 8 adjacent outputs. out[m, n] = the float32 sum over k,
// in order, of x[m, k] * w[n, k], rounded once to bf16: it does not depend on the other rows of
// the call (as long as the call takes this path), and differs in the last bits from the passes'
// (scale * sum x q + c * sum x per group). Zen 3 VM, 2 threads, minima of alternating runs:
// 262k x 640 head at 64 rows 180 ms against 248 ms in passes, 4096 x 640 at 64 rows 3.3 against
// 5.6 ms; at 16 rows about even (the dequantization is not paid back below that). One block
// (80 KB of float32 at K = 640) beat tiles of 2 and 4 blocks, and chunking K did not help.
constexpr int64_t kQ4GemmRows = 16;

template <int MR, typename O>
inline void q4_gemm_block(const float* x, int64_t K, const float* wt, O* out, int64_t N) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wt + k * 32), w1 = _mm256_loadu_ps(wt + k * 32 + 8);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * K + k);
      acc[m][0] = _mm256_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xb, w1, acc[m][1]);
    }
  }
  alignas(32) float lanes[16];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    _mm256_store_ps(lanes, acc[m][0]);
    _mm256_store_ps(lanes + 8, acc[m][1]);
    for (int j = 0; j < 16; ++j) store_bf(out + m * N + j, lanes[j]);
  }
}

template <typename O>
void gemm_q4_avx2(const float* xp, const uint8_t* w, const uint32_t* sz, O* op, int64_t rows, int64_t N,
                  int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  const __m256i nib = _mm256_set1_epi32(0x0F);
  at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> wt(K * 32);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * K * 16;
      const uint32_t* szb = sz + b * G * 32;
      for (int64_t g = 0; g < G; ++g) {
        // rows 0-7 / 8-15: low nibbles of bytes 0-7 / 8-15; rows 16-23 / 24-31: their high ones
        __m256 sc[4], c[4];
        for (int part = 0; part < 4; ++part) q4_scale_zero8(szb + g * 32 + part * 8, sc[part], c[part]);
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k * 16));
          const __m256i lo = _mm256_cvtepu8_epi32(bytes), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
          float* dst = wt.data() + k * 32;
          _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, nib)), sc[0], c[0]));
          _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, nib)), sc[1], c[1]));
          _mm256_storeu_ps(dst + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)), sc[2], c[2]));
          _mm256_storeu_ps(dst + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)), sc[3], c[3]));
        }
      }
      for (int64_t j = 0; j < 32; j += 16) {
        for (int64_t m0 = 0, left = rows; left > 0;) {   // x rows in blocks of up to 6, as even as can be
          const int64_t mr = (left + (left + 5) / 6 - 1) / ((left + 5) / 6);
          const float* xm = xp + m0 * K;
          O* om = op + m0 * N + b * 32 + j;
          switch (mr) {
            case 1: q4_gemm_block<1>(xm, K, wt.data() + j, om, N); break;
            case 2: q4_gemm_block<2>(xm, K, wt.data() + j, om, N); break;
            case 3: q4_gemm_block<3>(xm, K, wt.data() + j, om, N); break;
            case 4: q4_gemm_block<4>(xm, K, wt.data() + j, om, N); break;
            case 5: q4_gemm_block<5>(xm, K, wt.data() + j, om, N); break;
            default: q4_gemm_block<6>(xm, K, wt.data() + j, om, N); break;
          }
          m0 += mr, left -= mr;
        }
      }
    }
  });
}
#define HERON_GEMV_Q_AVX2 1
#endif

}  // namespace

// k/v [T, Hkv, D] (each token's Hkv*D values contiguous) into the cache slots
static bool is_q8_cache(const torch::Tensor& kv_cache) {
  return kv_cache.scalar_type() == at::kChar || kv_cache.scalar_type() == at::kFloat8_e4m3fn;
}

// an 8-bit cache [2, N, bs, Hkv, D + 4]: k/v [T, Hkv, D] quantized into their slots
static void write_kv_q8(const torch::Tensor& kv_cache, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots: contiguous int64");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v dtypes differ");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  const int64_t T = slots.numel(), H = kv_cache.size(3), D = kv_cache.size(4) - kScaleBytes;
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.numel() == T * H * D && v.numel() == T * H * D, "k/v shapes");
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1 && (k.dim() < 3 || k.stride(1) == k.size(2)) &&
              (v.dim() < 3 || v.stride(1) == v.size(2)), "k/v rows must be contiguous");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < num_slots, "slot out of range");
  uint8_t* kdst = static_cast<uint8_t*>(kv_cache.data_ptr());
  uint8_t* vdst = kdst + num_slots * H * (D + kScaleBytes);
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "write_kv_q8", [&] {
    if (fp8) {
      quantize_into_slots<scalar_t, true>(k.data_ptr<scalar_t>(), k.stride(0), sl, T, H, D, kdst);
      quantize_into_slots<scalar_t, true>(v.data_ptr<scalar_t>(), v.stride(0), sl, T, H, D, vdst);
    } else {
      quantize_into_slots<scalar_t, false>(k.data_ptr<scalar_t>(), k.stride(0), sl, T, H, D, kdst);
      quantize_into_slots<scalar_t, false>(v.data_ptr<scalar_t>(), v.stride(0), sl, T, H, D, vdst);
    }
  });
}

static void write_kv(const torch::Tensor& kv_cache, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& slots) {
  if (is_q8_cache(kv_cache)) return write_kv_q8(kv_cache, k, v, slots);
  TORCH_CHECK(k.scalar_type() == kv_cache.scalar_type() && v.scalar_type() == kv_cache.scalar_type(),
              "k/v and kv_cache dtypes differ");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots: contiguous int64");
  const int64_t T = slots.numel(), row = kv_cache.size(3) * kv_cache.size(4);
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.numel() == T * row && v.numel() == T * row, "k/v shapes");
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1 && (k.dim() < 3 || k.stride(1) == k.size(2)) &&
              (v.dim() < 3 || v.stride(1) == v.size(2)), "k/v rows must be contiguous");
  const int64_t esize = kv_cache.element_size();
  char* base = static_cast<char*>(kv_cache.data_ptr());
  const int64_t v_off = num_slots * row * esize;
  const int64_t* sl = slots.data_ptr<int64_t>();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sl[t] >= 0 && sl[t] < num_slots, "slot out of range");
    std::memcpy(base + sl[t] * row * esize, kp + t * k.stride(0) * esize, row * esize);
    std::memcpy(base + v_off + sl[t] * row * esize, vp + t * v.stride(0) * esize, row * esize);
  }
}

// decode rows over an 8-bit cache: the AVX-512 kernel for D % 16 == 0 and G in {1, 2, 4, 8},
// else the portable one
static torch::Tensor paged_decode_q8(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                     const torch::Tensor& block_tables, const torch::Tensor& seq_lens, int64_t window,
                                     double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t N = kv_cache.size(1), bs = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D + kScaleBytes && Hq % Hkv == 0,
              "head shapes do not match (an 8-bit kv_cache has rows of D codes + a 4-byte scale)");
  auto out = torch::empty_like(q);
  const int64_t max_blocks = block_tables.size(1);
  const auto* kvp = static_cast<const uint8_t*>(kv_cache.data_ptr());
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_q8", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
#if defined(__AVX512F__)
    if (D % 16 == 0) {
      const bool done = fp8 ? dispatch_q8_avx512<scalar_t, true>(Hq / Hkv, qp, kvp, tables, lens, op, B, Hq, Hkv, D,
                                                                 N, bs, max_blocks, window, sc)
                            : dispatch_q8_avx512<scalar_t, false>(Hq / Hkv, qp, kvp, tables, lens, op, B, Hq, Hkv, D,
                                                                  N, bs, max_blocks, window, sc);
      if (done) return;
    }
#endif
    if (fp8)
      decode_kernel_q8<scalar_t, true>(qp, kvp, tables, lens, op, B, Hq, Hkv, D, N, bs, max_blocks, window, sc);
    else
      decode_kernel_q8<scalar_t, false>(qp, kvp, tables, lens, op, B, Hq, Hkv, D, N, bs, max_blocks, window, sc);
  });
  return out;
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                           torch::Tensor seq_lens, int64_t window, double scale, c10::optional<torch::Tensor> k,
                           c10::optional<torch::Tensor> v, c10::optional<torch::Tensor> slots) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5, "q [B,Hq,D], kv_cache [2,N,bs,Hkv,D]");
  if (slots.has_value() && slots->defined()) write_kv(kv_cache, *k, *v, *slots);
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_tables.is_contiguous() &&
              seq_lens.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "int64 tables");
  if (is_q8_cache(kv_cache)) return paged_decode_q8(q, kv_cache, block_tables, seq_lens, window, scale);
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache dtypes differ");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t N = kv_cache.size(1), bs = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && Hq % Hkv == 0, "head shapes do not match");
  auto out = torch::empty_like(q);
  const int64_t max_blocks = block_tables.size(1);
#if defined(__AVX512F__)
  if (q.scalar_type() == at::kBFloat16 && D % 16 == 0) {
    const auto* qp = q.data_ptr<c10::BFloat16>();
    const auto* kvp = kv_cache.data_ptr<c10::BFloat16>();
    auto* op = out.data_ptr<c10::BFloat16>();
    const float sc = static_cast<float>(scale);
#if defined(__AVX512BF16__)
    if (D % 32 == 0 && dispatch_bf16_avx512<true>(Hq / Hkv, qp, kvp, block_tables.data_ptr<int64_t>(),
                                                   seq_lens.data_ptr<int64_t>(), op, B, Hq, Hkv, D, N, bs,
                                                   max_blocks, window, sc))
      return out;
#endif
    if (dispatch_bf16_avx512<false>(Hq / Hkv, qp, kvp, block_tables.data_ptr<int64_t>(),
                                    seq_lens.data_ptr<int64_t>(), op, B, Hq, Hkv, D, N, bs, max_blocks, window, sc))
      return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int64_t>(),
                            seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, Hq, Hkv, D, N, bs,
                            max_blocks, window, static_cast<float>(scale));
  });
  return out;
}

// One part of the keys for bf16 decode rows (cascade attention): row b attends to keys
// [max(window start, starts[b]), seq_lens[b]) of its block table. Returns the float32 output
// [B, Hq, D] and the log-sum-exp of the scaled scores [B, Hq] (-inf and zeros for an empty range),
// for the caller to merge with the attention over the other keys. Needs bf16 q and cache and
// D % 16 == 0; the AVX-512 kernel (Hq / Hkv in {1, 2, 4, 8}) where built, else the portable one.
std::vector<torch::Tensor> paged_part(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                                      torch::Tensor seq_lens, torch::Tensor starts, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5, "q [B,Hq,D], kv_cache [2,N,bs,Hkv,D]");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_tables.is_contiguous() &&
              seq_lens.is_contiguous() && starts.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
              starts.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kv_cache.scalar_type() == at::kBFloat16, "bf16 q and cache");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t N = kv_cache.size(1), bs = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && Hq % Hkv == 0 && D % 16 == 0, "head shapes do not match");
  TORCH_CHECK(starts.numel() == B && seq_lens.numel() == B && block_tables.size(0) == B, "one start per row");
  auto out = torch::empty({B, Hq, D}, torch::kFloat);
  auto lse = torch::empty({B, Hq}, torch::kFloat);
  PartOut part;
  part.starts = starts.data_ptr<int64_t>();
  part.out_f32 = out.data_ptr<float>();
  part.lse = lse.data_ptr<float>();
  bool done = false;
#if defined(__AVX512F__)
  const auto* qp = q.data_ptr<c10::BFloat16>();
  const auto* kvp = kv_cache.data_ptr<c10::BFloat16>();
  const int64_t mb = block_tables.size(1);
  const float sc = static_cast<float>(scale);
#if defined(__AVX512BF16__)
  if (D % 32 == 0)
    done = dispatch_bf16_avx512<true>(Hq / Hkv, qp, kvp, block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                                      nullptr, B, Hq, Hkv, D, N, bs, mb, window, sc, part);
#endif
  if (!done)
    done = dispatch_bf16_avx512<false>(Hq / Hkv, qp, kvp, block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                                       nullptr, B, Hq, Hkv, D, N, bs, mb, window, sc, part);
#endif
  if (!done)   // the portable kernel (no AVX-512, or another group size): same semantics, scalar arithmetic
    decode_kernel<c10::BFloat16>(q.data_ptr<c10::BFloat16>(), kv_cache.data_ptr<c10::BFloat16>(),
                                 block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), nullptr, B, Hq, Hkv, D,
                                 N, bs, block_tables.size(1), window, static_cast<float>(scale), part);
  return {out, lse};
}

// Cascade merge, in place: rows[i]'s float32 output out[rows[i]] (attention over one part of its
// keys, log-sum-exp lse[rows[i]]) becomes the attention over both parts, with o1[i] / lse1[i]
// the other part's (bf16 output): out = (o1 e^(lse1 - m) + out e^(lse - m)) / (e^(lse1 - m) + e^(lse - m)),
// m the larger log-sum-exp. out [B, Hq, D] f32, lse [B, Hq] f32, o1 [r, Hq, D] bf16, lse1 [r, Hq] f32.
void merge_part(torch::Tensor out, torch::Tensor lse, torch::Tensor rows, torch::Tensor o1, torch::Tensor lse1) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat && lse1.scalar_type() == at::kFloat &&
              o1.scalar_type() == at::kBFloat16 && rows.scalar_type() == at::kLong, "merge_part: dtypes");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && rows.is_contiguous() && o1.is_contiguous() &&
              lse1.is_contiguous(), "merge_part: contiguous inputs");
  const int64_t B = out.size(0), Hq = out.size(1), D = out.size(2), R = rows.numel();
  TORCH_CHECK(o1.numel() == R * Hq * D && lse1.numel() == R * Hq && lse.numel() == B * Hq, "merge_part: shapes");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < B, "merge_part: row out of range");
  float* op = out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const float* l1p = lse1.data_ptr<float>();
  const c10::BFloat16* o1p = o1.data_ptr<c10::BFloat16>();
  at::parallel_for(0, R * Hq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / Hq, h = item % Hq, b = rp[i];
      const float l1 = l1p[item], l2 = lp[b * Hq + h];
      const float m = std::max(l1, l2);
      if (m == -std::numeric_limits<float>::infinity()) continue;   // neither part has a key
      const float w1 = std::exp(l1 - m), w2 = std::exp(l2 - m), inv = 1.f / (w1 + w2);
      const float a = w1 * inv, c = w2 * inv;
      float* o = op + (b * Hq + h) * D;
      const c10::BFloat16* x = o1p + item * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(x[d]) * a + o[d] * c;
    }
  });
}

// Group-wise int8 weights (--quantization int8 --quantization-group-size G): x [R, K] (bf16, fp16
// or float32), q [N, K] int8, scales [N, K/G] float32; out[r, n] = sum_g scales[n, g] *
// sum_{k in group g} x[r, k] * q[n, k] in float32 (a product of x and a code is exact there),
// rounded once to x's dtype. Portable C++: 8 partial sums per group let the compiler vectorise
// the sum without -ffast-math, and a row of q stays in cache for all R rows of x. On AVX2 CPUs
// (without the AVX-512 GEMVs) gemv_q8g_avx2 runs instead, or from kQ8gGemmRows rows on
// gemm_q8g_avx2: the same sums in other orders (so a row's result differs in the last bits
// between a call below that many rows and one above).
torch::Tensor gemv_q8g(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2, "gemv_q8g: x [R, K], q [N, K], scales [N, K/G]");
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat, "gemv_q8g: int8 q, float32 scales");
  const int64_t R = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(group > 0 && K % group == 0 && q.size(1) == K && scales.size(0) == N && scales.size(1) == K / group,
              "gemv_q8g: shapes do not match the group size");
  const auto xf = x.to(torch::kFloat).contiguous();
  const auto qc = q.contiguous();
  const auto sc = scales.contiguous();
  auto out = torch::empty({R, N}, torch::kFloat);
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t G = K / group;
#if defined(HERON_GEMV_Q_AVX2)
  if (group % 8 == 0 && R >= kQ8gGemmRows) {
    gemm_q8g_avx2(xp, qp, sp, op, R, N, K, group);
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
  }
  if (group % 8 == 0) {   // x rows in chunks of up to 4 (each output computed the same way in any chunk)
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const float* xr = xp + r0 * K;
      float* orow = op + r0 * N;
      switch (std::min<int64_t>(4, R - r0)) {
        case 1: gemv_q8g_avx2<1>(xr, qp, sp, orow, N, K, group); break;
        case 2: gemv_q8g_avx2<2>(xr, qp, sp, orow, N, K, group); break;
        case 3: gemv_q8g_avx2<3>(xr, qp, sp, orow, N, K, group); break;
        default: gemv_q8g_avx2<4>(xr, qp, sp, orow, N, K, group); break;
      }
    }
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
  }
#endif
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = qp + n * K;
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = xp + r * K;
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t k0 = g * group;
          float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          int64_t k = 0;
          for (; k + 8 <= group; k += 8)
            for (int j = 0; j < 8; ++j) part[j] += xr[k0 + k + j] * static_cast<float>(qn[k0 + k + j]);
          float sum = 0.f;
          for (; k < group; ++k) sum += xr[k0 + k] * static_cast<float>(qn[k0 + k]);
          for (int j = 0; j < 8; ++j) sum += part[j];
          acc += sum * sp[n * G + g];
        }
        op[r * N + n] = acc;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

bool paged_part_supported() { return true; }   // the AVX-512 kernel where built, else the portable one

torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [R, V]");
  TORCH_CHECK(logits.stride(1) == 1 || logits.stride(0) == 1, "rows or columns of logits must be contiguous");
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), "vocabulary too large");
  const int64_t R = logits.size(0), V = logits.size(1);
  auto out = torch::empty({R}, torch::kLong);
  if (R == 0) return out;
  TORCH_CHECK(V > 0, "empty vocabulary");
  if (logits.scalar_type() == at::kBFloat16)
    argmax_rows_impl(logits.data_ptr<c10::BFloat16>(), R, V, logits.stride(0), logits.stride(1), out.data_ptr<int64_t>());
  else if (logits.scalar_type() == at::kFloat)
    argmax_rows_impl(logits.data_ptr<float>(), R, V, logits.stride(0), logits.stride(1), out.data_ptr<int64_t>());
  else
    TORCH_CHECK(false, "argmax_rows: bfloat16 or float32 logits");
  return out;
}

static void check_bf16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), name, " must be a bfloat16 CPU tensor");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, bool gemma,
                       c10::optional<torch::Tensor> residual) {
  // bf16 (torch's rounding steps), or float32 (quantized models)
  const bool f32 = x.scalar_type() == at::kFloat;
  if (f32) {
    TORCH_CHECK(x.device().is_cpu() && weight.scalar_type() == at::kFloat, "rms_norm: float32 x needs a float32 weight");
  } else {
    check_bf16(x, "x");
    check_bf16(weight, "weight");
  }
  x = x.contiguous();
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "weight must have the last dimension's size");
  auto w = weight.contiguous();
  auto out = torch::empty_like(x);
  torch::Tensor rc;
  if (residual.has_value()) {
    rc = residual->contiguous();
    TORCH_CHECK(rc.scalar_type() == x.scalar_type() && rc.device().is_cpu(), "residual must have x's dtype");
    TORCH_CHECK(rc.sizes() == x.sizes(), "residual must have x's shape");
  }
  const int64_t R = x.numel() / std::max<int64_t>(D, 1);
  if (f32) {
    rms_norm_f32(x.data_ptr<float>(), w.data_ptr<float>(), rc.defined() ? rc.data_ptr<float>() : nullptr,
                 out.data_ptr<float>(), R, D, static_cast<float>(eps), gemma);
    return out;
  }
  rms_norm_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()),
                reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>()),
                rc.defined() ? reinterpret_cast<const uint16_t*>(rc.data_ptr<c10::BFloat16>()) : nullptr,
                reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()), R, D, static_cast<float>(eps), gemma);
  return out;
}

torch::Tensor act_and_mul(torch::Tensor x, bool gelu_tanh) {
  // bf16 (torch's rounding steps), or float32 (quantized models)
  const bool f32 = x.scalar_type() == at::kFloat;
  if (f32) {
    TORCH_CHECK(x.device().is_cpu(), "act_and_mul: x must be a CPU tensor");
  } else {
    check_bf16(x, "x");
  }
  x = x.contiguous();
  const int64_t two_f = x.size(-1);
  TORCH_CHECK(two_f % 2 == 0, "last dimension must be even ([gate, up])");
  auto sizes = x.sizes().vec();
  sizes.back() = two_f / 2;
  auto out = torch::empty(sizes, x.options());
  if (f32) {
    act_and_mul_f32(x.data_ptr<float>(), out.data_ptr<float>(), x.numel() / std::max<int64_t>(two_f, 1), two_f / 2,
                    gelu_tanh);
    return out;
  }
  act_and_mul_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()),
                   reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()), x.numel() / std::max<int64_t>(two_f, 1),
                   two_f / 2, gelu_tanh);
  return out;
}

torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  // x [T, H, D] with contiguous rows of D (any token/head strides); returns a new contiguous tensor.
  // bf16 (torch's rounding steps), or float32 (quantized models)
  const bool f32 = x.scalar_type() == at::kFloat;
  if (f32) {
    TORCH_CHECK(x.device().is_cpu() && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
                "rope: float32 x needs float32 cos/sin");
  } else {
    check_bf16(x, "x");
    check_bf16(cos, "cos");
    check_bf16(sin, "sin");
  }
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
              sin.sizes() == cos.sizes() && x.size(2) % 2 == 0, "x [T, H, D], cos/sin [T, D]");
  TORCH_CHECK(x.stride(2) == 1, "x: rows of D must be contiguous");
  auto out = torch::empty(x.sizes(), x.options());
  auto c = cos.contiguous(), s = sin.contiguous();
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  if (f32) {
    rope_f32(x.data_ptr<float>(), out.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), T, H, D,
             x.stride(0), x.stride(1));
    return out;
  }
  rope_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()),
            reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()),
            reinterpret_cast<const uint16_t*>(c.data_ptr<c10::BFloat16>()),
            reinterpret_cast<const uint16_t*>(s.data_ptr<c10::BFloat16>()), T, H, D, x.stride(0), x.stride(1));
  return out;
}

// Gemma's q/k norms and rope in one call (float32, quantized models): qkv [T, (Hq + 2 Hkv) D] with
// contiguous rows of D (any row stride), q_weight / k_weight [D] (GemmaRMSNorm's: 1 + w applied),
// cos/sin [T, D] -> (q [T, Hq, D], k [T, Hkv, D]), equal to rms_norm then rope.
std::tuple<torch::Tensor, torch::Tensor> qk_norm_rope(torch::Tensor qkv, torch::Tensor q_weight, torch::Tensor k_weight,
                                                      torch::Tensor cos, torch::Tensor sin, double eps, int64_t Hq,
                                                      int64_t Hkv) {
  for (const auto* t : {&qkv, &q_weight, &k_weight, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "qk_norm_rope: float32 CPU tensors");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && Hq > 0 && Hkv > 0, "qk_norm_rope: qkv [T, (Hq + 2 Hkv) D], rows contiguous");
  const int64_t T = qkv.size(0), D = q_weight.numel();
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) == (Hq + 2 * Hkv) * D && k_weight.numel() == D,
              "qk_norm_rope: qkv must be [T, (Hq + 2 Hkv) D] with D the norms' size (even)");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(), "cos/sin [T, D]");
  auto c = cos.contiguous(), s = sin.contiguous(), qw = q_weight.contiguous(), kw = k_weight.contiguous();
  auto q = torch::empty({T, Hq, D}, qkv.options()), k = torch::empty({T, Hkv, D}, qkv.options());
  qk_norm_rope_f32(qkv.data_ptr<float>(), qkv.stride(0), qw.data_ptr<float>(), kw.data_ptr<float>(), c.data_ptr<float>(),
                   s.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), T, Hq, Hkv, D, static_cast<float>(eps));
  return {q, k};
}

bool gemv_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_bf16(x, "x");
  check_bf16(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  TORCH_CHECK(M >= 1 && M <= 16 && K % 32 == 0, "gemv: 1-16 rows and K a multiple of 32");
  x = x.contiguous();
  const uint16_t* bp = nullptr;
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    check_bf16(bc, "bias");
    TORCH_CHECK(bc.numel() == N, "bias must have N entries");
    bp = reinterpret_cast<const uint16_t*>(bc.data_ptr<c10::BFloat16>());
  }
  auto out = torch::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  switch (M) {
    case 1: gemv_bf16_impl<1>(xp, wp, bp, op, N, K); break;
    case 2: gemv_bf16_impl<2>(xp, wp, bp, op, N, K); break;
    case 3: gemv_bf16_impl<3>(xp, wp, bp, op, N, K); break;
    case 4: gemv_bf16_impl<4>(xp, wp, bp, op, N, K); break;
    case 5: gemv_bf16_impl<5>(xp, wp, bp, op, N, K); break;
    case 6: gemv_bf16_impl<6>(xp, wp, bp, op, N, K); break;
    case 7: gemv_bf16_impl<7>(xp, wp, bp, op, N, K); break;
    case 8: gemv_bf16_impl<8>(xp, wp, bp, op, N, K); break;
    case 9: gemv_bf16_impl<9>(xp, wp, bp, op, N, K); break;
    case 10: gemv_bf16_impl<10>(xp, wp, bp, op, N, K); break;
    case 11: gemv_bf16_impl<11>(xp, wp, bp, op, N, K); break;
    case 12: gemv_bf16_impl<12>(xp, wp, bp, op, N, K); break;
    case 13: gemv_bf16_impl<13>(xp, wp, bp, op, N, K); break;
    case 14: gemv_bf16_impl<14>(xp, wp, bp, op, N, K); break;
    case 15: gemv_bf16_impl<15>(xp, wp, bp, op, N, K); break;
    default: gemv_bf16_impl<16>(xp, wp, bp, op, N, K); break;
  }
#else
  TORCH_CHECK(false, "gemv needs AVX512-BF16");
#endif
  return out;
}

// The quantized GEMVs' limits on this build: the most rows of x a call takes (0: no kernel),
// and the rows per block of the int4 layout they read (torch's packed layout for this ISA).
int64_t gemv_q8_max_rows() {
#if defined(__AVX512BF16__)
  return 16;
#elif defined(HERON_GEMV_Q_AVX2)
  return 8;
#else
  return 0;
#endif
}

int64_t gemv_q4_block() {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  return 64;
#elif defined(HERON_GEMV_Q_AVX2)
  return 32;
#else
  return 0;
#endif
}

bool gemv_q4_supported() { return gemv_q4_block() > 0; }

// the most rows of x a gemv_q4 call takes: 8 with the AVX-512 kernels, any number on AVX2
// (from kQ4GemmRows rows on GEMM-style)
int64_t gemv_q4_max_rows() {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  return 8;
#elif defined(HERON_GEMV_Q_AVX2)
  return int64_t{1} << 40;
#else
  return 0;
#endif
}

#if defined(HERON_GEMV_Q_AVX2)
// x (contiguous, bf16 or float32) as the float32 values of its bf16 rounding
static std::vector<float> widen_bf16(const torch::Tensor& x) {
  std::vector<float> xf(x.numel());
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) xf[i] = round_bf(xp[i]);
  } else {
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    for (int64_t i = 0; i < x.numel(); ++i) xf[i] = bf2f(xb[i]);
  }
  return xf;
}
#endif

// x [M, K] bf16 (1 <= M <= gemv_q8_max_rows()), w [N, K] int8 (K a multiple of 32), scales [N]
// bf16 -> [M, N] bf16
torch::Tensor gemv_q8(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  // float32 x: rounded to bf16 first, the bf16 result returned as float32 (the same values);
  // the AVX2 variant does both itself, without the two tensors between
#if defined(__AVX512BF16__) || !defined(HERON_GEMV_Q_AVX2)
  if (x.scalar_type() == at::kFloat) return gemv_q8(x.to(at::kBFloat16), w, scales).to(at::kFloat);
#endif
  const bool f32 = x.scalar_type() == at::kFloat;
  if (!f32) check_bf16(x, "x");
  check_bf16(scales, "scales");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(), "w: contiguous [N, K] int8");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1), most = gemv_q8_max_rows();
  TORCH_CHECK(most > 0, "gemv_q8 needs AVX512-BF16 or AVX2 with FMA");
  TORCH_CHECK(M >= 1 && M <= most && K % 32 == 0, "gemv_q8: 1-", most, " rows and K a multiple of 32");
  TORCH_CHECK(scales.numel() == N && scales.is_contiguous(), "scales: [N] contiguous");
  x = x.contiguous();
  auto out = torch::empty({M, N}, x.options());
  const auto* wp = w.data_ptr<int8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::BFloat16>());
#if defined(__AVX512BF16__)
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  switch (M) {
    case 1: gemv_q8_impl<1>(xp, wp, sp, op, N, K); break;
    case 2: gemv_q8_impl<2>(xp, wp, sp, op, N, K); break;
    case 3: gemv_q8_impl<3>(xp, wp, sp, op, N, K); break;
    case 4: gemv_q8_impl<4>(xp, wp, sp, op, N, K); break;
    case 5: gemv_q8_impl<5>(xp, wp, sp, op, N, K); break;
    case 6: gemv_q8_impl<6>(xp, wp, sp, op, N, K); break;
    case 7: gemv_q8_impl<7>(xp, wp, sp, op, N, K); break;
    case 8: gemv_q8_impl<8>(xp, wp, sp, op, N, K); break;
    case 9: gemv_q8_impl<9>(xp, wp, sp, op, N, K); break;
    case 10: gemv_q8_impl<10>(xp, wp, sp, op, N, K); break;
    case 11: gemv_q8_impl<11>(xp, wp, sp, op, N, K); break;
    case 12: gemv_q8_impl<12>(xp, wp, sp, op, N, K); break;
    case 13: gemv_q8_impl<13>(xp, wp, sp, op, N, K); break;
    case 14: gemv_q8_impl<14>(xp, wp, sp, op, N, K); break;
    case 15: gemv_q8_impl<15>(xp, wp, sp, op, N, K); break;
    default: gemv_q8_impl<16>(xp, wp, sp, op, N, K); break;
  }
#elif defined(HERON_GEMV_Q_AVX2)
  const std::vector<float> xf = widen_bf16(x);
  const float* xp = xf.data();
  auto run = [&](auto* op) {
    switch (M) {
      case 1: gemv_q8_avx2<1>(xp, wp, sp, op, N, K); break;
      case 2: gemv_q8_avx2<2>(xp, wp, sp, op, N, K); break;
      case 3: gemv_q8_avx2<3>(xp, wp, sp, op, N, K); break;
      case 4: gemv_q8_avx2<4>(xp, wp, sp, op, N, K); break;
      case 5: gemv_q8_avx2<5>(xp, wp, sp, op, N, K); break;
      case 6: gemv_q8_avx2<6>(xp, wp, sp, op, N, K); break;
      case 7: gemv_q8_avx2<7>(xp, wp, sp, op, N, K); break;
      default: gemv_q8_avx2<8>(xp, wp, sp, op, N, K); break;
    }
  };
  if (f32) run(out.data_ptr<float>());
  else run(reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()));
#endif
  return out;
}

// The weight [n, K] of a blocked int4 layout (gemv_q4's: blocks of B rows stored as [K, B/2]
// bytes, byte j of input k holding row j in its low nibble and row j + B/2 in its high one;
// sz [N/B, K/gs, B, 2] bf16 (scale, zero)): w = (q - 8) * scale + zero in float32 ((q - 8) *
// scale is exact, so one rounding), as float32 or rounded once more to bf16. For calls of many
// rows, which multiply the dequantized weight (heron.quant.apply).
namespace {
struct BlockedQ4 {   // a blocked int4 weight (see dequant_q4), checked
  const uint8_t* w;
  const uint16_t* zs;
  int64_t NB, G, B, K, half, gs;
  BlockedQ4(const torch::Tensor& packed, const torch::Tensor& sz, int64_t group) {
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8");
    check_bf16(sz, "scales_and_zeros");
    TORCH_CHECK(sz.dim() == 4 && sz.size(3) == 2 && sz.is_contiguous() && sz.size(2) % 2 == 0,
                "sz [N/B, G, B, 2] contiguous");
    NB = sz.size(0), G = sz.size(1), B = sz.size(2), gs = group, K = G * gs, half = B / 2;
    TORCH_CHECK(gs > 0 && packed.numel() == NB * B * K / 2, "packed must hold N*K/2 bytes");
    w = packed.data_ptr<uint8_t>();
    zs = reinterpret_cast<const uint16_t*>(sz.data_ptr<c10::BFloat16>());
  }
  // weight row nr (< NB * B) into out[i] of a float32 (of) or bf16 (ob) [*, K] output
  void row(int64_t nr, int64_t i, float* of, uint16_t* ob, float* tmp) const {
    const int64_t b = nr / B, r = nr % B, j = r % half;
    const int shift = r < half ? 0 : 4;
    const uint8_t* wb = w + b * K * half;
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* p = zs + ((b * G + g) * B + r) * 2;
      const float sc = bf2f(p[0]), zero = bf2f(p[1]);
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
        tmp[k] = static_cast<float>(((wb[k * half + j] >> shift) & 15) - 8) * sc + zero;
    }
    if (of) std::memcpy(of + i * K, tmp, K * sizeof(float));
    else for (int64_t k = 0; k < K; ++k) ob[i * K + k] = f2bf(tmp[k]);
  }
};
}  // namespace

torch::Tensor dequant_q4(torch::Tensor packed, torch::Tensor sz, int64_t gs, int64_t n, bool to_bf16) {
  const BlockedQ4 q(packed, sz, gs);
  TORCH_CHECK(n >= 0 && n <= q.NB * q.B, "n: at most the padded rows");
  auto out = torch::empty({n, q.K}, packed.options().dtype(to_bf16 ? at::kBFloat16 : at::kFloat));
  float* of = to_bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()) : nullptr;
  at::parallel_for(0, q.NB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(q.K);
    for (int64_t nr = b0 * q.B; nr < std::min(b1 * q.B, n); ++nr) q.row(nr, nr, of, ob, tmp.data());
  });
  return out;
}

// The rows `rows` (int64, each below the padded row count) of the same layout, in their order:
// an embedding lookup in a tied, quantized LM head (the values of dequant_q4's rows).
torch::Tensor dequant_q4_rows(torch::Tensor packed, torch::Tensor sz, int64_t gs, torch::Tensor rows, bool to_bf16) {
  const BlockedQ4 q(packed, sz, gs);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows: a 1-D int64 tensor");
  auto rc = rows.contiguous();
  const int64_t* rp = rc.data_ptr<int64_t>();
  const int64_t R = rc.numel();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < q.NB * q.B, "row ", rp[i], " out of range: the weight has ", q.NB * q.B, " rows");
  auto out = torch::empty({R, q.K}, packed.options().dtype(to_bf16 ? at::kBFloat16 : at::kFloat));
  float* of = to_bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()) : nullptr;
  at::parallel_for(0, R, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> tmp(q.K);
    for (int64_t i = i0; i < i1; ++i) q.row(rp[i], i, of, ob, tmp.data());
  });
  return out;
}

// x [M, K] bf16 (1 <= M <= gemv_q4_max_rows()), packed [N, K/2] uint8 in torch's packed int4 layout for this ISA
// (blocks of B = gemv_q4_block() rows, N a multiple of B), sz [N/B, K/gs, B, 2] bf16 -> [M, N] bf16
// (float32 x -> float32 out)
torch::Tensor gemv_q4(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, int64_t gs) {
  // float32 x: rounded to bf16 first, the bf16 result returned as float32 (the same values);
  // the AVX2 variant does both itself, without the two tensors between
#if !defined(HERON_GEMV_Q_AVX2)
  if (x.scalar_type() == at::kFloat) return gemv_q4(x.to(at::kBFloat16), packed, sz, gs).to(at::kFloat);
#endif
  const bool f32 = x.scalar_type() == at::kFloat;
  if (!f32) check_bf16(x, "x");
  check_bf16(sz, "scales_and_zeros");
  const int64_t B = gemv_q4_block();
  TORCH_CHECK(B > 0, "gemv_q4 needs AVX512-BF16 and AVX512-VBMI, or AVX2 with FMA");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8");
  TORCH_CHECK(x.dim() == 2 && sz.dim() == 4 && sz.size(2) == B && sz.size(3) == 2 && sz.is_contiguous(),
              "x [M, K], sz [N/", B, ", G, ", B, ", 2]");
  const int64_t M = x.size(0), K = x.size(1), N = sz.size(0) * B;
  TORCH_CHECK(M >= 1 && M <= gemv_q4_max_rows(), "gemv_q4: 1-", gemv_q4_max_rows(), " rows");
  TORCH_CHECK(gs >= 2 && gs % 2 == 0 && K % gs == 0 && sz.size(1) == K / gs, "gemv_q4: K a multiple of an even group size");
  TORCH_CHECK(packed.numel() == N * K / 2, "gemv_q4: packed must hold N*K/2 bytes");
  x = x.contiguous();
  auto out = torch::empty({M, N}, x.options());
  const auto* wp = packed.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint32_t*>(sz.data_ptr<c10::BFloat16>());
  const int64_t G = K / gs;
  std::vector<float> xsum(M * G, 0.f);   // per-group sums of x, both variants' zero-point term
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  for (int64_t i = 0; i < M * G; ++i)
    for (int64_t j = 0; j < gs; ++j) xsum[i] += bf2f(xb[i * gs + j]);
  const float* xs = xsum.data();
  switch (M) {
    case 1: gemv_q4_impl<1, 4>(xb, wp, sp, xs, op, N, K, gs); break;
    case 2: gemv_q4_impl<2, 4>(xb, wp, sp, xs, op, N, K, gs); break;
    case 3: gemv_q4_impl<3, 4>(xb, wp, sp, xs, op, N, K, gs); break;
    case 4: gemv_q4_impl<4, 2>(xb, wp, sp, xs, op, N, K, gs); break;
    case 5: gemv_q4_impl<5, 2>(xb, wp, sp, xs, op, N, K, gs); break;
    case 6: gemv_q4_impl<6, 2>(xb, wp, sp, xs, op, N, K, gs); break;
    case 7: gemv_q4_impl<7, 1>(xb, wp, sp, xs, op, N, K, gs); break;
    default: gemv_q4_impl<8, 1>(xb, wp, sp, xs, op, N, K, gs); break;
  }
#elif defined(HERON_GEMV_Q_AVX2)
  const std::vector<float> xf = widen_bf16(x);
  const float* xp = xf.data();
  for (int64_t i = 0; i < M * G; ++i)
    for (int64_t j = 0; j < gs; ++j) xsum[i] += xp[i * gs + j];
  auto run = [&](auto* op) {
    if (M >= kQ4GemmRows) return gemm_q4_avx2(xp, wp, sp, op, M, N, K, gs);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {   // rows of x 4 at a time (each output computed alike)
      const float* xp0 = xp + m0 * K;
      const float* xs = xsum.data() + m0 * G;
      auto* op0 = op + m0 * N;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: gemv_q4_avx2<1>(xp0, xs, wp, sp, op0, N, K, gs); break;
        case 2: gemv_q4_avx2<2>(xp0, xs, wp, sp, op0, N, K, gs); break;
        case 3: gemv_q4_avx2<3>(xp0, xs, wp, sp, op0, N, K, gs); break;
        default: gemv_q4_avx2<4>(xp0, xs, wp, sp, op0, N, K, gs); break;
      }
    }
  };
  if (f32) run(out.data_ptr<float>());
  else run(reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()));
#endif
  return out;
}

// int4_mse_grid's steps on one group of n floats (AVX2 where n % 8 == 0, else scalar)
static inline void mse_minmax(const float* x, int64_t n, float& lo, float& hi) {
  lo = hi = x[0];
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 8 == 0) {
    __m256 vl = _mm256_loadu_ps(x), vh = vl;
    for (int64_t k = 8; k < n; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      vl = _mm256_min_ps(vl, v), vh = _mm256_max_ps(vh, v);
    }
    alignas(32) float a[8], b[8];
    _mm256_store_ps(a, vl), _mm256_store_ps(b, vh);
    lo = a[0], hi = b[0];
    for (int i = 1; i < 8; ++i) lo = std::min(lo, a[i]), hi = std::max(hi, b[i]);
    return;
  }
#endif
  for (int64_t k = 1; k < n; ++k) lo = std::min(lo, x[k]), hi = std::max(hi, x[k]);
}

// codes q = clamp(round((x - m) * inv), 0, 15) into qf; returns sum((q * s + m - x)^2)
static inline float mse_round(const float* x, int64_t n, float m, float inv, float s, float* qf) {
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 8 == 0) {
    const __m256 vm = _mm256_set1_ps(m), vi = _mm256_set1_ps(inv), vs = _mm256_set1_ps(s);
    const __m256 z = _mm256_setzero_ps(), f = _mm256_set1_ps(15.0f);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(xv, vm), vi),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(_mm256_max_ps(v, z), f);
      _mm256_storeu_ps(qf + k, v);
      const __m256 d = _mm256_sub_ps(_mm256_fmadd_ps(v, vs, vm), xv);
      acc = _mm256_fmadd_ps(d, d, acc);
    }
    return hsum8(acc);
  }
#endif
  float err = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float v = std::min(std::max(std::nearbyint((x[k] - m) * inv), 0.0f), 15.0f);
    const float d = v * s + m - x[k];
    qf[k] = v;
    err += d * d;
  }
  return err;
}

// the least-squares fit's sums: sum q, sum x, sum q^2, sum q x
static inline void mse_sums(const float* x, const float* q, int64_t n, float& sq, float& sw, float& sqq, float& sqw) {
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 8 == 0) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (int64_t k = 0; k < n; k += 8) {
      const __m256 qv = _mm256_loadu_ps(q + k), xv = _mm256_loadu_ps(x + k);
      a = _mm256_add_ps(a, qv), b = _mm256_add_ps(b, xv);
      c = _mm256_fmadd_ps(qv, qv, c), d = _mm256_fmadd_ps(qv, xv, d);
    }
    sq = hsum8(a), sw = hsum8(b), sqq = hsum8(c), sqw = hsum8(d);
    return;
  }
#endif
  sq = sw = sqq = sqw = 0.f;
  for (int64_t k = 0; k < n; ++k) sq += q[k], sw += x[k], sqq += q[k] * q[k], sqw += q[k] * x[k];
}

// int4 "mse" grid (heron.quant.weight_only.mse_int4_codes, the same steps): w [R, K] float32,
// groups of gs columns; for each shrink factor start from [min, max] * shrink, round to the
// 16-level grid, refit scale and offset by least squares `refits` times, keep the candidate with
// the smallest squared error. Returns (q [R, K] uint8 0..15, scales [R, K/gs], offsets [R, K/gs]).
std::vector<torch::Tensor> int4_mse_grid(torch::Tensor w, int64_t gs, torch::Tensor shrinks, int64_t refits) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(), "w: contiguous float32 [R, K]");
  TORCH_CHECK(gs > 0 && gs <= 1024 && w.size(1) % gs == 0, "int4_mse_grid: K a multiple of gs (<= 1024)");
  TORCH_CHECK(shrinks.scalar_type() == at::kFloat && shrinks.dim() == 1 && shrinks.numel() > 0 && refits >= 0,
              "shrinks: a non-empty 1-D float32 tensor; refits >= 0");
  const int64_t R = w.size(0), K = w.size(1), G = K / gs, S = shrinks.numel();
  auto q = torch::empty({R, K}, w.options().dtype(at::kByte));
  auto sc = torch::empty({R, G}, w.options()), off = torch::empty({R, G}, w.options());
  const float* wp = w.data_ptr<float>();
  const auto sh = shrinks.contiguous();
  const float* shp = sh.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = sc.data_ptr<float>();
  float* mp = off.data_ptr<float>();
  at::parallel_for(0, R * G, 64, [&](int64_t g0, int64_t g1) {
    float qf[1024], best_q[1024];
    for (int64_t gi = g0; gi < g1; ++gi) {
      const float* x = wp + gi * gs;
      float lo, hi;
      mse_minmax(x, gs, lo, hi);
      float best_err = INFINITY, best_s = 0.f, best_m = lo;
      for (int64_t c = 0; c < S; ++c) {
        float s = (hi - lo) * (shp[c] / 15.0f), m = lo * shp[c];
        for (int64_t step = 0; step <= refits; ++step) {
          const float err = mse_round(x, gs, m, s > 0 ? 1.0f / s : 1.0f, s, qf);
          if (err < best_err) {
            best_err = err, best_s = s, best_m = m;
            std::memcpy(best_q, qf, gs * sizeof(float));
          }
          if (step == refits) break;
          float sq, sw, sqq, sqw;
          mse_sums(x, qf, gs, sq, sw, sqq, sqw);
          const float n = static_cast<float>(gs), det = n * sqq - sq * sq;
          if (det > 0) {
            const float s2 = (n * sqw - sq * sw) / det;
            if (s2 > 0) s = s2, m = (sw - s2 * sq) / n;
          }
        }
      }
      for (int64_t k = 0; k < gs; ++k) qp[gi * gs + k] = static_cast<uint8_t>(best_q[k]);
      sp[gi] = best_s, mp[gi] = best_m;
    }
  });
  return {q, sc, off};
}
