// HACK (arXiv 2502.03589) CPU kernel: AVX-512 VNNI code products for 4- and 8-bit KV.
//
// Rule: the same exact integer products as hack_lowbit.h / the 8-bit int16 path (a'.kcode_t
// over the channels, b'.vcode[:, c] over the Π tokens of a partition), on vpdpbusd (u8 x s8, 4
// products summed into an int32 lane, no saturation). The KV codes (0..15 / 0..255) are the
// unsigned operand and the on-the-fly 8-bit codes, shifted to s8 (x' - 128), the signed one,
// broadcast 4 bytes at a time; the record's cached code sums put the shift back:
// a'.k_t = dp_t + 128 ksum_t and b'.v_c = dp_c + 128 vsum_c. Results equal the AVX2 path's
// bit for bit.
//
// The packed codes are read in place and rearranged in registers, shared by up to 4 query rows:
//   K: per 16-token tile, 16-byte chunk c of a row and dword q of it, a 4x4 dword transpose
//      gives one zmm whose lane t holds that dword of token t; its low (channels 2i) and high
//      (2i + 1) nibbles are two vpdpbusd operands, so a row's dots for 16 tokens take D / 4;
//   V: per V group g and token quad, one vpermb gathers byte i of the group's 16 bytes from
//      the 4 tokens into dword i; low / high nibbles are channels 2i / 2i + 1.
// Requires AVX-512 BW + VNNI + VBMI (Ice Lake, Sapphire Rapids, Zen 4); else the AVX2 paths run.
#pragma once
#include "hack_simd.h"

#if HACK_AVX2 && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define HACK_VNNI 1
namespace hack {
namespace vnni {

// byte `off` .. off + 15 of 4 consecutive rows (`row` bytes apart) -> one zmm, row k in lane k
inline __m512i load4rows(const uint8_t* p, int row, int off) {
  if (row == 16) return _mm512_loadu_si512(p);
  __m512i x = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(p + off)));
  x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i*)(p + row + off)), 1);
  x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i*)(p + 2 * row + off)), 2);
  return _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i*)(p + 3 * row + off)), 3);
}

// 16 fp32 codes 0..255 -> code - 128 as 16 s8 bytes
inline __m128i s8x16(const float* codes) {
  const __m512i c = _mm512_cvttps_epi32(_mm512_loadu_ps(codes));
  return _mm512_cvtepi32_epi8(_mm512_sub_epi32(c, _mm512_set1_epi32(128)));
}

// b' (fp32 codes 0..255, [Π]) -> b' - 128 as s8
inline void b_s8(const float* codes, int Pi, int8_t* bk) {
  for (int t = 0; t < Pi; t += 16) _mm_storeu_si128((__m128i*)(bk + t), s8x16(codes + t));
}

// a' (fp32 codes 0..255, [D]) -> a' - 128 as s8 in the K operand order: 4 bits, byte
// ((c 4 + q) 2 + h) 4 + j is channel 32 c + 2 (4 q + j) + h; 8 bits, channel order.
inline void a_order(const float* codes, int D, int bits, int8_t* ak) {
  if (bits == 8) return b_s8(codes, D, ak);  // 8 bits: channel order
  alignas(64) static const struct Idx {
    uint8_t v[64];
    Idx() {
      for (int o = 0; o < 64; ++o) {
        const int r = o % 32, qh = r / 4, j = r % 4;
        v[o] = uint8_t(32 * (o / 32) + 2 * (4 * (qh / 2) + j) + qh % 2);
      }
    }
  } idx;
  const __m512i ix = _mm512_load_si512(idx.v);
  for (int d = 0; d < D; d += 64) {  // the s8 codes stay in a register (no store / reload)
    __m512i x = _mm512_castsi128_si512(s8x16(codes + d));
    x = _mm512_inserti32x4(x, s8x16(codes + d + 16), 1);
    if (D - d > 32)
      x = _mm512_inserti32x4(_mm512_inserti32x4(x, s8x16(codes + d + 32), 2),
                             s8x16(codes + d + 48), 3);
    _mm512_storeu_si512(ak + d, _mm512_permutexvar_epi8(ix, x));
  }
}

// Several query rows (NR <= 4) at once, straight from the record (no scratch): each tile's
// transposed K and each quad's V codes stay in registers and serve every row.

// dots[r][t] = a'_r.kcode_t, t < Π; ak[r]: a_order of row r; ksum128[t] = 128 ksum_t.
// A row's 16-byte chunk c, dword q holds channels 16 c + 4 q + j (8 bits: one operand) or
// 32 c + 2 (4 q + j) + h in its nibble planes h (4 bits: two operands).
template <int BITS, int NR>
inline void kdots_rows_nr(const uint8_t* kc, int Pi, int row, const int8_t* const* ak,
                          const int32_t* ksum128, int32_t* const* dots) {
  alignas(64) static const int32_t idx[4][16] = {
      {0, 4, 8, 12, 16, 20, 24, 28}, {1, 5, 9, 13, 17, 21, 25, 29},
      {2, 6, 10, 14, 18, 22, 26, 30}, {3, 7, 11, 15, 19, 23, 27, 31}};
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < Pi; t += 16) {
    __m512i acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_loadu_si512(ksum128 + t);
    for (int c = 0; c < row / 16; ++c) {
      __m512i x[4];
      for (int k = 0; k < 4; ++k) x[k] = load4rows(kc + (t + 4 * k) * row, row, 16 * c);
      for (int q = 0; q < 4; ++q) {
        const __m512i ix = _mm512_load_si512(idx[q]);
        const __m512i y = _mm512_inserti64x4(
            _mm512_permutex2var_epi32(x[0], ix, x[1]),
            _mm512_castsi512_si256(_mm512_permutex2var_epi32(x[2], ix, x[3])), 1);
        if constexpr (BITS == 8) {
          for (int r = 0; r < NR; ++r) {
            int32_t w;
            std::memcpy(&w, ak[r] + 4 * (c * 4 + q), 4);
            acc[r] = _mm512_dpbusd_epi32(acc[r], y, _mm512_set1_epi32(w));
          }
        } else {
          const __m512i lo = _mm512_and_si512(y, m4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(y, 4), m4);
          for (int r = 0; r < NR; ++r) {
            int32_t w[2];
            std::memcpy(w, ak[r] + 8 * (c * 4 + q), 8);
            acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(w[0]));
            acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(w[1]));
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) _mm512_storeu_si512(dots[r] + t, acc[r]);
  }
}

template <int BITS>
inline void kdots_rows_b(const uint8_t* kc, int Pi, int row, int nr, const int8_t* const* ak,
                         const int32_t* ksum128, int32_t* const* dots) {
  if (nr == 1) kdots_rows_nr<BITS, 1>(kc, Pi, row, ak, ksum128, dots);
  else if (nr == 2) kdots_rows_nr<BITS, 2>(kc, Pi, row, ak, ksum128, dots);
  else if (nr == 3) kdots_rows_nr<BITS, 3>(kc, Pi, row, ak, ksum128, dots);
  else kdots_rows_nr<BITS, 4>(kc, Pi, row, ak, ksum128, dots);
}

inline void kdots_rows(int bits, const uint8_t* kc, int Pi, int row, int nr,
                       const int8_t* const* ak, const int32_t* ksum128, int32_t* const* dots) {
  if (bits == 8) kdots_rows_b<8>(kc, Pi, row, nr, ak, ksum128, dots);
  else kdots_rows_b<4>(kc, Pi, row, nr, ak, ksum128, dots);
}

// out[r][c] = b'_r.vcode[:, 32 g + c], c < 32 (fp32); bk[r]: b' - 128 (b_s8) of row r. Per
// token quad, vpermb puts byte i of the 4 tokens in dword i: 4 bits, one gather of the group's
// 16 bytes, nibble planes = channels 2 i / 2 i + 1; 8 bits, two gathers = channels i / 16 + i.
template <int BITS, int NR>
inline void vdots_rows_nr(const uint8_t* vc, int Pi, int row, int g, const int8_t* const* bk,
                          const int32_t* vsum128, float* const* out) {
  alignas(64) static const struct Idx {
    uint8_t v[64];
    Idx() { for (int o = 0; o < 64; ++o) v[o] = uint8_t(16 * (o % 4) + o / 4); }
  } idx;
  const __m512i ix = _mm512_load_si512(idx.v), m4 = _mm512_set1_epi8(0x0F);
  __m512i u[NR], w[NR];  // 4 bits: even / odd channels; 8 bits: channels 0..15 / 16..31
  for (int r = 0; r < NR; ++r) u[r] = w[r] = _mm512_setzero_si512();
  for (int tq = 0; tq < Pi / 4; ++tq) {
    const uint8_t* src = vc + 4 * tq * row;
    __m512i a, b;
    if constexpr (BITS == 8) {
      a = _mm512_permutexvar_epi8(ix, load4rows(src, row, 32 * g));
      b = _mm512_permutexvar_epi8(ix, load4rows(src, row, 32 * g + 16));
    } else {
      const __m512i x = _mm512_permutexvar_epi8(ix, load4rows(src, row, 16 * g));
      a = _mm512_and_si512(x, m4), b = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
    }
    for (int r = 0; r < NR; ++r) {
      int32_t bw;
      std::memcpy(&bw, bk[r] + 4 * tq, 4);
      const __m512i bb = _mm512_set1_epi32(bw);
      u[r] = _mm512_dpbusd_epi32(u[r], a, bb);
      w[r] = _mm512_dpbusd_epi32(w[r], b, bb);
    }
  }
  const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ih =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i s0 = _mm512_loadu_si512(vsum128), s1 = _mm512_loadu_si512(vsum128 + 16);
  for (int r = 0; r < NR; ++r) {
    __m512i lo = u[r], hi = w[r];  // channels 0..15, 16..31
    if constexpr (BITS == 4)
      lo = _mm512_permutex2var_epi32(u[r], il, w[r]),
      hi = _mm512_permutex2var_epi32(u[r], ih, w[r]);
    _mm512_storeu_ps(out[r], _mm512_cvtepi32_ps(_mm512_add_epi32(lo, s0)));
    _mm512_storeu_ps(out[r] + 16, _mm512_cvtepi32_ps(_mm512_add_epi32(hi, s1)));
  }
}

template <int BITS>
inline void vdots_rows_b(const uint8_t* vc, int Pi, int row, int g, int nr,
                         const int8_t* const* bk, const int32_t* vsum128, float* const* out) {
  if (nr == 1) vdots_rows_nr<BITS, 1>(vc, Pi, row, g, bk, vsum128, out);
  else if (nr == 2) vdots_rows_nr<BITS, 2>(vc, Pi, row, g, bk, vsum128, out);
  else if (nr == 3) vdots_rows_nr<BITS, 3>(vc, Pi, row, g, bk, vsum128, out);
  else vdots_rows_nr<BITS, 4>(vc, Pi, row, g, bk, vsum128, out);
}

inline void vdots_rows(int bits, const uint8_t* vc, int Pi, int row, int g, int nr,
                       const int8_t* const* bk, const int32_t* vsum128, float* const* out) {
  if (bits == 8) vdots_rows_b<8>(vc, Pi, row, g, nr, bk, vsum128, out);
  else vdots_rows_b<4>(vc, Pi, row, g, nr, bk, vsum128, out);
}

// 128 x int16 sums -> int32
inline void sums128(const int16_t* src, int n, int32_t* dst) {
  for (int i = 0; i < n; i += 16) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)(src + i));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepi16_epi32(x), 7));
  }
}

}  // namespace vnni
}  // namespace hack
#else
#define HACK_VNNI 0
#endif
