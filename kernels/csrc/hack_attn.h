// HACK (arXiv 2502.03589) CPU attention: what the Python binding (hack_bind.cpp) hands the
// kernel (hack_attn.cpp). Raw pointers and strides only, read from tensors checked once.
#pragma once
#include <cstdint>

namespace hack {

struct Lay {  // record layout: bits, head size, Π, record bytes, block size, packed row bytes
  int bits, D, Pi, RB, BS, row;
  int64_t off_kc, off_vc, off_ks, off_km, off_vs, off_vm, off_ksum, off_vsum;
};

struct Ctx {
  Lay L;
  int H, Hq, QG, R;
  float scale;
  const void* q;
  int q_type;  // 0 fp32, 1 bf16, 2 fp16
  int64_t s_qt, s_qh;
  void* out;
  int o_type;
  int64_t s_ot, s_oh;
  const uint8_t* pages;
  int64_t s_pb, s_ph, s_pp;
  bool bf16;  // 16-bit pools: bf16 (else fp16)
  const uint16_t* stage;
  int64_t s_ss, s_sh;
  const uint16_t* sinks;
  int64_t s_ks, s_kh;
  const int32_t *bt, *seq, *qsl, *sslot, *kslot;
  int64_t s_bt;
};

// The instruction set the code products run on: "avx512-vnni" (4 and 8 bits; 2 bits use
// avx2), "avx2" or "scalar".
const char* isa();

// Attention of all requests of C into C.out (one call per layer).
void attend(const Ctx& C, int64_t max_splits);

}  // namespace hack
