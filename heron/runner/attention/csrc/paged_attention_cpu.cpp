// Paged attention for decode rows on CPU: reads K/V blocks in place (no gathered copy),
// online softmax in float32, one work item per (request, kv head) in torch's thread pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
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

template <typename T>
void decode_kernel(const T* q, const T* kv, const int64_t* block_tables, const int64_t* seq_lens, T* out,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t num_blocks, int64_t bs,
                   int64_t max_blocks, int64_t window, float scale) {
  const int64_t G = Hq / Hkv;
  const int64_t v_offset = num_blocks * bs * Hkv * D;  // kv[1] starts here
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
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / l[g];
        T* o = out + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}


#if defined(__AVX512F__)
// bf16 fast path: keys/values are converted in registers (no float copy of the block), each
// key is loaded once for all G query heads of its group, and D is a multiple of 16.
inline __m512 load_bf16x16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

constexpr int kMaxG = 16;

void decode_kernel_bf16_avx512(const c10::BFloat16* q, const c10::BFloat16* kv, const int64_t* block_tables,
                               const int64_t* seq_lens, c10::BFloat16* out, int64_t B, int64_t Hq, int64_t Hkv,
                               int64_t D, int64_t num_blocks, int64_t bs, int64_t max_blocks, int64_t window,
                               float scale) {
  const int64_t G = Hq / Hkv;
  const int64_t v_offset = num_blocks * bs * Hkv * D;
  const int64_t row_stride = Hkv * D;  // between consecutive tokens of one block
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores(G * bs);
    float m[kMaxG], l[kMaxG];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t seq_len = seq_lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
      for (int64_t g = 0; g < G; ++g) {
        const c10::BFloat16* qrow = q + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(qrow[d]) * scale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t* table = block_tables + b * max_blocks;
      for (int64_t blk = start / bs; blk * bs < seq_len; ++blk) {
        const int64_t t0 = std::max(blk * bs, start), t1 = std::min((blk + 1) * bs, seq_len);
        const int64_t n = t1 - t0;
        const c10::BFloat16* kbase = kv + ((table[blk] * bs + (t0 - blk * bs)) * Hkv + h) * D;
        const c10::BFloat16* vbase = kbase + v_offset;
        // scores[g][t] = q_g . k_t
        for (int64_t t = 0; t < n; ++t) {
          const c10::BFloat16* krow = kbase + t * row_stride;
          __m512 sum[kMaxG];
          for (int64_t g = 0; g < G; ++g) sum[g] = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 kx = load_bf16x16(krow + d);
            for (int64_t g = 0; g < G; ++g) sum[g] = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[g * D + d]), kx, sum[g]);
          }
          for (int64_t g = 0; g < G; ++g) scores[g * bs + t] = _mm512_reduce_add_ps(sum[g]);
        }
        // online softmax update per head
        for (int64_t g = 0; g < G; ++g) {
          float bmax = m[g];
          for (int64_t t = 0; t < n; ++t) bmax = std::max(bmax, scores[g * bs + t]);
          const float corr = std::exp(m[g] - bmax);
          m[g] = bmax;
          float lsum = l[g] * corr;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(scores[g * bs + t] - bmax);
            scores[g * bs + t] = p;
            lsum += p;
          }
          l[g] = lsum;
          if (corr != 1.f) {
            const __m512 c = _mm512_set1_ps(corr);
            float* a = &acc[g * D];
            for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), c));
          }
        }
        // acc[g] += p[g][t] * v_t, each v chunk loaded once for all heads
        for (int64_t d = 0; d < D; d += 16) {
          __m512 a[kMaxG];
          for (int64_t g = 0; g < G; ++g) a[g] = _mm512_loadu_ps(&acc[g * D + d]);
          for (int64_t t = 0; t < n; ++t) {
            const __m512 vx = load_bf16x16(vbase + t * row_stride + d);
            for (int64_t g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * bs + t]), vx, a[g]);
          }
          for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(&acc[g * D + d], a[g]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / l[g];
        c10::BFloat16* o = out + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<c10::BFloat16>(acc[g * D + d] * inv);
      }
    }
  });
}
#endif

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                           torch::Tensor seq_lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5, "q [B,Hq,D], kv_cache [2,N,bs,Hkv,D]");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_tables.is_contiguous() &&
              seq_lens.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache dtypes differ");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t N = kv_cache.size(1), bs = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && Hq % Hkv == 0, "head shapes do not match");
  auto out = torch::empty_like(q);
  const int64_t max_blocks = block_tables.size(1);
#if defined(__AVX512F__)
  if (q.scalar_type() == at::kBFloat16 && D % 16 == 0 && Hq / Hkv <= kMaxG) {
    decode_kernel_bf16_avx512(q.data_ptr<c10::BFloat16>(), kv_cache.data_ptr<c10::BFloat16>(),
                              block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                              out.data_ptr<c10::BFloat16>(), B, Hq, Hkv, D, N, bs, block_tables.size(1), window,
                              static_cast<float>(scale));
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
