// HACK (arXiv 2502.03589): the step's KV writes on CPU, in place (the C++ twin of
// kv_store.apply_writes, which stays the oracle: pages, staging and sink pools come out
// byte-identical).
//
// Rules: requantization elimination -- a partition's K is quantized per channel over its Π
// tokens once, when it is full ("sealed"); until then its tokens sit in 16-bit in a staging slot,
// and a decode token goes straight into its slot. Sinks -- the first 4 tokens of a sequence
// also go to the sink pool and are left out of partition 0's K ranges. Early seals (staging
// pool full) encode the slot's tokens so far; a reopened partition is restored from its record
// (dequantized, rounded to 16-bit) and from the sink pool. Encoding = quant.encode_records:
// fp16 (scale, min) from fp32 ranges, codes floor((x - min) / scale + 0.5) clamped, packed along
// channels, code sums cached, padding zero.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "hack_simd.h"

namespace hack {
namespace {

constexpr int SINK = 4, VG = 32;

struct WLay {
  int bits, D, Pi, RB, row;
  int64_t off[8];  // k_codes, v_codes, k_scale, k_min, v_scale, v_min, k_sum, v_sum
};

template <bool BF16>
inline uint16_t f2h(float x) {
  if (BF16) return c10::BFloat16(x).x;
  return c10::Half(x).x;
}
template <bool BF16>
inline float h2(uint16_t x) { return BF16 ? bf2f(x) : h2f(x); }

// fp16 (scale, min) of values over [lo, hi] as asym_params: mn = half(lo),
// scale = half((hi - float(mn)) / qmax); returns the fp32 views used to quantize.
inline void params(float lo, float hi, int qmax, uint16_t& s16, uint16_t& m16, float& s,
                   float& m) {
  m16 = c10::Half(lo).x;
  m = h2f(m16);
  s16 = c10::Half((hi - m) / float(qmax)).x;
  s = h2f(s16);
}

inline uint8_t code(float x, float s, float m, int qmax) {
  const float safe = s > 0 ? s : 1.0f;
  return uint8_t(std::min(std::max(std::floor((x - m) / safe + 0.5f), 0.0f), float(qmax)));
}

// Encode one head's partition: kv [Π][2D] fp32 (K then V), k_valid[t] -> record (RB bytes).
void encode(const WLay& L, const float* kv, const bool* valid, uint8_t* rec) {
  const int D = L.D, Pi = L.Pi, G = D / VG, qmax = (1 << L.bits) - 1, f = 8 / L.bits;
  std::memset(rec, 0, L.RB);
  auto* ks = reinterpret_cast<uint16_t*>(rec + L.off[2]);
  auto* km = reinterpret_cast<uint16_t*>(rec + L.off[3]);
  auto* vs = reinterpret_cast<uint16_t*>(rec + L.off[4]);
  auto* vm = reinterpret_cast<uint16_t*>(rec + L.off[5]);
  auto* ksum = reinterpret_cast<int16_t*>(rec + L.off[6]);
  auto* vsum = reinterpret_cast<int16_t*>(rec + L.off[7]);
  uint8_t* kc = rec + L.off[0];
  uint8_t* vc = rec + L.off[1];
  std::vector<float> sk(D), mk(D);
  for (int d = 0; d < D; ++d) {
    float lo = INFINITY, hi = -INFINITY;
    bool any = false;
    for (int t = 0; t < Pi; ++t)
      if (valid[t]) {
        const float x = kv[t * 2 * D + d];
        lo = std::min(lo, x), hi = std::max(hi, x), any = true;
      }
    if (!any) lo = hi = 0.f;
    params(lo, hi, qmax, ks[d], km[d], sk[d], mk[d]);
  }
  std::vector<int> vtot(D, 0);
  for (int t = 0; t < Pi; ++t) {
    const float* k = kv + t * 2 * D;
    const float* v = k + D;
    int tot = 0;
    for (int d = 0; d < D; ++d) {
      const uint8_t c = code(k[d], sk[d], mk[d], qmax);
      tot += c;
      kc[t * L.row + d / f] |= uint8_t(c << (L.bits * (d % f)));
    }
    ksum[t] = int16_t(tot);
    for (int g = 0; g < G; ++g) {
      float lo = v[g * VG], hi = v[g * VG];
      for (int c = 1; c < VG; ++c) lo = std::min(lo, v[g * VG + c]), hi = std::max(hi, v[g * VG + c]);
      float s, m;
      params(lo, hi, qmax, vs[t * G + g], vm[t * G + g], s, m);
      for (int c = g * VG; c < (g + 1) * VG; ++c) {
        const uint8_t q = code(v[c], s, m, qmax);
        vtot[c] += q;
        vc[t * L.row + c / f] |= uint8_t(q << (L.bits * (c % f)));
      }
    }
  }
  for (int d = 0; d < D; ++d) vsum[d] = int16_t(vtot[d]);
}

// Dequantize the first n tokens of a record into 16-bit rows [Π][2D] (as dequantize_records,
// then .to(dtype)).
template <bool BF16>
void restore(const WLay& L, const uint8_t* rec, int n, uint16_t* dst) {
  const int D = L.D, G = D / VG, f = 8 / L.bits, qmax = (1 << L.bits) - 1;
  auto fld = [&](int i) { return reinterpret_cast<const uint16_t*>(rec + L.off[i]); };
  for (int t = 0; t < n; ++t)
    for (int d = 0; d < D; ++d) {
      const int kcode = (rec[L.off[0] + t * L.row + d / f] >> (L.bits * (d % f))) & qmax;
      const int vcode = (rec[L.off[1] + t * L.row + d / f] >> (L.bits * (d % f))) & qmax;
      dst[t * 2 * D + d] = f2h<BF16>(float(kcode) * h2f(fld(2)[d]) + h2f(fld(3)[d]));
      const int g = d / VG;
      dst[t * 2 * D + D + d] =
          f2h<BF16>(float(vcode) * h2f(fld(4)[t * G + g]) + h2f(fld(5)[t * G + g]));
    }
}

template <bool BF16>
void write_impl(const WLay& L, uint8_t* pages, int64_t s_pb, int64_t s_ph, int64_t s_pp,
                uint16_t* stage, int64_t s_ss, int64_t s_sh, uint16_t* sinks, int64_t s_ks,
                int64_t s_kh, const uint16_t* key, const uint16_t* val, int64_t s_kt,
                int64_t s_kh2, int64_t s_vt, int64_t s_vh, int H, int ppb,
                const std::vector<const int64_t*>& P, const std::vector<int64_t>& n) {
  const int D = L.D, Pi = L.Pi;
  // P: evict_slot, evict_pid, evict_fill, evict_first, touch_pid, touch_prev, touch_reopen,
  //    touch_first, touch_sink, tok_touch, tok_off, close_idx, open_idx, open_slot,
  //    sink_tok, sink_slot, sink_off
  auto record = [&](int64_t pid, int h) {
    return pages + (pid / ppb) * s_pb + h * s_ph + (pid % ppb) * s_pp;
  };
  auto seal = [&](int64_t pid, const uint16_t* const* rows, int fill, bool first) {
    std::vector<float> kv(size_t(Pi) * 2 * D);
    std::vector<char> valid(Pi);
    for (int t = 0; t < Pi; ++t) valid[t] = t < fill && !(first && t < SINK);
    for (int h = 0; h < H; ++h) {
      for (int t = 0; t < Pi; ++t)
        for (int c = 0; c < 2 * D; ++c) kv[t * 2 * D + c] = h2<BF16>(rows[h][t * 2 * D + c]);
      encode(L, kv.data(), reinterpret_cast<const bool*>(valid.data()), record(pid, h));
    }
  };
  const int64_t E = n[0];
  at::parallel_for(0, E, 1, [&](int64_t b, int64_t e) {  // early seals free their slots first
    for (int64_t j = b; j < e; ++j) {
      std::vector<const uint16_t*> rows(H);
      for (int h = 0; h < H; ++h) rows[h] = stage + P[0][j] * s_ss + h * s_sh;
      seal(P[1][j], rows.data(), int(P[2][j]), P[3][j] != 0);
    }
  });
  const int64_t T = n[4], NT = n[9], C = n[11], O = n[12];
  std::vector<int64_t> tok0(T + 1, NT), slot_of(T, -1);
  for (int64_t k = NT - 1; k >= 0; --k) tok0[P[9][k]] = k;
  for (int64_t j = T - 1; j >= 0; --j) tok0[j] = std::min(tok0[j], tok0[j + 1]);
  for (int64_t k = 0; k < O; ++k) slot_of[P[12][k]] = P[13][k];
  std::vector<char> closing(T, 0);
  for (int64_t k = 0; k < C; ++k) closing[P[11][k]] = 1;
  // closing partitions first: a slot they free may be handed to an opening one in this step
  std::vector<int64_t> order;
  for (int pass = 1; pass >= 0; --pass)
    for (int64_t j = 0; j < T; ++j)
      if (closing[j] == pass) order.push_back(j);
  const int64_t n_close = C;
  auto touched = [&](int64_t lo, int64_t hi) {
   at::parallel_for(lo, hi, 1, [&](int64_t b, int64_t e) {
    std::vector<uint16_t> tmp(size_t(H) * Pi * 2 * D);
    for (int64_t oj = b; oj < e; ++oj) {
      const int64_t j = order[oj];
      const int64_t prev = P[5][j], reopen = P[6][j], sink = P[8][j];
      // rows of head h: the staging slot itself if the partition stays open, else a temp
      auto rows = [&](int h) -> uint16_t* {
        return closing[j] ? tmp.data() + size_t(h) * Pi * 2 * D
                          : stage + slot_of[j] * s_ss + h * s_sh;
      };
      const bool in_place = !closing[j] && prev == slot_of[j];
      for (int h = 0; h < H; ++h) {
        uint16_t* r = rows(h);
        if (in_place) continue;
        if (prev >= 0) {
          std::memcpy(r, stage + prev * s_ss + h * s_sh, size_t(Pi) * 2 * D * 2);
          continue;
        }
        std::memset(r, 0, size_t(Pi) * 2 * D * 2);
        if (reopen > 0) {
          restore<BF16>(L, record(P[4][j], h), Pi, r);  // all rows, as the torch path
          if (sink >= 0)
            std::memcpy(r, sinks + sink * s_ks + h * s_kh, size_t(SINK) * 2 * D * 2);
        }
      }
      for (int64_t k = tok0[j]; k < tok0[j + 1]; ++k) {
        const int64_t off = P[10][k];
        for (int h = 0; h < H; ++h) {
          uint16_t* dst = rows(h) + off * 2 * D;
          std::memcpy(dst, key + k * s_kt + h * s_kh2, size_t(D) * 2);
          std::memcpy(dst + D, val + k * s_vt + h * s_vh, size_t(D) * 2);
        }
      }
      if (closing[j]) {
        std::vector<const uint16_t*> rp(H);
        for (int h = 0; h < H; ++h) rp[h] = rows(h);
        seal(P[4][j], rp.data(), Pi, P[7][j] != 0);
      }
    }
   });
  };
  touched(0, n_close);
  touched(n_close, T);
  for (int64_t k = 0; k < n[14]; ++k) {  // sink tokens
    const int64_t tok = P[14][k], slot = P[15][k], off = P[16][k];
    for (int h = 0; h < H; ++h) {
      uint16_t* dst = sinks + slot * s_ks + h * s_kh + off * 2 * D;
      std::memcpy(dst, key + tok * s_kt + h * s_kh2, size_t(D) * 2);
      std::memcpy(dst + D, val + tok * s_vt + h * s_vh, size_t(D) * 2);
    }
  }
}

}  // namespace

// plan: the 17 WritePlan tensors (int64, contiguous) in field order. lay: bits, D, Pi, RB, row,
// 8 offsets. key/value: [n, H, D] in the pools' 16-bit dtype.
void write(const at::Tensor& pages, const at::Tensor& stage, const at::Tensor& sinks,
           const at::Tensor& key, const at::Tensor& value, at::TensorList plan,
           c10::IntArrayRef lay) {
  TORCH_CHECK(plan.size() == 17, "hack_cpu.write: 17 plan tensors");
  TORCH_CHECK(key.scalar_type() == stage.scalar_type() && value.scalar_type() == stage.scalar_type());
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && stage.is_contiguous() &&
              sinks.is_contiguous() && pages.stride(3) == 1);
  std::vector<const int64_t*> P;
  std::vector<int64_t> n;
  for (const auto& t : plan) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), "int64 plan tensors");
    P.push_back(t.data_ptr<int64_t>());
    n.push_back(t.numel());
  }
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.size(0) >= n[9] &&
              value.size(0) >= n[9], "hack_cpu.write: key/value [>= n_tok, H, D]");
  WLay L{int(lay[0]), int(lay[1]), int(lay[2]), int(lay[3]), int(lay[4]),
         {lay[5], lay[6], lay[7], lay[8], lay[9], lay[10], lay[11], lay[12]}};
  auto u16 = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  const int H = pages.size(1), ppb = pages.size(2);
  auto run = [&](auto bf) {
    write_impl<decltype(bf)::value>(
        L, pages.data_ptr<uint8_t>(), pages.stride(0), pages.stride(1), pages.stride(2),
        u16(stage), stage.stride(0), stage.stride(1), u16(sinks), sinks.stride(0),
        sinks.stride(1), u16(key), u16(value), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), H, ppb, P, n);
  };
  if (stage.scalar_type() == at::kBFloat16) run(std::true_type{});
  else run(std::false_type{});
}

}  // namespace hack

TORCH_LIBRARY(HACK_OPS_NS, m) { m.def("write", &hack::write); }
