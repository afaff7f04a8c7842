// HACK (arXiv 2502.03589) CPU kernels: the per-row float steps (on-the-fly 8-bit quantization,
// scores, exp, dots), AVX2 / AVX-512 with a scalar fallback.
//
// Rule: every step that feeds a rounding decision (the 8-bit codes of Q * k_scale and
// P * v_scale) does the same IEEE fp32 operations, in the same order, as the torch reference
// (kernels/reference.py: floor((x - lo) / s + 0.5), clamped), and the build disables FP
// contraction, so codes match the reference bit for bit for equal input. The AVX-512 loops do
// the AVX2 loops' operations on 16 lanes (min / max are exact, sums keep the 8-lane order), so
// both builds give the same bits.
#pragma once
#include "hack_simd.h"

namespace hack {

#if HACK_AVX512
// quant8's code of 16 values: clamp(floor((x - lo) / s + 0.5), 0, 255)
inline __m512 code16(__m512 x, __m512 lo, __m512 s) {
  const __m512 v = _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(x, lo), s), _mm512_set1_ps(0.5f));
  const __m512 f = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_min_ps(_mm512_max_ps(f, _mm512_setzero_ps()), _mm512_set1_ps(255.0f));
}
#endif

// 8-bit asymmetric quantization of x[0..n) exactly as reference.quantize_8bit:
// s = (hi - lo) / 255, codes = clamp(floor((x - lo) / (s > 0 ? s : 1) + 0.5), 0, 255) (fp32).
inline void quant8(const float* x, int n, float& s, float& lo, float* codes) {
  float mn = x[0], mx = x[0];
  int i = 0;
#if HACK_AVX512
  if (n >= 16) {
    __m512 vmn = _mm512_loadu_ps(x), vmx = vmn;
    for (i = 16; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      vmn = _mm512_min_ps(vmn, v);
      vmx = _mm512_max_ps(vmx, v);
    }
    mn = _mm512_reduce_min_ps(vmn), mx = _mm512_reduce_max_ps(vmx);
  }
#elif HACK_AVX2
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
#if HACK_AVX512
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(codes + i, code16(_mm512_loadu_ps(x + i), _mm512_set1_ps(lo),
                                       _mm512_set1_ps(safe)));
#endif
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

// quant8 of x[i] * y[i] (n <= 128), the products kept in registers: the same codes as
// computing x * y into memory and calling quant8 (the store and reload of the products stalls
// on store forwarding when the loop that wrote them used narrower vectors).
inline void quant8_mul(const float* x, const float* y, int n, float& s, float& lo, float* codes,
                       float* tmp) {
#if HACK_AVX512
  if (n % 16 == 0 && n <= 128) {
    __m512 v[8];
    const int k = n / 16;
    for (int j = 0; j < k; ++j)
      v[j] = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * j), _mm512_loadu_ps(y + 16 * j));
    __m512 vmn = v[0], vmx = v[0];
    for (int j = 1; j < k; ++j) vmn = _mm512_min_ps(vmn, v[j]), vmx = _mm512_max_ps(vmx, v[j]);
    lo = _mm512_reduce_min_ps(vmn);
    s = (_mm512_reduce_max_ps(vmx) - lo) / 255.0f;
    const __m512 vlo = _mm512_set1_ps(lo), vs = _mm512_set1_ps(s > 0 ? s : 1.0f);
    for (int j = 0; j < k; ++j) _mm512_storeu_ps(codes + 16 * j, code16(v[j], vlo, vs));
    return;
  }
#endif
  for (int i = 0; i < n; ++i) tmp[i] = x[i] * y[i];
  quant8(tmp, n, s, lo, codes);
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

// exp (Cephes polynomial, ~1 ulp on the range that matters here), one body for both widths:
// W = 256 (AVX2) or 512 (AVX-512), the same operations per lane.
#define HACK_EXP_BODY(W, FLOOR, AS_PS)                                                        \
  x = _mm##W##_min_ps(x, _mm##W##_set1_ps(88.3762626647949f));                               \
  x = _mm##W##_max_ps(x, _mm##W##_set1_ps(-88.3762626647949f));                              \
  auto fx = FLOOR(_mm##W##_fmadd_ps(x, _mm##W##_set1_ps(1.44269504088896341f),               \
                                    _mm##W##_set1_ps(0.5f)));                                 \
  x = _mm##W##_fnmadd_ps(fx, _mm##W##_set1_ps(0.693359375f), x);                             \
  x = _mm##W##_fnmadd_ps(fx, _mm##W##_set1_ps(-2.12194440e-4f), x);                          \
  const auto z = _mm##W##_mul_ps(x, x);                                                      \
  auto y = _mm##W##_set1_ps(1.9875691500E-4f);                                               \
  y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(1.3981999507E-3f));                          \
  y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(8.3334519073E-3f));                          \
  y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(4.1665795894E-2f));                          \
  y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(1.6666665459E-1f));                          \
  y = _mm##W##_fmadd_ps(y, x, _mm##W##_set1_ps(5.0000001201E-1f));                          \
  y = _mm##W##_fmadd_ps(y, z, _mm##W##_add_ps(x, _mm##W##_set1_ps(1.0f)));                  \
  return _mm##W##_mul_ps(y, AS_PS(_mm##W##_slli_epi32(                                       \
      _mm##W##_add_epi32(_mm##W##_cvttps_epi32(fx), _mm##W##_set1_epi32(127)), 23)))

#if HACK_AVX2
inline __m256 exp256(__m256 x) { HACK_EXP_BODY(256, _mm256_floor_ps, _mm256_castsi256_ps); }
#endif
#if HACK_AVX512
inline __m512 floor512(__m512 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
inline __m512 exp512(__m512 x) { HACK_EXP_BODY(512, floor512, _mm512_castsi512_ps); }
#endif
#undef HACK_EXP_BODY

// p[i] = s[i] == -inf ? 0 : exp(s[i] - m); returns sum(p). m is finite.
inline float exp_shift(const float* s, float m, float* p, int n) {
  int i = 0;
  float sum = 0.f;
#if HACK_AVX2
  const __m256 vm = _mm256_set1_ps(m), ninf = _mm256_set1_ps(NEG_INF);
  __m256 acc = _mm256_setzero_ps();
#if HACK_AVX512
  const __m512 wm = _mm512_set1_ps(m), wninf = _mm512_set1_ps(NEG_INF);
  for (; i + 16 <= n; i += 16) {  // 8-lane sums in the AVX2 loop's order
    const __m512 v = _mm512_loadu_ps(s + i);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, wninf, _CMP_NEQ_UQ),
                                         exp512(_mm512_sub_ps(v, wm)));
    _mm512_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
    acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
  }
#endif
  for (; i < n; i += 8) {  // the last block masked (short rows: sinks, the open partition)
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - i),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 v = _mm256_maskload_ps(s + i, live);
    __m256 e = exp256(_mm256_sub_ps(v, vm));
    e = _mm256_and_ps(e, _mm256_castsi256_ps(live));
    e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), e);
    _mm256_maskstore_ps(p + i, live, e);
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
inline float scores(const int32_t* dots, const int16_t* ksum, float s_a, float m_a, float qkm,
                    int kpos0, int qpos, int lo_mask, float* s, int n) {
  float mx = NEG_INF;
  const bool need_mask = kpos0 + n - 1 > qpos || kpos0 < lo_mask;
  int t = 0;
#if HACK_AVX512
  {
  const __m512 va = _mm512_set1_ps(s_a), vm = _mm512_set1_ps(m_a), vq = _mm512_set1_ps(qkm);
  const __m512 ninf = _mm512_set1_ps(NEG_INF);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vqp = _mm512_set1_epi32(qpos), vlo = _mm512_set1_epi32(lo_mask);
  __m512 vmx = ninf;
  for (; t + 16 <= n; t += 16) {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_loadu_si512(dots + t));
    __m512 v = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(va, f),
                                           _mm512_mul_ps(vm, _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(
                                               _mm256_loadu_si256((const __m256i*)(ksum + t)))))),
                              vq);
    if (need_mask) {
      const __m512i kp = _mm512_add_epi32(_mm512_set1_epi32(kpos0 + t), iota);
      const __mmask16 bad = _mm512_cmpgt_epi32_mask(kp, vqp) | _mm512_cmpgt_epi32_mask(vlo, kp);
      v = _mm512_mask_mov_ps(v, bad, ninf);
    }
    _mm512_storeu_ps(s + t, v);
    vmx = _mm512_max_ps(vmx, v);
  }
  mx = _mm512_reduce_max_ps(vmx);
  }
#endif
#if HACK_AVX2
  const __m256 va = _mm256_set1_ps(s_a), vm = _mm256_set1_ps(m_a), vq = _mm256_set1_ps(qkm);
  const __m256 ninf = _mm256_set1_ps(NEG_INF);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vqp = _mm256_set1_epi32(qpos), vlo = _mm256_set1_epi32(lo_mask);
  __m256 vmx = ninf;
  for (; t < n; t += 8) {
    __m256 f = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(dots + t)));
    __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(va, f),
                                           _mm256_mul_ps(vm, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(
                                               _mm_loadu_si128((const __m128i*)(ksum + t)))))),
                              vq);
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
  for (; t < n; ++t) {
    const int kp = kpos0 + t;
    s[t] = (need_mask && (kp > qpos || kp < lo_mask))
               ? NEG_INF : (s_a * float(dots[t]) + m_a * float(ksum[t])) + qkm;
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
