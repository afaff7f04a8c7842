// HACK (arXiv 2502.03589) CPU kernel: one sealed partition (record) of one KV head.
//
// Rule (kernels/reference.py is the oracle): per sealed partition of Π tokens,
//   K: a = q * k_scale is quantized to 8 bits over the D channels and
//      q.k_t = s_a (a'.kcode_t) + m_a ksum_t + q.k_min;
//   V: per V group g, b_t = p_t * v_scale[t, g] is quantized to 8 bits over the tokens and
//      sum_t p_t v_t = s_b (b'.vcode) + m_b vsum + sum_t p_t v_min[t, g].
// Three steps: `load` unpacks the record once (shared by the tile's rows), `scores` gives up
// to RB rows' Π scores, `values` adds their P.V to their accumulators. The integer
// products run on vpdpbusd (4 / 8 bits with AVX-512 VNNI, hack_vnni.h), maddubs (4 / 2 bits
// with AVX2, hack_lowbit.h) or int16 / fp32 (8 bits, or no AVX2); all are exact.
#pragma once
#include <vector>

#include "hack_attn.h"
#include "hack_lowbit.h"
#include "hack_rowops.h"
#include "hack_simd.h"
#include "hack_vnni.h"

namespace hack {

constexpr int VG = 32;  // V group (channels per V scale)

enum class Path { vnni, lowbit, generic };

inline Path path_for(int bits) {
  if (HACK_VNNI && (bits == 4 || bits == 8)) return Path::vnni;
  if (HACK_AVX2 && bits != 8) return Path::lowbit;
  return Path::generic;
}

inline const uint16_t* f16(const uint8_t* rec, int64_t off) {
  return reinterpret_cast<const uint16_t*>(rec + off);
}

struct Part {  // one record, unpacked; per thread, reused
  Path path = Path::generic;
  int D = 0, Pi = 0, bits = 0;
  std::vector<float> ks, km, vsT, vmT;              // K scale / min [D], V scale / min [G][Π]
  std::vector<int32_t> ksum128, vsum128;            // 128 x sums (vnni)
  const int16_t *ksum = nullptr, *vsum = nullptr;   // code sums [Π] / [D], in the record
  std::vector<int16_t> kc;                          // generic: K codes [Π][D]
  std::vector<float> vc;                            // generic: V codes [Π][D]
  std::vector<uint8_t> kc8, vp8;                    // lowbit: K bit planes, V token pairs
  const uint8_t* rec = nullptr;                     // vnni: codes read in place
  void size(int D_, int Pi_, int bits_) {  // no-op if unchanged; buffers only grow
    if (D_ == D && Pi_ == Pi && bits_ == bits) return;
    D = D_, Pi = Pi_, bits = bits_, path = path_for(bits);
    const int G = D / VG;
    ks.resize(D), km.resize(D);
    vsT.resize(size_t(G) * Pi), vmT.resize(size_t(G) * Pi);
    ksum128.resize(Pi), vsum128.resize(D);
    if (path == Path::generic) kc.resize(size_t(Pi) * D), vc.resize(size_t(Pi) * D);
    if (path == Path::lowbit) kc8.resize(size_t(Pi) * D), vp8.resize(size_t(Pi) * D);
  }
};

constexpr int RB = 4;  // query rows per register block (vnni)

struct RowTmp {  // per thread: temporaries of up to RB rows
  std::vector<float> tmp, codes, b, dotv;
  std::vector<int32_t> dots;
  std::vector<int16_t> a16;
  std::vector<uint8_t> a8, b8, ap;
  alignas(64) int8_t ak[RB][128], bk[RB][128];
  void size(int D, int Pi) {
    const int n = std::max(D, Pi * (D / VG));  // tmp also holds a record's V scales [Π][G]
    tmp.resize(n), codes.resize(n), b.resize(Pi), dotv.resize(RB * VG), dots.resize(RB * Pi);
    a16.resize(D), a8.resize(D), b8.resize(Pi), ap.resize(128);
  }
};

inline void load(const Lay& L, const uint8_t* rec, Part& P, RowTmp& T) {
  const int D = L.D, Pi = L.Pi, G = D / VG;
  P.size(D, Pi, L.bits);
#if HACK_VNNI
  if (P.path == Path::vnni) {
    P.rec = rec;
    vnni::sums128(reinterpret_cast<const int16_t*>(rec + L.off_ksum), Pi, P.ksum128.data());
    vnni::sums128(reinterpret_cast<const int16_t*>(rec + L.off_vsum), D, P.vsum128.data());
  }
#endif
#if HACK_AVX2
  if (P.path == Path::lowbit) {
    unpack_k_planes(rec + L.off_kc, L.bits, Pi, L.row, P.kc8.data());
    unpack_v_pairs(rec + L.off_vc, L.bits, D, Pi, L.row, P.vp8.data());
  }
#endif
  if (P.path == Path::generic)
    for (int t = 0; t < Pi; ++t) {
      unpack_i16(rec + L.off_kc + t * L.row, L.bits, D, P.kc.data() + t * D);
      unpack_f32(rec + L.off_vc + t * L.row, L.bits, D, P.vc.data() + t * D);
    }
  cvt16<false>(f16(rec, L.off_ks), P.ks.data(), D);
  cvt16<false>(f16(rec, L.off_km), P.km.data(), D);
  P.ksum = reinterpret_cast<const int16_t*>(rec + L.off_ksum);
  P.vsum = reinterpret_cast<const int16_t*>(rec + L.off_vsum);
  for (int which = 0; which < 2; ++which) {  // v_scale / v_min [Π][G] -> [G][Π]
    std::vector<float>& dst = which ? P.vmT : P.vsT;
    const uint16_t* src = f16(rec, which ? L.off_vm : L.off_vs);
    if (G == 1) { cvt16<false>(src, dst.data(), Pi); continue; }
    cvt16<false>(src, T.tmp.data(), Pi * G);
    for (int t = 0; t < Pi; ++t)
      for (int g = 0; g < G; ++g) dst[g * Pi + t] = T.tmp[t * G + g];
  }
}

// a = q * k_scale, 8-bit over the channels: codes into T.codes; returns q.k_min
inline float quant_a(const Part& P, const float* qi, float& s_a, float& m_a, RowTmp& T) {
  quant8_mul(qi, P.ks.data(), P.D, s_a, m_a, T.codes.data(), T.tmp.data());
  return dot_f32(qi, P.km.data(), P.D);
}

// Scores of n <= RB rows (q[r], qpos[r]) into s[r][0..Π) (tokens at kpos > qpos or kpos <
// lo_mask: -inf) and their maxima into mx[r].
inline void scores(const Part& P, const Lay& L, int n, const float* const* q, const int* qpos,
                   int kpos0, int lo_mask, float* const* s, float* mx, RowTmp& T) {
  const int D = P.D, Pi = P.Pi;
  float s_a[RB], m_a[RB], qkm[RB];
  int32_t* dots[RB];
  for (int r = 0; r < n; ++r) {
    dots[r] = T.dots.data() + r * Pi;
    qkm[r] = quant_a(P, q[r], s_a[r], m_a[r], T);
#if HACK_VNNI
    if (P.path == Path::vnni) vnni::a_order(T.codes.data(), D, P.bits, T.ak[r]);
#endif
#if HACK_AVX2
    if (P.path == Path::lowbit) {
      f32_to_u8(T.codes.data(), D, T.a8.data());
      kdots_lowbit(P.bits, D, T.a8.data(), T.ap.data(), P.kc8.data(), Pi, dots[r]);
    }
#endif
    if (P.path == Path::generic) {
      for (int d = 0; d < D; ++d) T.a16[d] = int16_t(T.codes[d]);
      for (int t = 0; t < Pi; t += 8) kdot8(T.a16.data(), P.kc.data() + t * D, D, dots[r] + t);
    }
  }
#if HACK_VNNI
  if (P.path == Path::vnni) {
    const int8_t* ak[RB] = {T.ak[0], T.ak[1], T.ak[2], T.ak[3]};
    vnni::kdots_rows(P.bits, P.rec + L.off_kc, Pi, L.row, n, ak, P.ksum128.data(), dots);
  }
#endif
  for (int r = 0; r < n; ++r)
    mx[r] = hack::scores(dots[r], P.ksum, s_a[r], m_a[r], qkm[r], kpos0, qpos[r], lo_mask,
                         s[r], Pi);
}

// o[r][0..D) += sum_t p_t v_t over the partition for n <= RB rows (p[r]: softmax numerators).
inline void values(const Part& P, const Lay& L, int n, const float* const* p, float* const* o,
                   RowTmp& T) {
  const int D = P.D, Pi = P.Pi, G = D / VG;
  for (int g = 0; g < G; ++g) {
    const float* vs = P.vsT.data() + g * Pi;
    float s_b[RB], m_b[RB], corr[RB], *dotv[RB];
    for (int r = 0; r < n; ++r) {
      dotv[r] = T.dotv.data() + r * VG;
      quant8_mul(p[r], vs, Pi, s_b[r], m_b[r], T.codes.data(), T.b.data());
      corr[r] = dot_f32(p[r], P.vmT.data() + g * Pi, Pi);
#if HACK_VNNI
      if (P.path == Path::vnni) vnni::b_s8(T.codes.data(), Pi, T.bk[r]);
#endif
#if HACK_AVX2
      if (P.path == Path::lowbit) {
        f32_to_u8(T.codes.data(), Pi, T.b8.data());
        auto* vdot = P.bits == 4 ? vdot32_u8<true> : vdot32_u8<false>;
        vdot(P.vp8.data(), D, g * VG, T.b8.data(), Pi, dotv[r]);
      }
#endif
      if (P.path == Path::generic) wsum32(P.vc.data() + g * VG, D, T.codes.data(), Pi, dotv[r]);
    }
#if HACK_VNNI
    if (P.path == Path::vnni) {
      const int8_t* bk[RB] = {T.bk[0], T.bk[1], T.bk[2], T.bk[3]};
      vnni::vdots_rows(P.bits, P.rec + L.off_vc, Pi, L.row, g, n, bk, P.vsum128.data() + g * VG,
                       dotv);
    }
#endif
    const int16_t* vsg = P.vsum + g * VG;
    for (int r = 0; r < n; ++r) {
      float* og = o[r] + g * VG;
      for (int c = 0; c < VG; ++c)
        og[c] += (s_b[r] * dotv[r][c] + m_b[r] * float(vsg[c])) + corr[r];
    }
  }
}

}  // namespace hack
