// grpo_loss: CUDA kernels (the schema and the CPU kernel are in csrc/grpo_loss.cpp, the maths in
// r1mega/ops/grpo_loss.py).
//
// Forward: one block per (row, chunk of 256 x 8 tokens); each thread loads 8 consecutive tokens of
// each input with one vector load per tensor (when rows are 8-aligned; element loads otherwise),
// writes the unnormalised dloss/dlogp, and the block reduces its seven partials (loss sum, valid,
// clipped, KL sum, ratio sum/min/max) with warp shuffles into its own slot: no atomics, so results are
// deterministic. A one-block finalize kernel reduces the partials in a fixed order (fp64), computes
// the aggregation's per-row scale, the loss and the statistics, all on device (no host sync).
// Backward: grad = upstream * row_scale[b] * factor, one vectorised elementwise pass.
// exp is the CPU kernel's polynomial (csrc/exp_poly.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace r1mega {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;
constexpr int kChunk = kThreads * kVec;  // tokens per block
constexpr int kPartials = 7;             // loss sum, valid, clipped, kl sum, ratio sum, ratio min, ratio max
constexpr int kFinalThreads = 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads kVec elements starting at token t of a row of length T (zeros past its end).
template <typename T>
__device__ __forceinline__ void load(const T* row, int64_t t, int64_t T_len, bool vec, T (&out)[kVec]) {
  if (vec) {
    if (t < T_len) {
      *reinterpret_cast<Pack<T, kVec>*>(out) = *reinterpret_cast<const Pack<T, kVec>*>(row + t);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = T(0);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = t + i < T_len ? row[t + i] : T(0);
}

template <typename T>
__device__ __forceinline__ void store(T* row, int64_t t, int64_t T_len, bool vec, const T (&in)[kVec]) {
  if (vec) {
    if (t < T_len) *reinterpret_cast<Pack<T, kVec>*>(row + t) = *reinterpret_cast<const Pack<T, kVec>*>(in);
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i)
    if (t + i < T_len) row[t + i] = in[i];
}

// The helpers exp_poly.h asks for, on scalars.
__device__ __forceinline__ float where(bool c, float a, float b) { return c ? a : b; }
__device__ __forceinline__ int to_int(float x) { return static_cast<int>(x); }
__device__ __forceinline__ float as_float(int x) { return __int_as_float(x); }
#define R1MEGA_EXP_QUALIFIERS __device__ __forceinline__
#include "../exp_poly.h"
#undef R1MEGA_EXP_QUALIFIERS

__device__ __forceinline__ float exp_acc(float x) { return exp_poly(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// c * e where e = exp(x) (a ratio, or exp of the KL's log-ratio): the plain product where it is finite,
// else sign(c) exp(x + ln|c|), which overflows only where the product itself does, and exactly 0 for
// c = 0 whatever e (not 0 * inf = NaN). The CPU kernel's `times_exp`.
template <typename acc_t>
__device__ __forceinline__ acc_t times_exp(acc_t c, acc_t e, acc_t x) {
  const acc_t product = c * e;
  if (isfinite(product)) return product;
  return c == acc_t(0) ? acc_t(0) : copysign(exp_acc(x + log(fabs(c))), c);
}

template <typename acc_t>
struct Part {
  acc_t v[kPartials];
};

template <typename acc_t>
__device__ __forceinline__ void combine(Part<acc_t>& a, const Part<acc_t>& b) {
#pragma unroll
  for (int k = 0; k < 5; ++k) a.v[k] += b.v[k];
  a.v[5] = min(a.v[5], b.v[5]);
  a.v[6] = max(a.v[6], b.v[6]);
}

template <typename acc_t>
__device__ __forceinline__ void warp_combine(Part<acc_t>& p) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Part<acc_t> other;
#pragma unroll
    for (int k = 0; k < kPartials; ++k) other.v[k] = __shfl_down_sync(0xffffffffu, p.v[k], offset);
    combine(p, other);
  }
}

template <typename scalar_t, typename mask_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) grpo_forward_kernel(
    const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old_logp, const scalar_t* __restrict__ ref_logp,
    const acc_t* __restrict__ adv, bool adv_per_token, const mask_t* __restrict__ mask, int64_t T, int64_t chunks,
    bool vec, acc_t lo, acc_t hi, acc_t beta, acc_t* __restrict__ grad, acc_t* __restrict__ partials) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t t0 = chunk * kChunk + static_cast<int64_t>(threadIdx.x) * kVec;
  const int64_t off = row * T;
  scalar_t lp[kVec], old[kVec], ref[kVec];
  mask_t m[kVec];
  acc_t a[kVec], g[kVec];
  load(logp + off, t0, T, vec, lp);
  load(old_logp + off, t0, T, vec, old);
  load(mask + off, t0, T, vec, m);
  if (ref_logp != nullptr) load(ref_logp + off, t0, T, vec, ref);
  if (adv_per_token) {
    load(adv + off, t0, T, vec, a);
  } else {
    const acc_t row_adv = adv[row];
#pragma unroll
    for (int i = 0; i < kVec; ++i) a[i] = row_adv;
  }
  const acc_t inf = static_cast<acc_t>(INFINITY);
  Part<acc_t> p{{0, 0, 0, 0, 0, inf, -inf}};
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const bool valid = static_cast<float>(m[i]) != 0.0f && t0 + i < T;
    const acc_t x_lp = static_cast<acc_t>(lp[i]);
    const acc_t log_ratio = valid ? x_lp - static_cast<acc_t>(old[i]) : acc_t(0);
    const acc_t ratio = exp_acc(log_ratio);
    const bool pos = a[i] >= 0;
    const bool clipped = valid && a[i] != 0 && (pos ? ratio > hi : ratio < lo);
    const acc_t ratio_a = times_exp(a[i], ratio, log_ratio);
    const acc_t surrogate = clipped ? (pos ? hi : lo) * a[i] : ratio_a;
    acc_t kl = 0, beta_kl = 0, beta_dkl = 0;
    if (ref_logp != nullptr) {
      const acc_t x = valid ? static_cast<acc_t>(ref[i]) - x_lp : acc_t(0);  // log(pi_ref / pi)
      const acc_t ex = exp_acc(x);
      const acc_t beta_ex = times_exp(beta, ex, x);
      kl = ex - x - 1;
      beta_kl = beta_ex - beta * (x + 1);
      beta_dkl = beta - beta_ex;  // beta * d kl / d logp
    }
    g[i] = valid ? (clipped ? acc_t(0) : -ratio_a) + beta_dkl : acc_t(0);
    if (valid) {
      p.v[0] += beta_kl - surrogate;
      p.v[1] += 1;
      p.v[2] += clipped ? 1 : 0;
      p.v[3] += kl;
      p.v[4] += ratio;
      p.v[5] = min(p.v[5], ratio);
      p.v[6] = max(p.v[6], ratio);
    }
  }
  store(grad + off, t0, T, vec, g);

  __shared__ Part<acc_t> warp_parts[kThreads / 32];
  warp_combine(p);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_parts[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kThreads / 32 ? warp_parts[lane] : Part<acc_t>{{0, 0, 0, 0, 0, inf, -inf}};
    warp_combine(p);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kPartials; ++k) partials[blockIdx.x * kPartials + k] = p.v[k];
    }
  }
}

// Sum (or min/max) of one value per thread over the block; every thread gets the result.
template <typename Op>
__device__ double block_reduce(double v, double* shared, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // `shared` may still be read by the previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kFinalThreads / 32; ++w) v = op(v, shared[w]);
  return v;
}

struct Add {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Min {
  __device__ double operator()(double a, double b) const { return fmin(a, b); }
};
struct Max {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Sums a row's chunk partials in chunk order.
template <typename acc_t>
__device__ void row_totals(const acc_t* partials, int64_t row, int64_t chunks, double (&out)[kPartials]) {
  out[0] = out[1] = out[2] = out[3] = out[4] = 0;
  out[5] = INFINITY;
  out[6] = -INFINITY;
  for (int64_t c = 0; c < chunks; ++c) {
    const acc_t* p = partials + (row * chunks + c) * kPartials;
    for (int k = 0; k < 5; ++k) out[k] += p[k];
    out[5] = fmin(out[5], static_cast<double>(p[5]));
    out[6] = fmax(out[6], static_cast<double>(p[6]));
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads) grpo_finalize_kernel(
    const acc_t* __restrict__ partials, int64_t B, int64_t chunks, int mode, double max_len,
    acc_t* __restrict__ loss, acc_t* __restrict__ stats, acc_t* __restrict__ row_scale) {
  __shared__ double shared[kFinalThreads / 32];
  double n_tok = 0, n_seq = 0, clips = 0, kl = 0, ratio_sum = 0, rmin = INFINITY, rmax = -INFINITY;
  double tot[kPartials];
  for (int64_t b = threadIdx.x; b < B; b += kFinalThreads) {
    row_totals(partials, b, chunks, tot);
    n_tok += tot[1];
    n_seq += tot[1] > 0 ? 1 : 0;
    clips += tot[2];
    kl += tot[3];
    ratio_sum += tot[4];
    rmin = fmin(rmin, tot[5]);
    rmax = fmax(rmax, tot[6]);
  }
  n_tok = block_reduce(n_tok, shared, Add());
  n_seq = block_reduce(n_seq, shared, Add());
  clips = block_reduce(clips, shared, Add());
  kl = block_reduce(kl, shared, Add());
  ratio_sum = block_reduce(ratio_sum, shared, Add());
  rmin = block_reduce(rmin, shared, Min());
  rmax = block_reduce(rmax, shared, Max());
  const double seqs = fmax(n_seq, 1.0), toks = fmax(n_tok, 1.0);
  double total = 0;
  for (int64_t b = threadIdx.x; b < B; b += kFinalThreads) {
    row_totals(partials, b, chunks, tot);
    const double s = mode == 0 ? (tot[1] > 0 ? 1.0 / (tot[1] * seqs) : 0.0)
                   : mode == 1 ? 1.0 / toks
                   : mode == 2 ? 1.0 / seqs
                               : 1.0 / (seqs * max_len);
    row_scale[b] = static_cast<acc_t>(s);
    total += tot[0] * s;
  }
  total = block_reduce(total, shared, Add());
  if (threadIdx.x == 0) {
    const bool any = n_tok > 0;
    *loss = static_cast<acc_t>(total);
    stats[0] = static_cast<acc_t>(clips / toks);
    stats[1] = static_cast<acc_t>(kl / toks);
    stats[2] = static_cast<acc_t>(ratio_sum / toks);
    stats[3] = static_cast<acc_t>(any ? rmin : 0.0);
    stats[4] = static_cast<acc_t>(any ? rmax : 0.0);
  }
}

template <typename acc_t, typename scalar_t>
__global__ void __launch_bounds__(kThreads) grpo_backward_kernel(
    const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ factor, const acc_t* __restrict__ row_scale,
    int64_t T, int64_t chunks, bool vec, scalar_t* __restrict__ out) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t t0 = chunk * kChunk + static_cast<int64_t>(threadIdx.x) * kVec;
  const acc_t k = *grad_loss * row_scale[row];
  acc_t f[kVec];
  scalar_t o[kVec];
  load(factor + row * T, t0, T, vec, f);
#pragma unroll
  for (int i = 0; i < kVec; ++i) o[i] = static_cast<scalar_t>(k * f[i]);
  store(out + row * T, t0, T, vec, o);
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

int agg_code(c10::string_view agg) {
  if (agg == "seq-mean-token-mean") return 0;
  if (agg == "token-mean") return 1;
  if (agg == "seq-mean-token-sum") return 2;
  TORCH_CHECK(agg == "seq-mean-token-sum-norm", "grpo_loss: unknown agg '", std::string(agg), "'");
  return 3;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss_cuda(
    const at::Tensor& logp_in, const at::Tensor& old_in, const std::optional<at::Tensor>& ref_in,
    const at::Tensor& adv_in, const at::Tensor& mask_in, double clip_low, double clip_high, double beta,
    c10::string_view agg, int64_t max_len) {
  const int mode = agg_code(agg);
  TORCH_CHECK(logp_in.dim() == 2, "grpo_loss: logp must be [B, T]");
  TORCH_CHECK(old_in.sizes() == logp_in.sizes() && mask_in.sizes() == logp_in.sizes(),
              "grpo_loss: old_logp and mask must have logp's shape");
  TORCH_CHECK(old_in.scalar_type() == logp_in.scalar_type(), "grpo_loss: old_logp must have logp's dtype");
  TORCH_CHECK(!ref_in.has_value() || (ref_in->sizes() == logp_in.sizes() && ref_in->scalar_type() == logp_in.scalar_type()),
              "grpo_loss: ref_logp must have logp's shape and dtype");
  const bool per_token = adv_in.dim() == 2;
  TORCH_CHECK(per_token ? adv_in.sizes() == logp_in.sizes() : (adv_in.dim() == 1 && adv_in.size(0) == logp_in.size(0)),
              "grpo_loss: advantages must be [B] or [B, T]");
  const c10::cuda::CUDAGuard guard(logp_in.device());
  const auto acc = logp_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor logp = logp_in.contiguous(), old_logp = old_in.contiguous();
  const at::Tensor ref_logp = ref_in.has_value() ? ref_in->contiguous() : at::Tensor();
  const at::Tensor adv = adv_in.to(acc).contiguous();
  const at::Tensor mask = (mask_in.scalar_type() == at::kBool || mask_in.scalar_type() == logp.scalar_type())
                              ? mask_in.contiguous() : mask_in.ne(0);
  const int64_t B = logp.size(0), T = logp.size(1);
  const int64_t chunks = std::max<int64_t>(1, (T + kChunk - 1) / kChunk);
  at::Tensor grad = at::empty(logp.sizes(), logp.options().dtype(acc));
  at::Tensor partials = at::empty({B * chunks, kPartials}, logp.options().dtype(acc));
  at::Tensor loss = at::empty({}, logp.options().dtype(acc));
  at::Tensor stats = at::empty({5}, logp.options().dtype(acc));
  at::Tensor row_scale = at::empty({B}, logp.options().dtype(acc));
  if (B == 0) {
    loss.zero_();
    stats.zero_();
    return {loss, stats, grad, row_scale};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "grpo_loss_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto launch = [&](auto mask_tag) {
      using mask_t = decltype(mask_tag);
      const int64_t row_bytes = kVec * sizeof(scalar_t);
      const bool vec = T % kVec == 0 && aligned(logp.data_ptr(), row_bytes) && aligned(old_logp.data_ptr(), row_bytes) &&
                       (!ref_logp.defined() || aligned(ref_logp.data_ptr(), row_bytes)) &&
                       aligned(mask.data_ptr(), kVec * sizeof(mask_t)) && aligned(grad.data_ptr(), kVec * sizeof(acc_t)) &&
                       (!per_token || aligned(adv.data_ptr(), kVec * sizeof(acc_t)));
      grpo_forward_kernel<scalar_t, mask_t, acc_t><<<B * chunks, kThreads, 0, stream>>>(
          logp.data_ptr<scalar_t>(), old_logp.data_ptr<scalar_t>(),
          ref_logp.defined() ? ref_logp.data_ptr<scalar_t>() : nullptr, adv.data_ptr<acc_t>(), per_token,
          reinterpret_cast<const mask_t*>(mask.data_ptr()), T, chunks, vec, acc_t(1 - clip_low), acc_t(1 + clip_high),
          acc_t(beta), grad.data_ptr<acc_t>(), partials.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (mask.scalar_type() == at::kBool) {
      launch(bool{});
    } else {
      launch(scalar_t{});
    }
    grpo_finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        partials.data_ptr<acc_t>(), B, chunks, mode, static_cast<double>(max_len), loss.data_ptr<acc_t>(),
        stats.data_ptr<acc_t>(), row_scale.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats, grad, row_scale};
}

at::Tensor grpo_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_factor, const at::Tensor& row_scale,
                                   at::ScalarType dtype) {
  TORCH_CHECK(grad_factor.dim() == 2 && row_scale.dim() == 1 && row_scale.size(0) == grad_factor.size(0),
              "grpo_loss_backward: grad_factor must be [B, T] and row_scale [B]");
  const c10::cuda::CUDAGuard guard(grad_factor.device());
  const at::Tensor factor = grad_factor.contiguous(), scale = row_scale.to(factor.scalar_type()).contiguous();
  const at::Tensor upstream = grad_loss.to(factor.options()).contiguous();
  const int64_t B = factor.size(0), T = factor.size(1);
  at::Tensor out = at::empty(factor.sizes(), factor.options().dtype(dtype));
  const int64_t chunks = std::max<int64_t>(1, (T + kChunk - 1) / kChunk);
  if (B == 0 || T == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "grpo_loss_backward_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "grpo_loss_backward_cuda_out", [&] {
      const bool vec = T % kVec == 0 && aligned(factor.data_ptr(), kVec * sizeof(acc_t)) &&
                       aligned(out.data_ptr(), kVec * sizeof(scalar_t));
      grpo_backward_kernel<acc_t, scalar_t><<<B * chunks, kThreads, 0, stream>>>(
          upstream.data_ptr<acc_t>(), factor.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), T, chunks, vec,
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1mega, CUDA, m) {
  m.impl("grpo_loss", &grpo_loss_cuda);
  m.impl("grpo_loss_backward", &grpo_loss_backward_cuda);
}

}  // namespace r1mega
