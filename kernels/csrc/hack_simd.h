// HACK (arXiv 2502.03589) CPU kernels: ISA detection and the load / store helpers (16-bit
// floats, packed codes), AVX2 + FMA + F16C with a scalar fallback; the per-row float steps are
// in hack_rowops.h.
//
// Rule kept here: conversions are exact (codes, 16-bit floats to fp32) or round as c10 does
// (fp32 to bf16 / fp16 outputs). Integer code products are exact (int16 x int16 -> int32, or
// fp32 on integers < 2^24).
#pragma once
#include <c10/util/BFloat16.h>
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
// AVX-512: the same per-lane operations on 16 lanes (results equal the AVX2 loops bit for bit:
// element-wise ops are identical, min / max are exact, sums keep the 8-lane order).
#if HACK_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define HACK_AVX512 1
#else
#define HACK_AVX512 0
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

// dst[i] = float(src[i]) * scale; src fp32 (type 0), bf16 (1) or fp16 (2)
inline void load_scaled(const void* src, int type, float scale, float* dst, int n) {
  int i = 0;
#if HACK_AVX2
  const __m256 vs = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    __m256 f;
    if (type == 0) f = _mm256_loadu_ps(static_cast<const float*>(src) + i);
    else {
      const __m128i x = _mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(src) + i));
      f = type == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16))
                    : _mm256_cvtph_ps(x);
    }
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(f, vs));
  }
#endif
  for (; i < n; ++i) {
    const float x = type == 0 ? static_cast<const float*>(src)[i]
                  : type == 1 ? bf2f(static_cast<const uint16_t*>(src)[i])
                              : h2f(static_cast<const uint16_t*>(src)[i]);
    dst[i] = x * scale;
  }
}

// dst[i] = acc[i] / l as fp32 (type 0), bf16 (1, round to nearest even, as c10::BFloat16) or
// fp16 (2, as c10::Half)
inline void store_scaled(const float* acc, float l, int type, void* dst, int n) {
  int i = 0;
#if HACK_AVX2
  const __m256 vl = _mm256_set1_ps(l);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(acc + i), vl);
    if (type == 0) { _mm256_storeu_ps(static_cast<float*>(dst) + i, x); continue; }
    __m128i h;
    if (type == 2) h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    else {  // u + 0x7FFF + ((u >> 16) & 1), high half; NaN -> 0x7FC0
      const __m256i u = _mm256_castps_si256(x);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
      r = _mm256_srli_epi32(r, 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    _mm_storeu_si128((__m128i*)(static_cast<uint16_t*>(dst) + i), h);
  }
#endif
  for (; i < n; ++i) {
    const float x = acc[i] / l;
    if (type == 0) static_cast<float*>(dst)[i] = x;
    else if (type == 1) static_cast<c10::BFloat16*>(dst)[i] = c10::BFloat16(x);
    else static_cast<c10::Half*>(dst)[i] = c10::Half(x);
  }
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

}  // namespace hack
