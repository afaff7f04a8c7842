// HACK (arXiv 2502.03589): fused CPU attention on the quantized paged KV cache.
//
// Rule (same arithmetic as kernels/reference.py, the oracle): per sealed partition of Π tokens,
// a = q * k_scale is quantized to 8 bits over the D channels and
//   q.k_t = s_a (a'.kcode_t) + m_a ksum_t + q.k_min;
// per partition and V group g, b_t = p_t * v_scale[t, g] is quantized to 8 bits over the tokens
//   sum_t p_t v_t = s_b (b'.vcode) + m_b vsum + sum_t p_t v_min[t, g].
// Sinks and the open partition are attended in 16-bit from their pools; one online softmax
// joins the parts. One call per layer for all requests: work items are (request, KV head,
// query-row tile, context split), run with at::parallel_for; split partials are merged after.
// Records are read in place through the block table and unpacked once per partition into a
// scratch shared by the tile's query rows (4/2 bits: K bit planes and V token pairs, u8,
// hack_lowbit.h; 8 bits: int16 K / fp32 V).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <memory>
#include <vector>

#include "hack_attn.h"
#include "hack_lowbit.h"
#include "hack_simd.h"

namespace hack {
namespace {

constexpr int SINK = 4, VG = 32, BM = 32;  // sink tokens, V group, query rows per tile
constexpr int64_t SERIAL_ROW_TOKENS = 2048;  // less work than this runs on the calling thread

struct Item {
  int r, h, row0, nrows, p0, p1, split;  // partitions [p0, p1); split index within its tile
  bool dense;                             // this split also attends sinks and the open part
};

struct Acc {  // online-softmax state of one tile: m, l, acc [BM][D]
  float m[BM], l[BM];
  std::vector<float> o;
};

inline const uint16_t* f16(const uint8_t* rec, int64_t off) {
  return reinterpret_cast<const uint16_t*>(rec + off);
}

// Online-softmax step for one row over n scores (masked = -inf) whose max is mx: rescales
// the row's state, writes the numerators p; returns false (state untouched) if all masked.
inline bool online(Acc& A, int i, int D, const float* s, float mx, float* p, int n) {
  if (mx == NEG_INF) return false;
  const float m_new = std::max(A.m[i], mx);
  const float alpha = A.m[i] == NEG_INF ? 0.f : std::exp(A.m[i] - m_new);
  A.l[i] = A.l[i] * alpha + exp_shift(s, m_new, p, n);
  A.m[i] = m_new;
  if (alpha != 1.0f) scale_inplace(A.o.data() + size_t(i) * D, alpha, D);
  return true;
}

template <bool BF16>
void dense_part(const Ctx& C, const Item& it, const float* qt, const int* qpos, Acc& A) {
  const int D = C.L.D, Pi = C.L.Pi, r = it.r;
  const int L = C.seq[r], ns = L / Pi, n_open = L - ns * Pi;
  const int sink = C.kslot[r], slot = C.sslot[r];
  static thread_local std::vector<float> kv, s, p;  // kv [n][2D]; capacity kept across calls
  static thread_local std::vector<int> kpos;
  kv.clear(), kpos.clear();
  auto add = [&](const uint16_t* base, int n, int pos0) {
    size_t at = kv.size();
    kv.resize(at + size_t(n) * 2 * D);
    cvt16<BF16>(base, kv.data() + at, n * 2 * D);
    for (int t = 0; t < n; ++t) kpos.push_back(pos0 + t);
  };
  if (sink >= 0 && ns > 0) add(C.sinks + sink * C.s_ks + it.h * C.s_kh, SINK, 0);
  if (slot >= 0 && n_open > 0) add(C.stage + slot * C.s_ss + it.h * C.s_sh, n_open, ns * Pi);
  const int n = int(kpos.size());
  if (n == 0) return;
  s.resize(n), p.resize(n);
  for (int i = 0; i < it.nrows; ++i) {
    const float* qi = qt + i * D;
    for (int t = 0; t < n; ++t)
      s[t] = kpos[t] <= qpos[i] ? dot_f32(qi, kv.data() + size_t(t) * 2 * D, D) : NEG_INF;
    float mx = NEG_INF;
    for (int t = 0; t < n; ++t) mx = std::max(mx, s[t]);
    if (!online(A, i, D, s.data(), mx, p.data(), n)) continue;
    float* o = A.o.data() + i * D;
    for (int t = 0; t < n; ++t)
      if (p[t] != 0.f) axpby(o, 1.0f, kv.data() + size_t(t) * 2 * D + D, p[t], D);
  }
}

struct Scratch {  // per thread, sized once per call
  std::vector<int16_t> kc, a16;
  std::vector<uint8_t> kc8, vp8, a8, b8, ap;
  std::vector<float> vc, ks, km, ksum, vsT, vmT, vsum, tmp, codes, s, p, b, dotv;
  std::vector<int32_t> dots;
  int D = 0, Pi = 0;
  Scratch(int D_, int Pi_) : D(D_), Pi(Pi_) {
    const int G = D / VG, n = std::max(D, Pi * G);
    kc.resize(size_t(Pi) * D), a16.resize(D), kc8.resize(size_t(Pi) * D);
    vp8.resize(size_t(Pi) * D), a8.resize(D), b8.resize(Pi), ap.resize(128);
    vc.resize(size_t(Pi) * D);
    ks.resize(D), km.resize(D), ksum.resize(Pi), vsT.resize(size_t(G) * Pi);
    vmT.resize(size_t(G) * Pi), vsum.resize(D), tmp.resize(n), codes.resize(n), s.resize(Pi);
    p.resize(Pi), b.resize(Pi), dotv.resize(VG), dots.resize(Pi);
  }
};

void sealed_parts(const Ctx& C, const Item& it, const float* qt, const int* qpos, Acc& A,
                  Scratch& S) {
  const Lay& L = C.L;
  const int D = L.D, Pi = L.Pi, G = D / VG, r = it.r;
  const int ns = C.seq[r] / Pi;
  const bool use_sinks = C.kslot[r] >= 0 && ns > 0;
  const bool lowbit = HACK_AVX2 && L.bits != 8;  // u8 x s8 integer products (hack_lowbit.h)
  for (int part = it.p0; part < it.p1; ++part) {
    const int kpos0 = part * Pi, lo_mask = (use_sinks && part == 0) ? SINK : 0;
    int first = -1;  // first row that sees a token of this partition (rows ascend in qpos)
    for (int i = 0; i < it.nrows; ++i)
      if (qpos[i] >= kpos0 && qpos[i] >= lo_mask) { first = i; break; }
    if (first < 0) continue;
    const int64_t blk = C.bt[r * C.s_bt + kpos0 / L.BS];
    const uint8_t* rec = C.pages + blk * C.s_pb + it.h * C.s_ph + (kpos0 % L.BS) / Pi * C.s_pp;
#if HACK_AVX2
    if (lowbit) {
      unpack_k_planes(rec + L.off_kc, L.bits, Pi, L.row, S.kc8.data());
      unpack_v_pairs(rec + L.off_vc, L.bits, D, Pi, L.row, S.vp8.data());
    }
#endif
    if (!lowbit)
      for (int t = 0; t < Pi; ++t) {
        unpack_i16(rec + L.off_kc + t * L.row, L.bits, D, S.kc.data() + t * D);
        unpack_f32(rec + L.off_vc + t * L.row, L.bits, D, S.vc.data() + t * D);
      }
    cvt16<false>(f16(rec, L.off_ks), S.ks.data(), D);
    cvt16<false>(f16(rec, L.off_km), S.km.data(), D);
    i16_to_f32(reinterpret_cast<const int16_t*>(rec + L.off_ksum), S.ksum.data(), Pi);
    i16_to_f32(reinterpret_cast<const int16_t*>(rec + L.off_vsum), S.vsum.data(), D);
    for (int which = 0; which < 2; ++which) {  // v_scale / v_min [Π][G] -> [G][Π]
      std::vector<float>& dst = which ? S.vmT : S.vsT;
      const uint16_t* src = f16(rec, which ? L.off_vm : L.off_vs);
      if (G == 1) { cvt16<false>(src, dst.data(), Pi); continue; }
      cvt16<false>(src, S.tmp.data(), Pi * G);
      for (int t = 0; t < Pi; ++t)
        for (int g = 0; g < G; ++g) dst[g * Pi + t] = S.tmp[t * G + g];
    }
    for (int i = first; i < it.nrows; ++i) {
      if (qpos[i] < kpos0 || qpos[i] < lo_mask) continue;
      const float* qi = qt + i * D;
      // scores: a = q * k_scale, 8-bit over channels; exact integer dots on the codes
      for (int d = 0; d < D; ++d) S.tmp[d] = qi[d] * S.ks[d];
      float s_a, m_a;
      quant8(S.tmp.data(), D, s_a, m_a, S.codes.data());
      const float qkm = dot_f32(qi, S.km.data(), D);
#if HACK_AVX2
      if (lowbit) {
        f32_to_u8(S.codes.data(), D, S.a8.data());
        kdots_lowbit(L.bits, D, S.a8.data(), S.ap.data(), S.kc8.data(), Pi, S.dots.data());
      }
#endif
      if (!lowbit) {
        for (int d = 0; d < D; ++d) S.a16[d] = int16_t(S.codes[d]);
        for (int t = 0; t < Pi; t += 8)
          kdot8(S.a16.data(), S.kc.data() + t * D, D, S.dots.data() + t);
      }
      const float mx = scores(S.dots.data(), S.ksum.data(), s_a, m_a, qkm, kpos0, qpos[i],
                              lo_mask, S.s.data(), Pi);
      if (!online(A, i, D, S.s.data(), mx, S.p.data(), Pi)) continue;
      float* o = A.o.data() + i * D;
      for (int g = 0; g < G; ++g) {
        // b = p * v_scale, 8-bit over the Π tokens; exact integer b'.vcode
        const float* vs = S.vsT.data() + g * Pi;
        for (int t = 0; t < Pi; ++t) S.b[t] = S.p[t] * vs[t];
        float s_b, m_b;
        quant8(S.b.data(), Pi, s_b, m_b, S.codes.data());
        const float corr = dot_f32(S.p.data(), S.vmT.data() + g * Pi, Pi);
#if HACK_AVX2
        if (lowbit) {
          f32_to_u8(S.codes.data(), Pi, S.b8.data());
          auto* vdot = L.bits == 4 ? vdot32_u8<true> : vdot32_u8<false>;
          vdot(S.vp8.data(), D, g * VG, S.b8.data(), Pi, S.dotv.data());
        }
#endif
        if (!lowbit) wsum32(S.vc.data() + g * VG, D, S.codes.data(), Pi, S.dotv.data());
        float* og = o + g * VG;
        const float* vsg = S.vsum.data() + g * VG;
        for (int c = 0; c < VG; ++c) og[c] += (s_b * S.dotv[c] + m_b * vsg[c]) + corr;
      }
    }
  }
}

template <bool BF16>
void run_item(const Ctx& C, const Item& it, Acc& A, float* q_tile, Scratch& S) {
  const int D = C.L.D, r = it.r;
  const int q0 = C.qsl[r], n = C.qsl[r + 1] - q0, L = C.seq[r];
  int qpos[BM];
  for (int i = 0; i < it.nrows; ++i) {
    const int row = it.row0 + i, tok = row / C.QG, hq = it.h * C.QG + row % C.QG;
    qpos[i] = L - n + tok;
    const int64_t at = int64_t(q0 + tok) * C.s_qt + hq * C.s_qh;
    float* dst = q_tile + i * D;
    if (C.q_type == 0) std::memcpy(dst, static_cast<const float*>(C.q) + at, D * 4);
    else if (C.q_type == 1) cvt16<true>(static_cast<const uint16_t*>(C.q) + at, dst, D);
    else cvt16<false>(static_cast<const uint16_t*>(C.q) + at, dst, D);
    for (int d = 0; d < D; ++d) dst[d] = dst[d] * C.scale;  // = reference q.float() * scale
    A.m[i] = NEG_INF;
    A.l[i] = 0.f;
  }
  std::fill(A.o.begin(), A.o.end(), 0.f);
  if (it.dense) dense_part<BF16>(C, it, q_tile, qpos, A);
  sealed_parts(C, it, q_tile, qpos, A, S);
}

}  // namespace

void attend(const Ctx& C, int64_t max_splits) {
  const int D = C.L.D, Pi = C.L.Pi, R = C.R;

  std::vector<Item> items;  // tiles first, to count them, then split
  for (int r = 0; r < R; ++r) {
    const int n = C.qsl[r + 1] - C.qsl[r];
    for (int h = 0; h < C.H; ++h)
      for (int row0 = 0; row0 < n * C.QG; row0 += BM) {
        const int nrows = std::min(BM, n * C.QG - row0);
        const int max_qpos = C.seq[r] - n + (row0 + nrows - 1) / C.QG;
        const int np = std::min(C.seq[r] / Pi, max_qpos / Pi + 1);
        items.push_back(Item{r, h, row0, nrows, 0, np, 0, true});
      }
  }
  int64_t row_tokens = 0;  // work estimate: (query row, cached token) pairs
  for (const Item& it : items) row_tokens += int64_t(it.nrows) * C.seq[it.r];
  // below ~10 us of work one thread is faster than a fork / join (and waiting for a busy core)
  const int threads = row_tokens < SERIAL_ROW_TOKENS ? 1 : at::get_num_threads();
  const int64_t tiles = int64_t(items.size());
  std::vector<Item> work;
  std::vector<int> first_split(tiles), n_split(tiles);
  for (int64_t k = 0; k < tiles; ++k) {
    const Item& it = items[k];
    const int np = it.p1;
    int S = int(std::min<int64_t>(max_splits, (2 * threads + tiles - 1) / tiles));
    S = std::max(1, std::min(S, np / 4));  // at least 4 partitions per split
    first_split[k] = int(work.size()), n_split[k] = S;
    for (int s = 0; s < S; ++s)
      work.push_back(Item{it.r, it.h, it.row0, it.nrows, np * s / S, np * (s + 1) / S, s,
                          s == 0});
  }
  const int64_t W = int64_t(work.size());
  std::vector<float> part(W > tiles ? size_t(W) * BM * (D + 2) : 0);
  char* o = static_cast<char*>(C.out);
  const int o_type = C.o_type;
  const int64_t s_ot = C.s_ot, s_oh = C.s_oh, o_size = o_type == 0 ? 4 : 2;
  auto store = [&](const Item& it, const float* acc, const float* l) {
    const int q0 = C.qsl[it.r];
    for (int i = 0; i < it.nrows; ++i) {
      const int row = it.row0 + i, tok = row / C.QG, hq = it.h * C.QG + row % C.QG;
      char* dst = o + (int64_t(q0 + tok) * s_ot + hq * s_oh) * o_size;
      const float inv = l[i] > 0 ? l[i] : 1.0f;
      for (int d = 0; d < D; ++d) {
        const float x = acc[i * D + d] / inv;
        if (o_type == 0) reinterpret_cast<float*>(dst)[d] = x;
        else if (o_type == 1) reinterpret_cast<c10::BFloat16*>(dst)[d] = c10::BFloat16(x);
        else reinterpret_cast<c10::Half*>(dst)[d] = c10::Half(x);
      }
    }
  };
  at::parallel_for(0, W, threads == 1 ? W : 1, [&](int64_t b, int64_t e) {
    static thread_local std::unique_ptr<Scratch> tls;  // reused across calls
    static thread_local Acc A;
    static thread_local std::vector<float> q_tile;
    if (!tls || tls->D != D || tls->Pi != Pi) tls.reset(new Scratch(D, Pi));
    Scratch& S = *tls;
    A.o.resize(size_t(BM) * D);
    q_tile.resize(size_t(BM) * D);
    for (int64_t w = b; w < e; ++w) {
      const Item& it = work[w];
      if (C.bf16) run_item<true>(C, it, A, q_tile.data(), S);
      else run_item<false>(C, it, A, q_tile.data(), S);
      if (W == tiles) { store(it, A.o.data(), A.l); continue; }
      float* dst = part.data() + size_t(w) * BM * (D + 2);
      std::copy(A.o.begin(), A.o.begin() + size_t(it.nrows) * D, dst);
      std::copy(A.m, A.m + it.nrows, dst + BM * D);
      std::copy(A.l, A.l + it.nrows, dst + BM * (D + 1));
    }
  });
  if (W == tiles) return;
  at::parallel_for(0, tiles, threads == 1 ? tiles : 1, [&](int64_t b, int64_t e) {  // merge splits
    std::vector<float> acc(size_t(BM) * D), l(BM);
    for (int64_t k = b; k < e; ++k) {
      const Item& it = work[first_split[k]];
      for (int i = 0; i < it.nrows; ++i) {
        float M = NEG_INF;
        for (int s = 0; s < n_split[k]; ++s)
          M = std::max(M, part[size_t(first_split[k] + s) * BM * (D + 2) + BM * D + i]);
        l[i] = 0.f;
        std::fill(acc.begin() + i * D, acc.begin() + (i + 1) * D, 0.f);
        for (int s = 0; s < n_split[k]; ++s) {
          const float* src = part.data() + size_t(first_split[k] + s) * BM * (D + 2);
          if (src[BM * D + i] == NEG_INF) continue;
          const float w = std::exp(src[BM * D + i] - M);
          l[i] += src[BM * (D + 1) + i] * w;
          axpby(acc.data() + i * D, 1.0f, src + i * D, w, D);
        }
      }
      store(it, acc.data(), l.data());
    }
  });
}

}  // namespace hack

