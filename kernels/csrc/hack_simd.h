// HACK (arXiv 2502.03589) CPU kernels: SIMD helpers (AVX2 + FMA + F16C, scalar fallback).
//
// Rule kept here: every helper that feeds a rounding decision (the on-the-fly 8-bit
// quantization of Q*k_scale and P*v_scale) does the same IEEE fp32 operations, in the same
// order, as the torch reference (kernels/reference.py: floor((x - lo) / s + 0.5), clamped), and
// the build disables FP contraction, so codes match the reference bit for bit for equal input.
// Integer code products are exact (int16 x int16 -> int32, or fp32 on integers < 2^24).
#pragma once
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HACK_AVX2 1
#else
#define HACK_AVX2 0
#endif

namespace hack {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float h2f(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline float bf2f(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// n 16-bit floats (bf16 if BF16 else fp16) -> fp32
template <bool BF16>
inline void cvt16(const uint16_t* src, float* dst, int n) {
  int i = 0;
#if HACK_AVX2
  for (; i + 8 <= n; i += 8) {
    __m128i x = _mm_loadu_si128((const __m128i*)(src + i));
    __m256 f = BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16))
                    : _mm256_cvtph_ps(x);
    _mm256_storeu_ps(dst + i, f);
  }
#endif
  for (; i < n; ++i) dst[i] = BF16 ? bf2f(src[i]) : h2f(src[i]);
}

#if HACK_AVX2
// 32 channels [c, c + 32) of one token's packed codes -> u8 codes of channels c..c+15, c+16..c+31
inline void unpack32(const uint8_t* src, int bits, int c, __m128i& lo16, __m128i& hi16) {
  if (bits == 8) {
    lo16 = _mm_loadu_si128((const __m128i*)(src + c));
    hi16 = _mm_loadu_si128((const __m128i*)(src + c + 16));
  } else if (bits == 4) {  // 16 bytes: byte i = channels 2i (low nibble), 2i+1 (high nibble)
    const __m128i m = _mm_set1_epi8(0x0F);
    __m128i x = _mm_loadu_si128((const __m128i*)(src + c / 2));
    __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    lo16 = _mm_unpacklo_epi8(lo, hi);
    hi16 = _mm_unpackhi_epi8(lo, hi);
  } else {                 // 8 bytes: byte i = channels 4i..4i+3 at bits 0, 2, 4, 6
    const __m128i m = _mm_set1_epi8(0x03);
    __m128i x = _mm_loadl_epi64((const __m128i*)(src + c / 4));
    __m128i p0 = _mm_and_si128(x, m), p1 = _mm_and_si128(_mm_srli_epi16(x, 2), m);
    __m128i p2 = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    __m128i p3 = _mm_and_si128(_mm_srli_epi16(x, 6), m);
    __m128i a = _mm_unpacklo_epi8(p0, p1), b = _mm_unpacklo_epi8(p2, p3);
    lo16 = _mm_unpacklo_epi16(a, b);
    hi16 = _mm_unpackhi_epi16(a, b);
  }
}
inline __m256 u8x8_f32(__m128i x) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x)); }
#endif

// One token's packed codes (D * bits / 8 bytes) -> D codes in channel order, as int16.
inline void unpack_i16(const uint8_t* src, int bits, int D, int16_t* dst) {
#if HACK_AVX2
  for (int c = 0; c < D; c += 32) {
    __m128i lo16, hi16;
    unpack32(src, bits, c, lo16, hi16);
    _mm256_storeu_si256((__m256i*)(dst + c), _mm256_cvtepu8_epi16(lo16));
    _mm256_storeu_si256((__m256i*)(dst + c + 16), _mm256_cvtepu8_epi16(hi16));
  }
#else
  const int f = 8 / bits, mask = (1 << bits) - 1;
  for (int d = 0; d < D; ++d) dst[d] = (src[d / f] >> (bits * (d % f))) & mask;
#endif
}

// ... as fp32 (exact integers)
inline void unpack_f32(const uint8_t* src, int bits, int D, float* dst) {
#if HACK_AVX2
  for (int c = 0; c < D; c += 32) {
    __m128i lo16, hi16;
    unpack32(src, bits, c, lo16, hi16);
    _mm256_storeu_ps(dst + c, u8x8_f32(lo16));
    _mm256_storeu_ps(dst + c + 8, u8x8_f32(_mm_srli_si128(lo16, 8)));
    _mm256_storeu_ps(dst + c + 16, u8x8_f32(hi16));
    _mm256_storeu_ps(dst + c + 24, u8x8_f32(_mm_srli_si128(hi16, 8)));
  }
#else
  const int f = 8 / bits, mask = (1 << bits) - 1;
  for (int d = 0; d < D; ++d) dst[d] = float((src[d / f] >> (bits * (d % f))) & mask);
#endif
}

inline void i16_to_f32(const int16_t* src, float* dst, int n) {
  int i = 0;
#if HACK_AVX2
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(
                                  _mm_loadu_si128((const __m128i*)(src + i)))));
#endif
  for (; i < n; ++i) dst[i] = float(src[i]);
}

// 8-bit asymmetric quantization of x[0..n) exactly as reference.quantize_8bit:
// s = (hi - lo) / 255, codes = clamp(floor((x - lo) / (s > 0 ? s : 1) + 0.5), 0, 255) (fp32).
inline void quant8(const float* x, int n, float& s, float& lo, float* codes) {
  float mn = x[0], mx = x[0];
  int i = 0;
#if HACK_AVX2
  if (n >= 8) {
    __m256 vmn = _mm256_loadu_ps(x), vmx = vmn;
    for (i = 8; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
    }
    alignas(32) float a[8], b[8];
    _mm256_store_ps(a, vmn);
    _mm256_store_ps(b, vmx);
    mn = a[0], mx = b[0];
    for (int j = 1; j < 8; ++j) mn = std::min(mn, a[j]), mx = std::max(mx, b[j]);
  }
#endif
  for (; i < n; ++i) mn = std::min(mn, x[i]), mx = std::max(mx, x[i]);
  lo = mn;
  s = (mx - mn) / 255.0f;
  const float safe = s > 0 ? s : 1.0f;
  i = 0;
#if HACK_AVX2
  const __m256 vlo = _mm256_set1_ps(lo), vs = _mm256_set1_ps(safe), half = _mm256_set1_ps(0.5f);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vlo), vs);
    v = _mm256_floor_ps(_mm256_add_ps(v, half));
    _mm256_storeu_ps(codes + i, _mm256_min_ps(_mm256_max_ps(v, zero), top));
  }
#endif
  for (; i < n; ++i)
    codes[i] = std::min(std::max(std::floor((x[i] - lo) / safe + 0.5f), 0.0f), 255.0f);
}

inline float dot_f32(const float* a, const float* b, int n) {
  int i = 0;
  float r = 0.f;
#if HACK_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(acc0, acc1));
  for (int j = 0; j < 8; ++j) r += t[j];
#endif
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// y[0..n) = y * alpha + x * w
inline void axpby(float* y, float alpha, const float* x, float w, int n) {
  int i = 0;
#if HACK_AVX2
  const __m256 va = _mm256_set1_ps(alpha), vw = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), vw,
                                            _mm256_mul_ps(_mm256_loadu_ps(y + i), va)));
#endif
  for (; i < n; ++i) y[i] = y[i] * alpha + x[i] * w;
}

inline void scale_inplace(float* y, float alpha, int n) { axpby(y, alpha, y, 0.0f, n); }

#if HACK_AVX2
// exp for AVX2 (Cephes polynomial, ~1 ulp on the range that matters here)
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// p[i] = s[i] == -inf ? 0 : exp(s[i] - m); returns sum(p). m is finite.
inline float exp_shift(const float* s, float m, float* p, int n) {
  int i = 0;
  float sum = 0.f;
#if HACK_AVX2
  const __m256 vm = _mm256_set1_ps(m), ninf = _mm256_set1_ps(NEG_INF);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(s + i);
    __m256 e = exp256(_mm256_sub_ps(v, vm));
    e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), e);
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int j = 0; j < 8; ++j) sum += t[j];
#endif
  for (; i < n; ++i) {
    p[i] = s[i] == NEG_INF ? 0.f : std::exp(s[i] - m);
    sum += p[i];
  }
  return sum;
}

// out[j] = sum_c a[c] * k[j * D + c] for 8 consecutive tokens j (int16 codes, exact int32)
inline void kdot8(const int16_t* a, const int16_t* k, int D, int32_t* out) {
#if HACK_AVX2
  __m256i acc[8];
  for (int j = 0; j < 8; ++j) {
    __m256i s = _mm256_setzero_si256();
    for (int c = 0; c < D; c += 16)
      s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(a + c)),
                                                _mm256_loadu_si256((const __m256i*)(k + j * D + c))));
    acc[j] = s;
  }
  __m256i t0 = _mm256_hadd_epi32(acc[0], acc[1]), t1 = _mm256_hadd_epi32(acc[2], acc[3]);
  __m256i t2 = _mm256_hadd_epi32(acc[4], acc[5]), t3 = _mm256_hadd_epi32(acc[6], acc[7]);
  __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  __m256i r = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                               _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256((__m256i*)out, r);
#else
  for (int j = 0; j < 8; ++j) {
    int32_t s = 0;
    for (int c = 0; c < D; ++c) s += int32_t(a[c]) * int32_t(k[j * D + c]);
    out[j] = s;
  }
#endif
}

// Scores of one row over n tokens (n % 8 == 0): s = (s_a * dot + m_a * ksum) + qkm, the
// reference's operation order; tokens at kpos > qpos or kpos < lo_mask are -inf. Returns max.
inline float scores(const int32_t* dots, const float* ksum, float s_a, float m_a, float qkm,
                    int kpos0, int qpos, int lo_mask, float* s, int n) {
  float mx = NEG_INF;
  const bool need_mask = kpos0 + n - 1 > qpos || kpos0 < lo_mask;
#if HACK_AVX2
  const __m256 va = _mm256_set1_ps(s_a), vm = _mm256_set1_ps(m_a), vq = _mm256_set1_ps(qkm);
  const __m256 ninf = _mm256_set1_ps(NEG_INF);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vqp = _mm256_set1_epi32(qpos), vlo = _mm256_set1_epi32(lo_mask);
  __m256 vmx = ninf;
  for (int t = 0; t < n; t += 8) {
    __m256 f = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(dots + t)));
    __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(va, f),
                                           _mm256_mul_ps(vm, _mm256_loadu_ps(ksum + t))), vq);
    if (need_mask) {
      __m256i kp = _mm256_add_epi32(_mm256_set1_epi32(kpos0 + t), iota);
      __m256i bad = _mm256_or_si256(_mm256_cmpgt_epi32(kp, vqp), _mm256_cmpgt_epi32(vlo, kp));
      v = _mm256_blendv_ps(v, ninf, _mm256_castsi256_ps(bad));
    }
    _mm256_storeu_ps(s + t, v);
    vmx = _mm256_max_ps(vmx, v);
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, vmx);
  for (int j = 0; j < 8; ++j) mx = std::max(mx, tmp[j]);
#else
  for (int t = 0; t < n; ++t) {
    const int kp = kpos0 + t;
    s[t] = (need_mask && (kp > qpos || kp < lo_mask)) ? NEG_INF
                                                     : (s_a * float(dots[t]) + m_a * ksum[t]) + qkm;
    mx = std::max(mx, s[t]);
  }
#endif
  return mx;
}

// out[c] = sum_t w[t] * x[t * stride + c], c < 32 (exact: integer values below 2^24)
inline void wsum32(const float* x, int stride, const float* w, int n, float* out) {
#if HACK_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int t = 0; t < n; ++t) {
    const __m256 wt = _mm256_broadcast_ss(w + t);
    const float* r = x + size_t(t) * stride;
    a0 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r), a0);
    a1 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 8), a1);
    a2 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 16), a2);
    a3 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 24), a3);
  }
  _mm256_storeu_ps(out, a0);
  _mm256_storeu_ps(out + 8, a1);
  _mm256_storeu_ps(out + 16, a2);
  _mm256_storeu_ps(out + 24, a3);
#else
  for (int c = 0; c < 32; ++c) out[c] = 0.f;
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < 32; ++c) out[c] += w[t] * x[size_t(t) * stride + c];
#endif
}

}  // namespace hack
