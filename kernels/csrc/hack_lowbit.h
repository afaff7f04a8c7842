// HACK (arXiv 2502.03589) CPU kernel: AVX2 integer code products for 4- and 2-bit KV.
//
// Rule: the homomorphic products need a'.kcode_t (over channels) and b'.vcode[:, c] (over the
// Π tokens of a partition) with a', b' the on-the-fly 8-bit codes (0..255) and KV codes below
// 16. Both run on u8 x s8 multiply-adds (_mm256_maddubs_epi16: pair sums <= 2 * 255 * 15 fit
// int16 exactly), widened to int32 before they could overflow: exact, like the reference's
// fp32 matmuls on integers. K codes are unpacked once per partition to u8 [Π][D]; V codes to
// token pairs interleaved per channel, u8 [Π/2][D][2], so one maddubs adds two tokens.
#pragma once
#include "hack_simd.h"

#if HACK_AVX2
namespace hack {

// Unpack one partition's K codes to kc [Π][D] and V codes to vp [Π/2][D][2] (u8).
inline void unpack_partition_lowbit(const uint8_t* kcodes, const uint8_t* vcodes, int bits,
                                    int D, int Pi, int row, uint8_t* kc, uint8_t* vp) {
  for (int t = 0; t < Pi; ++t)
    for (int c = 0; c < D; c += 32) {
      __m128i lo, hi;
      unpack32(kcodes + t * row, bits, c, lo, hi);
      _mm_storeu_si128((__m128i*)(kc + t * D + c), lo);
      _mm_storeu_si128((__m128i*)(kc + t * D + c + 16), hi);
    }
  for (int t = 0; t < Pi; t += 2) {
    uint8_t* dst = vp + size_t(t / 2) * D * 2;
    for (int c = 0; c < D; c += 32) {
      __m128i lo0, hi0, lo1, hi1;
      unpack32(vcodes + t * row, bits, c, lo0, hi0);
      unpack32(vcodes + (t + 1) * row, bits, c, lo1, hi1);
      _mm_storeu_si128((__m128i*)(dst + 2 * c), _mm_unpacklo_epi8(lo0, lo1));
      _mm_storeu_si128((__m128i*)(dst + 2 * c + 16), _mm_unpackhi_epi8(lo0, lo1));
      _mm_storeu_si128((__m128i*)(dst + 2 * c + 32), _mm_unpacklo_epi8(hi0, hi1));
      _mm_storeu_si128((__m128i*)(dst + 2 * c + 48), _mm_unpackhi_epi8(hi0, hi1));
    }
  }
}

// out[j] = sum_c a[c] * k[j * D + c] for 8 tokens; a: u8 codes (0..255), k: u8 codes < 16
inline void kdot8_u8(const uint8_t* a, const uint8_t* k, int D, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[8];
  for (int j = 0; j < 8; ++j) {
    __m256i s = _mm256_setzero_si256();
    for (int c = 0; c < D; c += 32) {
      __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)(a + c)),
                                       _mm256_loadu_si256((const __m256i*)(k + j * D + c)));
      s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
    }
    acc[j] = s;
  }
  __m256i t0 = _mm256_hadd_epi32(acc[0], acc[1]), t1 = _mm256_hadd_epi32(acc[2], acc[3]);
  __m256i t2 = _mm256_hadd_epi32(acc[4], acc[5]), t3 = _mm256_hadd_epi32(acc[6], acc[7]);
  __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  _mm256_storeu_si256((__m256i*)out,
                      _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                                       _mm256_permute2x128_si256(u0, u1, 0x31)));
}

// out[c] = sum_t b[t] * vcode[t][c0 + c], c < 32 (one V group), from the pair layout vp.
// int16 partial sums take at most 4 token pairs (4 * 2 * 255 * 15 < 2^15), then widen.
inline void vdot32_u8(const uint8_t* vp, int D, int c0, const uint8_t* b, int Pi, float* out) {
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (int t0 = 0; t0 < Pi; t0 += 8) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (int t = t0; t < t0 + 8; t += 2) {
      const uint8_t* src = vp + size_t(t / 2) * D * 2 + 2 * c0;
      const __m256i bb = _mm256_set1_epi16(int16_t(b[t] | (b[t + 1] << 8)));
      s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(bb, _mm256_loadu_si256((const __m256i*)src)));
      s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(
                                    bb, _mm256_loadu_si256((const __m256i*)(src + 32))));
    }
    // s0 lanes: channels [0..7 | 8..15] (the pair layout keeps channel order), s1: 16..31
    acc0 = _mm256_add_epi32(acc0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s0)));
    acc1 = _mm256_add_epi32(acc1, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s0, 1)));
    acc2 = _mm256_add_epi32(acc2, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s1)));
    acc3 = _mm256_add_epi32(acc3, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s1, 1)));
  }
  _mm256_storeu_ps(out, _mm256_cvtepi32_ps(acc0));
  _mm256_storeu_ps(out + 8, _mm256_cvtepi32_ps(acc1));
  _mm256_storeu_ps(out + 16, _mm256_cvtepi32_ps(acc2));
  _mm256_storeu_ps(out + 24, _mm256_cvtepi32_ps(acc3));
}

// fp32 integer-valued codes (0..255) -> u8
inline void f32_to_u8(const float* x, int n, uint8_t* out) {
  for (int i = 0; i < n; i += 8) {
    __m256i v = _mm256_cvttps_epi32(_mm256_loadu_ps(x + i));
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i*)(out + i), _mm_packus_epi16(w, w));
  }
}

}  // namespace hack
#endif
