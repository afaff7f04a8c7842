// HACK (arXiv 2502.03589) CPU attention: the Python binding (pybind11).
//
// Rule: everything that stays the same across calls is checked once. A CacheH holds one
// layer's pages / staging / sink tensors and the record layout; a BatchH holds one step's
// int32 metadata (shared by all layers); a PlanH one step's 17 int64 WritePlan tensors (shared
// by all layers: write_h(cache, plan, key, value) is the torch.ops ``write`` without re-parsing
// 17 tensors and 13 ints per layer). attention(q, out, cache, batch, scale, max_splits)
// then only checks q and out (fp32/bf16/fp16, [T, Hq, D], unit stride on D; returns False
// for anything else, so the caller converts) and runs the kernel with the GIL released. The
// handles keep their tensors alive; data pointers are read at each call.
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "hack_attn.h"

namespace hack {
// hack_write.cpp (also registered as the torch.ops ``write``).
void write(const at::Tensor& pages, const at::Tensor& stage, const at::Tensor& sinks,
           const at::Tensor& key, const at::Tensor& value, at::TensorList plan,
           c10::IntArrayRef lay);
namespace {

struct CacheH {
  at::Tensor pages, stage, sinks;
  Lay L;
  std::vector<int64_t> wlay;  // write's layout ints: bits, D, Pi, RB, row, 8 offsets
  CacheH(at::Tensor p, at::Tensor st, at::Tensor sk, const std::vector<int64_t>& lay)
      : pages(std::move(p)), stage(std::move(st)), sinks(std::move(sk)) {
    TORCH_CHECK(lay.size() == 14, "hack_cpu: 14 layout ints");
    TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 4 && pages.stride(3) == 1);
    TORCH_CHECK(stage.scalar_type() == sinks.scalar_type() && stage.dim() == 4 &&
                sinks.dim() == 4 && stage.stride(3) == 1 && sinks.stride(3) == 1);
    TORCH_CHECK(stage.scalar_type() == at::kBFloat16 || stage.scalar_type() == at::kHalf,
                "16-bit pools must be bf16 or fp16");
    TORCH_CHECK(pages.device().is_cpu() && stage.device().is_cpu() && sinks.device().is_cpu());
    L = Lay{int(lay[0]), int(lay[1]), int(lay[2]), int(lay[3]), int(lay[4]), int(lay[5]),
            lay[6], lay[7], lay[8], lay[9], lay[10], lay[11], lay[12], lay[13]};
    wlay = {lay[0], lay[1], lay[2], lay[3], lay[5]};
    wlay.insert(wlay.end(), lay.begin() + 6, lay.end());
  }
};

struct PlanH {
  std::vector<at::Tensor> t;
  explicit PlanH(std::vector<at::Tensor> ts) : t(std::move(ts)) {
    TORCH_CHECK(t.size() == 17, "hack_cpu.write: 17 plan tensors");
    for (const auto& x : t)
      TORCH_CHECK(x.scalar_type() == at::kLong && x.is_contiguous() && x.device().is_cpu(),
                  "int64 plan tensors");
  }
};

void write_h(const CacheH& c, const PlanH& p, const at::Tensor& key, const at::Tensor& value) {
  pybind11::gil_scoped_release no_gil;
  write(c.pages, c.stage, c.sinks, key, value, p.t, c.wlay);
}

struct BatchH {
  at::Tensor bt, seq, qsl, ss, ks;
  BatchH(at::Tensor bt_, at::Tensor seq_, at::Tensor qsl_, at::Tensor ss_, at::Tensor ks_)
      : bt(std::move(bt_)), seq(std::move(seq_)), qsl(std::move(qsl_)), ss(std::move(ss_)),
        ks(std::move(ks_)) {
    for (auto* t : {&bt, &seq, &qsl, &ss, &ks})
      TORCH_CHECK(t->scalar_type() == at::kInt && t->stride(-1) == 1 && t->device().is_cpu(),
                  "int32 metadata");
    const int64_t R = seq.numel();
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) >= R && qsl.numel() >= R + 1 && ss.numel() >= R &&
                ks.numel() >= R, "hack_cpu: metadata sizes");
  }
};

int ftype(const at::Tensor& t) {  // -1: not usable as is
  const auto st = t.scalar_type();
  if (t.dim() != 3 || t.stride(2) != 1 || !t.device().is_cpu()) return -1;
  return st == at::kFloat ? 0 : st == at::kBFloat16 ? 1 : st == at::kHalf ? 2 : -1;
}

bool attention(const at::Tensor& q, const at::Tensor& out, const CacheH& c, const BatchH& b,
               double scale, int64_t max_splits) {
  const int q_type = ftype(q), o_type = ftype(out);
  if (q_type < 0 || o_type < 0) return false;
  TORCH_CHECK(q.sizes() == out.sizes() && q.size(2) == c.L.D, "hack_cpu: q/out [T, Hq, D]");
  Ctx C;
  C.L = c.L;
  C.H = c.pages.size(1), C.Hq = q.size(1), C.QG = C.Hq / C.H, C.R = b.seq.size(0);
  TORCH_CHECK(C.QG * C.H == C.Hq, "hack_cpu: query heads must be a multiple of KV heads");
  C.scale = float(scale);
  C.q = q.data_ptr(), C.q_type = q_type, C.s_qt = q.stride(0), C.s_qh = q.stride(1);
  C.out = out.data_ptr(), C.o_type = o_type, C.s_ot = out.stride(0), C.s_oh = out.stride(1);
  C.pages = c.pages.data_ptr<uint8_t>();
  C.s_pb = c.pages.stride(0), C.s_ph = c.pages.stride(1), C.s_pp = c.pages.stride(2);
  C.bf16 = c.stage.scalar_type() == at::kBFloat16;
  C.stage = reinterpret_cast<const uint16_t*>(c.stage.data_ptr());
  C.s_ss = c.stage.stride(0), C.s_sh = c.stage.stride(1);
  C.sinks = reinterpret_cast<const uint16_t*>(c.sinks.data_ptr());
  C.s_ks = c.sinks.stride(0), C.s_kh = c.sinks.stride(1);
  C.bt = b.bt.data_ptr<int32_t>(), C.s_bt = b.bt.stride(0);
  C.seq = b.seq.data_ptr<int32_t>(), C.qsl = b.qsl.data_ptr<int32_t>();
  C.sslot = b.ss.data_ptr<int32_t>(), C.kslot = b.ks.data_ptr<int32_t>();
  pybind11::gil_scoped_release no_gil;
  attend(C, max_splits);
  return true;
}

}  // namespace
}  // namespace hack

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<hack::CacheH>(m, "CacheH")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, const std::vector<int64_t>&>());
  py::class_<hack::BatchH>(m, "BatchH")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>());
  py::class_<hack::PlanH>(m, "PlanH").def(py::init<std::vector<at::Tensor>>());
  m.def("attention", &hack::attention);
  m.def("write_h", &hack::write_h);
  m.def("isa", &hack::isa);
}
