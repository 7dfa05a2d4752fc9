// grpo_loss: the GRPO clipped-ratio loss with k3 KL, masking and aggregation (schema + CPU kernel).
//
// The maths is in r1mega/ops/grpo_loss.py. One pass over the inputs per row: the per-token loss
// terms are reduced into seven per-row partials (loss sum, valid count, clipped count, KL sum, ratio
// sum/min/max), and dloss/dlogp per token is written *without* the aggregation's normalisation,
// which needs counts over the whole batch; the normalisation is a per-row scale applied by the
// backward, so the backward is one elementwise pass. Rows are reduced in a fixed order, so results do
// not depend on the number of threads. Accumulation is in fp32 (fp64 for fp64 inputs).
// Left out: parallelism within a row (rows are the unit of work), anything but 2-D inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace r1mega {
namespace {

constexpr int kStats = 5;     // clip_fraction, kl, ratio_mean, ratio_min, ratio_max
constexpr int kPartials = 7;  // per row: loss sum, valid, clipped, kl sum, ratio sum, ratio min, ratio max

// exp for fp32 that the compiler can vectorise inside `omp simd` (std::exp is an opaque call):
// Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for exp(r) (Cephes' expf, ~1 ulp) and
// 2^n built from exponent bits in two halves so n = 128 does not overflow. Returns inf above fp32's
// range, 0 below the smallest normal (denormals flushed), NaN for NaN.
inline float exp_fast(float x) {
  constexpr float kHi = 88.72283935546875f, kLo = -87.3f;
  const float xc = std::min(std::max(x, kLo), kHi);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n), e1 = e >> 1;
  const int32_t b1 = (e1 + 127) << 23, b2 = (e - e1 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  const float out = y * s1 * s2;
  return x > kHi ? std::numeric_limits<float>::infinity() : (x < kLo ? 0.0f : (x != x ? x : out));
}
inline double exp_fast(double x) { return std::exp(x); }  // fp64 is for gradcheck, not speed

// c * e where e = exp(x) (a ratio, or exp of the KL's log-ratio): the plain product where it is finite,
// else sign(c) exp(x + ln|c|), which overflows only where the product itself does, and exactly 0 for
// c = 0 whatever e (not 0 * inf = NaN). Scalar std::exp/log: only for the rare rows that need it.
template <typename acc_t>
inline acc_t times_exp(acc_t c, acc_t e, acc_t x) {
  const acc_t product = c * e;
  if (std::isfinite(product)) return product;
  return c == 0 ? acc_t(0) : std::copysign(std::exp(x + std::log(std::abs(c))), c);
}

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

// One row: writes the unnormalised dloss/dlogp to `grad` and the row's partials to `part`. kExact:
// the products ratio * A and beta * exp(x) through `times_exp` (scalar); otherwise plain (vectorised),
// which a non-finite row loss sends back here with kExact (see grpo_forward_cpu).
template <bool kExact, typename scalar_t, typename mask_t, typename acc_t>
void grpo_row(const scalar_t* logp, const scalar_t* old_logp, const scalar_t* ref_logp, const acc_t* adv,
              int64_t adv_stride, const mask_t* mask, int64_t T, acc_t lo, acc_t hi, acc_t beta, acc_t* grad,
              double* part) {
  acc_t loss = 0, count = 0, clips = 0, kl_sum = 0, ratio_sum = 0;
  acc_t rmin = std::numeric_limits<acc_t>::infinity(), rmax = -std::numeric_limits<acc_t>::infinity();
  const bool has_ref = ref_logp != nullptr;
#pragma omp simd reduction(+ : loss, count, clips, kl_sum, ratio_sum) reduction(min : rmin) reduction(max : rmax)
  for (int64_t t = 0; t < T; ++t) {
    const bool valid = static_cast<float>(mask[t]) != 0.0f;
    const acc_t a = adv[t * adv_stride];
    const acc_t lp = static_cast<acc_t>(logp[t]);
    const acc_t log_ratio = valid ? lp - static_cast<acc_t>(old_logp[t]) : acc_t(0);
    const acc_t ratio = exp_fast(log_ratio);
    const bool pos = a >= 0;
    const bool clipped = valid && a != 0 && (pos ? ratio > hi : ratio < lo);
    const acc_t ratio_a = kExact ? times_exp(a, ratio, log_ratio) : ratio * a;
    const acc_t surrogate = clipped ? (pos ? hi : lo) * a : ratio_a;
    acc_t kl = 0, beta_kl = 0, beta_dkl = 0;
    if (has_ref) {
      const acc_t x = valid ? static_cast<acc_t>(ref_logp[t]) - lp : acc_t(0);  // log(pi_ref / pi)
      const acc_t ex = exp_fast(x);
      const acc_t beta_ex = kExact ? times_exp(beta, ex, x) : beta * ex;
      kl = ex - x - 1;
      beta_kl = beta_ex - beta * (x + 1);
      beta_dkl = beta - beta_ex;  // beta * d kl / d logp
    }
    // d(-(surrogate - beta kl))/dlogp; the clipped branch is constant in logp.
    const acc_t g = (clipped ? acc_t(0) : -ratio_a) + beta_dkl;
    grad[t] = valid ? g : acc_t(0);
    loss += valid ? beta_kl - surrogate : acc_t(0);
    count += valid ? acc_t(1) : acc_t(0);
    clips += clipped ? acc_t(1) : acc_t(0);
    kl_sum += valid ? kl : acc_t(0);
    ratio_sum += valid ? ratio : acc_t(0);
    rmin = std::min(rmin, valid ? ratio : std::numeric_limits<acc_t>::infinity());
    rmax = std::max(rmax, valid ? ratio : -std::numeric_limits<acc_t>::infinity());
  }
  part[0] = loss;
  part[1] = count;
  part[2] = clips;
  part[3] = kl_sum;
  part[4] = ratio_sum;
  part[5] = rmin;
  part[6] = rmax;
}

template <typename scalar_t, typename mask_t>
void grpo_forward_cpu(const Inputs& in, double lo, double hi, double beta, at::Tensor& grad, at::Tensor& partials) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = in.logp.size(0), T = in.logp.size(1);
  const scalar_t* logp = in.logp.data_ptr<scalar_t>();
  const scalar_t* old_logp = in.old_logp.data_ptr<scalar_t>();
  const scalar_t* ref_logp = in.has_ref ? in.ref_logp.data_ptr<scalar_t>() : nullptr;
  const acc_t* adv = in.advantages.data_ptr<acc_t>();
  const mask_t* mask = in.mask.data_ptr<mask_t>();
  acc_t* g = grad.data_ptr<acc_t>();
  double* part = partials.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t off = b * T;
      auto row = [&](auto exact) {
        grpo_row<decltype(exact)::value, scalar_t, mask_t, acc_t>(
            logp + off, old_logp + off, ref_logp ? ref_logp + off : nullptr, adv + (in.adv_per_token ? off : b),
            in.adv_per_token ? 1 : 0, mask + off, T, acc_t(1 - lo), acc_t(1 + hi), acc_t(beta), g + off,
            part + b * kPartials);
      };
      row(std::false_type{});
      // A product that overflowed (or 0 * inf) made the row's loss non-finite: redo the row exactly.
      if (!std::isfinite(part[b * kPartials])) row(std::true_type{});
    }
  });
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
      at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const acc_t k = upstream * s[b];
_Pragma("omp simd") for (int64_t t = 0; t < T; ++t) o[b * T + t] = static_cast<scalar_t>(k * f[b * T + t]);
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
