// HACK (arXiv 2502.03589) CPU kernel: AVX2 integer code products for 4- and 2-bit KV.
//
// Rule: the homomorphic products need a'.kcode_t (over channels) and b'.vcode[:, c] (over the
// Π tokens of a partition) with a', b' the on-the-fly 8-bit codes (0..255) and KV codes below
// 16. Both run on u8 x s8 multiply-adds (_mm256_maddubs_epi16: pair sums <= 2 * 255 * 15 fit
// int16 exactly), widened to int32 before they could overflow: exact, like the reference's
// fp32 matmuls on integers. K codes are split once per partition into bit planes (mask and
// shift of the packed bytes, no reordering), and a' is permuted once per row to match, so a
// K dot is F = 8 / bits maddubs per 32 packed bytes; V codes go to token pairs interleaved
// per channel, u8 [Π/2][D][2], so one maddubs adds two tokens.
#pragma once
#include "hack_simd.h"

#if HACK_AVX2
namespace hack {

// K codes of one partition (Π rows of RB packed bytes, contiguous) -> bit planes: for each
// 32-byte chunk v of the packed bytes, f = 8 / bits planes of 32 u8 codes, plane j holding the
// field at bits [j * bits, (j + 1) * bits) of every byte (no reordering across channels).
inline void unpack_k_planes(const uint8_t* kcodes, int bits, int Pi, int RB, uint8_t* planes) {
  const int f = 8 / bits, n = Pi * RB / 32;
  const __m256i m = _mm256_set1_epi8(char((1 << bits) - 1));
  for (int v = 0; v < n; ++v) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)(kcodes + 32 * v));
    for (int j = 0; j < f; ++j)
      _mm256_storeu_si256((__m256i*)(planes + (v * f + j) * 32),
                          _mm256_and_si256(_mm256_srli_epi16(x, j * bits), m));
  }
}

// a' (u8 [D]) in the plane order: for chunk r < max(RB, 32) / 32 and plane j, byte i is the
// channel of field j of packed byte (32 r + i) % RB, i.e. a'[f * ((32 r + i) % RB) + j].
template <int BITS, int RB>
inline void a_planes(const uint8_t* a8, uint8_t* ap) {
  constexpr int F = 8 / BITS, NREP = RB >= 32 ? RB / 32 : 1, W = RB < 32 ? RB : 32;
  alignas(32) uint8_t t[F][RB];
  for (int k = 0; k < RB; ++k)
    for (int j = 0; j < F; ++j) t[j][k] = a8[F * k + j];
  for (int r = 0; r < NREP; ++r)
    for (int j = 0; j < F; ++j)
      for (int i = 0; i < 32; i += W) std::memcpy(ap + (r * F + j) * 32 + i, &t[j][32 * r % RB], W);
}

// dots[t] = a'.kcode_t for the Π tokens of a partition from its planes (unpack_k_planes) and
// a_planes; 8 tokens = 8 RB / 32 chunks. Exact: an int16 lane holds F pair products,
// <= 2 F 255 qmax < 2^15, then int32.
template <int BITS, int RB>
inline void kdot_planes(const uint8_t* ap, const uint8_t* planes, int Pi, int32_t* dots) {
  constexpr int F = 8 / BITS, NV = RB / 4, NREP = RB >= 32 ? RB / 32 : 1;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int t0 = 0; t0 < Pi; t0 += 8) {
    const uint8_t* pl = planes + size_t(t0) * RB * F;
    __m256i s[NV];
    for (int v = 0; v < NV; ++v) {
      const uint8_t* a = ap + (v % NREP) * F * 32;
      const uint8_t* p = pl + v * F * 32;
      __m256i x = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)a),
                                       _mm256_loadu_si256((const __m256i*)p));
      for (int j = 1; j < F; ++j)
        x = _mm256_add_epi16(x, _mm256_maddubs_epi16(
                                    _mm256_loadu_si256((const __m256i*)(a + j * 32)),
                                    _mm256_loadu_si256((const __m256i*)(p + j * 32))));
      s[v] = _mm256_madd_epi16(x, ones);
    }
    __m256i r;
    if constexpr (RB == 8) {         // s[v]: tokens 4v, 4v+1 | 4v+2, 4v+3, two int32 each
      r = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(s[0], s[1]),
                                      _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
    } else if constexpr (RB == 16) { // s[v]: token 2v | token 2v+1, four int32 each
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]),
                                          _mm256_hadd_epi32(s[2], s[3]));
      r = _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    } else {                         // RB 32: s[t] is token t; RB 64: s[2t] + s[2t + 1]
      __m256i u[8];
      for (int t = 0; t < 8; ++t)
        u[t] = RB == 64 ? _mm256_add_epi32(s[2 * t], s[(2 * t + 1) % NV]) : s[t];
      const __m256i t0 = _mm256_hadd_epi32(u[0], u[1]), t1 = _mm256_hadd_epi32(u[2], u[3]);
      const __m256i t2 = _mm256_hadd_epi32(u[4], u[5]), t3 = _mm256_hadd_epi32(u[6], u[7]);
      const __m256i w0 = _mm256_hadd_epi32(t0, t1), w1 = _mm256_hadd_epi32(t2, t3);
      r = _mm256_add_epi32(_mm256_permute2x128_si256(w0, w1, 0x20),
                           _mm256_permute2x128_si256(w0, w1, 0x31));
    }
    _mm256_storeu_si256((__m256i*)(dots + t0), r);
  }
}

// One row's K dots on a partition: a' (u8 [D]) -> dots[0..Π), for bits 4/2 and D 32/64/128.
inline void kdots_lowbit(int bits, int D, const uint8_t* a8, uint8_t* ap,
                         const uint8_t* planes, int Pi, int32_t* dots) {
#define HACK_KD(B, RB) a_planes<B, RB>(a8, ap), kdot_planes<B, RB>(ap, planes, Pi, dots)
  const int rb = D * bits / 8;
  if (bits == 4) {
    if (rb == 16) HACK_KD(4, 16); else if (rb == 32) HACK_KD(4, 32); else HACK_KD(4, 64);
  } else {
    if (rb == 8) HACK_KD(2, 8); else if (rb == 16) HACK_KD(2, 16); else HACK_KD(2, 32);
  }
#undef HACK_KD
}

// V codes of one partition -> token pairs, u8 [Π/2][D][2]: byte 2k, 2k+1 of a pair row are
// tokens t, t+1 of one channel. 2 bits: channels in order. 4 bits: per 32-channel group the
// nibble planes of the packed bytes, channels 0, 2, .., 14, 16, .., 30 then 1, 3, .., 31
// (vdot32_u8<true> puts them back in order).
inline void unpack_v_pairs(const uint8_t* vcodes, int bits, int D, int Pi, int row,
                           uint8_t* vp) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int t = 0; t < Pi; t += 2) {
    uint8_t* dst = vp + size_t(t / 2) * D * 2;
    const uint8_t *x0 = vcodes + t * row, *x1 = x0 + row;
    for (int c = 0; c < D; c += 32) {
      if (bits == 4) {
        const __m128i a = _mm_loadu_si128((const __m128i*)(x0 + c / 2));
        const __m128i b = _mm_loadu_si128((const __m128i*)(x1 + c / 2));
        const __m256i z = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_unpacklo_epi8(a, b)), _mm_unpackhi_epi8(a, b), 1);
        _mm256_storeu_si256((__m256i*)(dst + 2 * c), _mm256_and_si256(z, m4));
        _mm256_storeu_si256((__m256i*)(dst + 2 * c + 32),
                            _mm256_and_si256(_mm256_srli_epi16(z, 4), m4));
        continue;
      }
      __m128i lo0, hi0, lo1, hi1;
      unpack32(x0, bits, c, lo0, hi0);
      unpack32(x1, bits, c, lo1, hi1);
      _mm_storeu_si128((__m128i*)(dst + 2 * c), _mm_unpacklo_epi8(lo0, lo1));
      _mm_storeu_si128((__m128i*)(dst + 2 * c + 16), _mm_unpackhi_epi8(lo0, lo1));
      _mm_storeu_si128((__m128i*)(dst + 2 * c + 32), _mm_unpacklo_epi8(hi0, hi1));
      _mm_storeu_si128((__m128i*)(dst + 2 * c + 48), _mm_unpackhi_epi8(hi0, hi1));
    }
  }
}

// out[c] = sum_t b[t] * vcode[t][c0 + c], c < 32 (one V group), from the pair layout vp
// (NIB: the 4-bit plane order). int16 partial sums take at most 4 token pairs
// (4 * 2 * 255 * 15 < 2^15), then widen.
template <bool NIB>
inline void vdot32_u8(const uint8_t* vp, int D, int c0, const uint8_t* b, int Pi, float* out) {
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (int t0 = 0; t0 < Pi; t0 += 8) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (int t = t0; t < t0 + 8; t += 2) {
      const uint8_t* src = vp + size_t(t / 2) * D * 2 + 2 * c0;
      int16_t pair;
      std::memcpy(&pair, b + t, 2);  // b[t] | b[t + 1] << 8
      const __m256i bb = _mm256_set1_epi16(pair);
      s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(bb, _mm256_loadu_si256((const __m256i*)src)));
      s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(
                                    bb, _mm256_loadu_si256((const __m256i*)(src + 32))));
    }
    if (NIB) {  // s0: channels [0, 2, .., 14 | 16, .., 30], s1: the odd ones
      const __m256i u0 = _mm256_unpacklo_epi16(s0, s1), u1 = _mm256_unpackhi_epi16(s0, s1);
      s0 = _mm256_permute2x128_si256(u0, u1, 0x20);  // [0..7 | 8..15]
      s1 = _mm256_permute2x128_si256(u0, u1, 0x31);  // [16..23 | 24..31]
    }
    // s0 lanes: channels [0..7 | 8..15], s1: 16..31
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
