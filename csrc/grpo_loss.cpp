// grpo_loss: the GRPO clipped-ratio loss with k3 KL, masking and aggregation (schema + CPU kernel).
//
// The maths is in r1mega/ops/grpo_loss.py. One pass over the inputs per row: the per-token loss
// terms are reduced into seven per-row partials (loss sum, valid count, clipped count, KL sum, ratio
// sum/min/max), and dloss/dlogp per token is written *without* the aggregation's normalisation,
// which needs counts over the whole batch; the normalisation is a per-row scale applied by the
// backward, so the backward is one elementwise pass. Rows are reduced in a fixed order, so results do
// not depend on the number of threads. Accumulation is in fp32 (fp64 for fp64 inputs). The fp32 row
// loop runs on 16-lane vectors built for AVX-512, AVX2 or SSE2 and chosen at run time (grpo_loss_rows.h).
// Left out: parallelism within a row (rows are the unit of work), anything but 2-D inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <bit>
#include <limits>
#include <type_traits>
#include <vector>

// 64-byte vector arguments of inline helpers: never an ABI boundary (nothing is exported).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace r1mega {
namespace {

constexpr int kStats = 5;     // clip_fraction, kl, ratio_mean, ratio_min, ratio_max
constexpr int kPartials = 7;  // per row: loss sum, valid, clipped, kl sum, ratio sum, ratio min, ratio max

// The fp32 fast path works on blocks of kLanes tokens held in GCC vector types: 16 fp32 = one
// AVX-512 register, two AVX2 or four SSE2 ones. The lane count is fixed, so the summation order, and
// the results, are the same whichever ISA runs. (Explicit vectors: GCC 12 did not vectorise the
// former `omp simd` loop at all once built for a chosen target.)
constexpr int kLanes = 16;
using VecF = float __attribute__((vector_size(4 * kLanes)));
using VecI = int32_t __attribute__((vector_size(4 * kLanes)));  // lane masks: -1 true, 0 false

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int agg_code(c10::string_view agg) {
  if (agg == "seq-mean-token-mean") return 0;
  if (agg == "token-mean") return 1;
  if (agg == "seq-mean-token-sum") return 2;
  TORCH_CHECK(agg == "seq-mean-token-sum-norm", "grpo_loss: unknown agg '", std::string(agg), "'");
  return 3;
}

struct Inputs {
  at::Tensor logp, old_logp, ref_logp, advantages, mask;  // contiguous; advantages in the acc dtype
  bool has_ref, adv_per_token;
};

Inputs prepare(const at::Tensor& logp, const at::Tensor& old_logp, const std::optional<at::Tensor>& ref_logp,
               const at::Tensor& advantages, const at::Tensor& mask) {
  TORCH_CHECK(logp.dim() == 2, "grpo_loss: logp must be [B, T]");
  TORCH_CHECK(old_logp.sizes() == logp.sizes() && mask.sizes() == logp.sizes(),
              "grpo_loss: old_logp and mask must have logp's shape");
  TORCH_CHECK(old_logp.scalar_type() == logp.scalar_type(), "grpo_loss: old_logp must have logp's dtype");
  TORCH_CHECK(at::isFloatingType(logp.scalar_type()), "grpo_loss: logp must be floating point");
  const bool per_token = advantages.dim() == 2;
  TORCH_CHECK(per_token ? advantages.sizes() == logp.sizes() : (advantages.dim() == 1 && advantages.size(0) == logp.size(0)),
              "grpo_loss: advantages must be [B] or [B, T]");
  Inputs in;
  in.logp = logp.contiguous();
  in.old_logp = old_logp.contiguous();
  in.has_ref = ref_logp.has_value();
  if (in.has_ref) {
    TORCH_CHECK(ref_logp->sizes() == logp.sizes() && ref_logp->scalar_type() == logp.scalar_type(),
                "grpo_loss: ref_logp must have logp's shape and dtype");
    in.ref_logp = ref_logp->contiguous();
  }
  in.advantages = advantages.to(acc_type(logp.scalar_type())).contiguous();
  in.adv_per_token = per_token;
  // The kernels read a bool mask or one of logp's dtype; anything else becomes bool (nonzero = valid).
  in.mask = (mask.scalar_type() == at::kBool || mask.scalar_type() == logp.scalar_type()) ? mask.contiguous() : mask.ne(0);
  return in;
}

// Row-major pointers and parameters of one forward call.
template <typename scalar_t, typename mask_t, typename acc_t>
struct Rows {
  const scalar_t *logp, *old_logp, *ref_logp;  // [B, T]; ref_logp null without KL
  const acc_t* adv;                            // [B] or [B, T]
  const mask_t* mask;                          // [B, T]
  acc_t* grad;                                 // [B, T] out: unnormalised dloss/dlogp
  double* part;                                // [B, kPartials] out
  int64_t T;
  acc_t lo, hi, beta;                          // 1 - clip_low, 1 + clip_high, beta
};

// The row kernel once per vector ISA (see grpo_loss_rows.h); the extension is built without -march,
// for any x86-64, and runs AVX-512, AVX2 or baseline x86-64 (SSE2) as ATen does (torch_isa).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace avx512 {
#include "grpo_loss_rows.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "grpo_loss_rows.h"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace baseline {
#include "grpo_loss_rows.h"
}  // namespace baseline

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The vector ISA ATen's own kernels use (its choice from the CPU, lowered by ATEN_CPU_CAPABILITY, which
// train.cpu_isa sets): one process then runs one ISA everywhere, and a pinned run the same on every CPU.
Isa torch_isa() {
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX512" ? Isa::kAvx512 : capability == "AVX2" ? Isa::kAvx2 : Isa::kBaseline;
  }();
  return isa;
}

template <bool kRef, bool kPerToken, typename scalar_t, typename mask_t, typename acc_t>
void forward_rows(const Rows<scalar_t, mask_t, acc_t>& in, int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (torch_isa()) {
    case Isa::kAvx512: return avx512::forward_rows<kRef, kPerToken>(in, begin, end);
    case Isa::kAvx2: return avx2::forward_rows<kRef, kPerToken>(in, begin, end);
    case Isa::kBaseline: break;
  }
#endif
  baseline::forward_rows<kRef, kPerToken>(in, begin, end);
}

int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

template <typename scalar_t, typename mask_t>
void grpo_forward_cpu(const Inputs& in, double lo, double hi, double beta, at::Tensor& grad, at::Tensor& partials) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = in.logp.size(0), T = in.logp.size(1);
  const Rows<scalar_t, mask_t, acc_t> rows{in.logp.data_ptr<scalar_t>(), in.old_logp.data_ptr<scalar_t>(),
                                           in.has_ref ? in.ref_logp.data_ptr<scalar_t>() : nullptr,
                                           in.advantages.data_ptr<acc_t>(), in.mask.data_ptr<mask_t>(),
                                           grad.data_ptr<acc_t>(), partials.data_ptr<double>(), T,
                                           acc_t(1 - lo), acc_t(1 + hi), acc_t(beta)};
  auto run = [&](auto ref, auto per_token) {
    at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
      forward_rows<decltype(ref)::value, decltype(per_token)::value>(rows, begin, end);
    });
  };
  if (in.has_ref) {
    in.adv_per_token ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
  } else {
    in.adv_per_token ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& advantages, const at::Tensor& mask, double clip_low, double clip_high, double beta,
    c10::string_view agg, int64_t max_len) {
  const int mode = agg_code(agg);
  const Inputs in = prepare(logp, old_logp, ref_logp, advantages, mask);
  const int64_t B = logp.size(0);
  const auto acc = acc_type(logp.scalar_type());
  at::Tensor grad = at::empty(logp.sizes(), logp.options().dtype(acc));               // [B, T]
  at::Tensor partials = at::empty({B, kPartials}, logp.options().dtype(at::kDouble));  // [B, 7]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "grpo_loss_cpu", [&] {
    if (in.mask.scalar_type() == at::kBool) {
      grpo_forward_cpu<scalar_t, bool>(in, clip_low, clip_high, beta, grad, partials);
    } else {
      grpo_forward_cpu<scalar_t, scalar_t>(in, clip_low, clip_high, beta, grad, partials);
    }
  });

  // Batch-level reduction over rows, in row order.
  const double* part = partials.data_ptr<double>();
  double n_tok = 0, n_seq = 0, clips = 0, kl = 0, ratio_sum = 0, loss = 0;
  double rmin = std::numeric_limits<double>::infinity(), rmax = -rmin;
  for (int64_t b = 0; b < B; ++b) {
    const double* p = part + b * kPartials;
    n_tok += p[1];
    n_seq += p[1] > 0 ? 1 : 0;
    clips += p[2];
    kl += p[3];
    ratio_sum += p[4];
    rmin = std::min(rmin, p[5]);
    rmax = std::max(rmax, p[6]);
  }
  const double seqs = std::max(n_seq, 1.0), toks = std::max(n_tok, 1.0);
  at::Tensor row_scale = at::empty({B}, logp.options().dtype(acc));  // [B] d loss / d (row's sum of l)
  AT_DISPATCH_FLOATING_TYPES(acc, "grpo_loss_cpu_scale", [&] {
    scalar_t* scale = row_scale.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const double n = part[b * kPartials + 1];
      const double s = mode == 0 ? (n > 0 ? 1.0 / (n * seqs) : 0.0)
                     : mode == 1 ? 1.0 / toks
                     : mode == 2 ? 1.0 / seqs
                                 : 1.0 / (seqs * static_cast<double>(max_len));
      scale[b] = static_cast<scalar_t>(s);
      loss += part[b * kPartials] * s;
    }
  });
  const bool any = n_tok > 0;
  at::Tensor stats = at::tensor({clips / toks, kl / toks, ratio_sum / toks, any ? rmin : 0.0, any ? rmax : 0.0},
                                at::TensorOptions().dtype(at::kDouble))
                         .to(acc);
  return {at::scalar_tensor(loss, logp.options().dtype(acc)), stats, grad, row_scale};
}

// grad_logp[b, t] = grad_loss * row_scale[b] * grad_factor[b, t], in the dtype of logp.
at::Tensor grpo_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_factor,
                                  const at::Tensor& row_scale, at::ScalarType dtype) {
  TORCH_CHECK(grad_factor.dim() == 2 && row_scale.dim() == 1 && row_scale.size(0) == grad_factor.size(0),
              "grpo_loss_backward: grad_factor must be [B, T] and row_scale [B]");
  const at::Tensor factor = grad_factor.contiguous(), scale = row_scale.contiguous();
  const int64_t B = factor.size(0), T = factor.size(1);
  at::Tensor out = at::empty(factor.sizes(), factor.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "grpo_loss_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t upstream = grad_loss.item().to<acc_t>();
    const acc_t* f = factor.data_ptr<acc_t>();
    const acc_t* s = scale.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "grpo_loss_backward_cpu_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const acc_t k = upstream * s[b];
          for (int64_t t = 0; t < T; ++t) o[b * T + t] = static_cast<scalar_t>(k * f[b * T + t]);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1mega, m) {
  m.def(
      "grpo_loss(Tensor logp, Tensor old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask, float clip_low, "
      "float clip_high, float beta, str agg, int max_len) -> (Tensor loss, Tensor stats, Tensor grad_factor, "
      "Tensor row_scale)");
  m.def("grpo_loss_backward(Tensor grad_loss, Tensor grad_factor, Tensor row_scale, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1mega, CPU, m) {
  m.impl("grpo_loss", &grpo_loss_cpu);
  m.impl("grpo_loss_backward", &grpo_loss_backward_cpu);
}

}  // namespace r1mega
