// HACK (arXiv 2502.03589): fused CPU attention on the quantized paged KV cache.
//
// Rule (same arithmetic as kernels/reference.py, the oracle; the per-partition steps are in
// hack_part.h): sealed partitions of Π tokens are attended on their integer codes, sinks and the
// open partition in 16-bit from their pools, and one online softmax joins the parts. One call
// per layer for all requests: work items are (request, KV head, query-row tile, context split),
// run with at::parallel_for; split partials are merged after. Records are read in place
// through the block table, CH partitions at a time: each phase (scores, softmax step, values)
// runs for every (row, partition) pair of the chunk before the next, so the core overlaps
// their dependency chains, and the softmax rescales once per chunk.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <memory>
#include <vector>

#include "hack_attn.h"
#include "hack_part.h"
#include "hack_rowops.h"
#include "hack_simd.h"

namespace hack {
namespace {

constexpr int SINK = 4, BM = 32;  // sink tokens, query rows per tile
constexpr int CH = 4;            // sealed partitions per online-softmax step
constexpr int64_t SERIAL_ROW_TOKENS = 2048;  // less work than this runs on the calling thread

struct Item {
  int r, h, row0, nrows, p0, p1, split;  // partitions [p0, p1); split index within its tile
  bool dense;                             // this split also attends sinks and the open part
};

struct Acc {  // online-softmax state of one tile: m, l, acc [BM][D]
  float m[BM], l[BM];
  std::vector<float> o;
};

// Online-softmax step for one row over n scores (masked = -inf) whose max is mx: rescales
// the row's state, writes the numerators p; returns false (state untouched) if all masked.
inline bool online(Acc& A, int i, int D, const float* s, float mx, float* p, int n) {
  if (mx == NEG_INF) return false;
  const float m_new = std::max(A.m[i], mx);
  const bool fresh = A.m[i] == NEG_INF;  // no live step yet: l = 0 and the row's o is all 0
  const float alpha = fresh ? 0.f : std::exp(A.m[i] - m_new);
  A.l[i] = A.l[i] * alpha + exp_shift(s, m_new, p, n);
  A.m[i] = m_new;
  if (!fresh && alpha != 1.0f) scale_inplace(A.o.data() + size_t(i) * D, alpha, D);
  return true;
}

struct DenseTmp {  // per thread (in Scratch: a thread_local here costs a TLS lookup per use)
  std::vector<float> kv, s, p;  // kv [n][2D]; only grow
  void fit(size_t kv_n, int n) {
    if (kv.size() < kv_n) kv.resize(kv_n);
    if (s.size() < size_t(n)) s.resize(n), p.resize(n);
  }
};

// The item's 16-bit tokens (sinks, open partition) from their pools, in their own online-softmax
// step before the sealed partitions (the order the engine's greedy-identity test was fixed on).
template <bool BF16>
void dense_part(const Ctx& C, const Item& it, const float* qt, const int* qpos, Acc& A,
                DenseTmp& T) {
  const int D = C.L.D, Pi = C.L.Pi, r = it.r;
  const int L = C.seq[r], ns = L / Pi, n_open = L - ns * Pi;
  const int sink = C.kslot[r], slot = C.sslot[r];
  const int n_sink = sink >= 0 && ns > 0 ? SINK : 0, n_o = slot >= 0 && n_open > 0 ? n_open : 0;
  const int n = n_sink + n_o;  // tokens 0..n_sink-1 are positions 0.., the rest ns Π..
  if (n == 0) return;
  T.fit(size_t(n) * 2 * D, n);
  float *kv = T.kv.data(), *s = T.s.data(), *p = T.p.data();
  if (n_sink) cvt16<BF16>(C.sinks + sink * C.s_ks + it.h * C.s_kh, kv, n_sink * 2 * D);
  if (n_o)
    cvt16<BF16>(C.stage + slot * C.s_ss + it.h * C.s_sh, kv + size_t(n_sink) * 2 * D,
                n_o * 2 * D);
  for (int i = 0; i < it.nrows; ++i) {
    const float* qi = qt + i * D;
    for (int t = 0; t < n; ++t) {
      const int kpos = t < n_sink ? t : ns * Pi + t - n_sink;
      s[t] = kpos <= qpos[i] ? dot_f32(qi, kv + size_t(t) * 2 * D, D) : NEG_INF;
    }
    float mx = NEG_INF;
    for (int t = 0; t < n; ++t) mx = std::max(mx, s[t]);
    if (!online(A, i, D, s, mx, p, n)) continue;
    float* o = A.o.data() + i * D;
    for (int t = 0; t < n; ++t)
      if (p[t] != 0.f) axpby(o, 1.0f, kv + size_t(t) * 2 * D + D, p[t], D);
  }
}

struct Scratch {  // per thread, reused across calls
  Part part[CH];
  RowTmp row;
  DenseTmp dense;
  std::vector<float> s, p;  // [BM][CH Π]: scores, softmax numerators of a chunk
  int D, Pi;
  Scratch(int D_, int Pi_) : D(D_), Pi(Pi_) {  // parts are sized per record layout in load()
    row.size(D, Pi);
    s.resize(size_t(BM) * CH * Pi), p.resize(size_t(BM) * CH * Pi);
  }
};

// The sealed partitions [p0, p1) of one tile, CH at a time: load the CH records, then each
// phase for every (row, partition) pair before the next (independent chains the core can
// overlap), one online-softmax step per row and chunk.
void sealed_parts(const Ctx& C, const Item& it, const float* qt, const int* qpos, Acc& A,
                  Scratch& S) {
  const Lay& L = C.L;
  const int D = L.D, Pi = L.Pi, r = it.r, W = CH * Pi;
  const bool use_sinks = C.kslot[r] >= 0 && C.seq[r] / Pi > 0;
  float mx[BM][CH];
  for (int c0 = it.p0; c0 < it.p1; c0 += CH) {
    const int np = std::min(CH, it.p1 - c0);
    int lo[CH], i0 = it.nrows;  // lo: sink tokens masked in partition j; i0: first row seeing any
    for (int j = 0; j < np; ++j) {
      const int kpos0 = (c0 + j) * Pi;
      lo[j] = (use_sinks && c0 + j == 0) ? SINK : 0;
      if (qpos[it.nrows - 1] < std::max(kpos0, lo[j])) continue;  // rows ascend in qpos
      for (int i = 0; i < i0; ++i)
        if (qpos[i] >= kpos0 && qpos[i] >= lo[j]) { i0 = i; break; }
      const int64_t blk = C.bt[r * C.s_bt + kpos0 / L.BS];
      load(L, C.pages + blk * C.s_pb + it.h * C.s_ph + (kpos0 % L.BS) / Pi * C.s_pp, S.part[j],
           S.row);
    }
    for (int j = 0; j < np; ++j) {  // scores, RB rows at a time
      const int kpos0 = (c0 + j) * Pi;
      int i = i0;
      for (; i < it.nrows && (qpos[i] < kpos0 || qpos[i] < lo[j]); ++i) {
        mx[i][j] = NEG_INF;
        std::fill(S.s.data() + size_t(i) * W + j * Pi, S.s.data() + size_t(i) * W + (j + 1) * Pi,
                  NEG_INF);
      }
      for (; i < it.nrows; i += RB) {
        const int n = std::min(RB, it.nrows - i);
        const float* q[RB];
        float* s[RB];
        float m[RB];
        for (int k = 0; k < n; ++k)
          q[k] = qt + (i + k) * D, s[k] = S.s.data() + size_t(i + k) * W + j * Pi;
        scores(S.part[j], L, n, q, qpos + i, kpos0, lo[j], s, m, S.row);
        for (int k = 0; k < n; ++k) mx[i + k][j] = m[k];
      }
    }
    bool live[BM];
    for (int i = i0; i < it.nrows; ++i) {  // one online-softmax step per row
      float m = NEG_INF;
      for (int j = 0; j < np; ++j) m = std::max(m, mx[i][j]);
      live[i] = online(A, i, D, S.s.data() + size_t(i) * W, m, S.p.data() + size_t(i) * W,
                       np * Pi);
    }
    for (int j = 0; j < np; ++j)  // values, RB live rows at a time
      for (int i = i0; i < it.nrows;) {
        const float* p[RB];
        float* o[RB];
        int n = 0;
        for (; i < it.nrows && n < RB; ++i)
          if (live[i] && mx[i][j] != NEG_INF)
            p[n] = S.p.data() + size_t(i) * W + j * Pi, o[n++] = A.o.data() + i * D;
        if (n) values(S.part[j], L, n, p, o, S.row);
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
    const int64_t bytes = C.q_type == 0 ? 4 : 2;  // = reference q.float() * scale
    load_scaled(static_cast<const char*>(C.q) + at * bytes, C.q_type, C.scale, q_tile + i * D, D);
    A.m[i] = NEG_INF;
    A.l[i] = 0.f;
  }
  std::fill(A.o.begin(), A.o.begin() + size_t(it.nrows) * D, 0.f);
  if (it.dense) dense_part<BF16>(C, it, q_tile, qpos, A, S.dense);
  sealed_parts(C, it, q_tile, qpos, A, S);
}

}  // namespace

const char* isa() { return HACK_VNNI ? "avx512-vnni" : HACK_AVX2 ? "avx2" : "scalar"; }

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
      store_scaled(acc + i * D, l[i] > 0 ? l[i] : 1.0f, o_type, dst, D);
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
  // merge the splits, on this thread: tiles are split only when there are fewer than
  // 2 x threads of them, so this is a few tiles' rows (a second fork / join costs more)
  {
    std::vector<float> acc(size_t(BM) * D), l(BM);
    for (int64_t k = 0; k < tiles; ++k) {
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
  }
}

}  // namespace hack

