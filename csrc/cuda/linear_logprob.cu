// linear_logprob: CUDA kernels. The GEMMs of the chunk loop (linear_logprob.h) go to cuBLAS: bf16/fp16
// operands with an fp32 logits chunk, grad_hidden accumulated in fp32 (addmm with out_dtype), grad_weight
// written chunk by chunk in the input dtype. The elementwise work of a chunk is one kernel per pass:
//   stats: one block per row, float4 loads, block max then block sums of exp(x - max) and
//          exp(x - max) * (x - max), merged into the row's running (m, s, t) by thread 0;
//   grad:  one block per row, p = exp(x - lse), dz written in the GEMM operand dtype (bf16 for bf16).
// Left out: the [0, V) range check of the targets that the CPU op does (it would synchronise the stream).
#include "../linear_logprob.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

namespace r1mega {
namespace {

namespace d = linear_logprob_detail;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide max, returned to every thread.
template <typename T>
__device__ T block_max(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kWarps ? shared[lane] : shared[0];
  v = warp_max(v);
  __syncthreads();  // shared is reused by the next reduction
  return v;
}

// Block-wide sums of two values at once (only thread 0's result is used).
template <typename T>
__device__ void block_sum2(T& a, T& b, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) shared[warp] = a, shared[kWarps + warp] = b;
  __syncthreads();
  a = lane < kWarps ? shared[lane] : T(0);
  b = lane < kWarps ? shared[kWarps + lane] : T(0);
  a = warp_sum(a);
  b = warp_sum(b);
}

// Calls f(j, x_j) for every element of a row, float4 loads when the row allows it.
template <typename acc_t, typename F>
__device__ __forceinline__ void for_row(const acc_t* row, int64_t cw, F f) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cw % 4 == 0) {
      const float4* row4 = reinterpret_cast<const float4*>(row);
      for (int64_t q = threadIdx.x; q < cw / 4; q += kThreads) {
        const float4 v = row4[q];
        f(4 * q, v.x), f(4 * q + 1, v.y), f(4 * q + 2, v.z), f(4 * q + 3, v.w);
      }
      return;
    }
  }
  for (int64_t j = threadIdx.x; j < cw; j += kThreads) f(j, row[j]);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) stats_chunk_kernel(const acc_t* __restrict__ z, int64_t cw,
                                                               const int64_t* __restrict__ targets, int64_t v_begin,
                                                               acc_t inv_temp, acc_t* m, acc_t* s, acc_t* t,
                                                               acc_t* zt) {
  __shared__ acc_t shared[2 * kWarps];
  const int64_t r = blockIdx.x;
  const acc_t* row = z + r * cw;
  acc_t cm = -INFINITY;
  for_row(row, cw, [&](int64_t, acc_t v) { cm = max(cm, v * inv_temp); });
  cm = block_max(cm, shared);
  acc_t cs = 0, ct = 0;
  for_row(row, cw, [&](int64_t, acc_t v) {
    const acc_t x = v * inv_temp - cm;
    const acc_t e = exp(x);
    cs += e;
    ct += e * x;
  });
  block_sum2(cs, ct, shared);
  if (threadIdx.x != 0) return;
  // merge the chunk's (cm, cs, ct) into the running (m, s, t), all relative to their own max
  if (s[r] == acc_t(0)) {
    m[r] = cm, s[r] = cs, t[r] = ct;
  } else {
    const acc_t mo = m[r], so = s[r], mx = max(mo, cm);
    const acc_t a = exp(mo - mx), b = exp(cm - mx);
    t[r] = a * (t[r] + so * (mo - mx)) + b * (ct + cs * (cm - mx));
    s[r] = a * so + b * cs;
    m[r] = mx;
  }
  const int64_t local = targets[r] - v_begin;
  if (local >= 0 && local < cw) zt[r] = row[local] * inv_temp;
}

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads) grad_chunk_kernel(const acc_t* z, out_t* dz, int64_t cw,
                                                              const int64_t* __restrict__ targets, int64_t v_begin,
                                                              acc_t inv_temp, const acc_t* __restrict__ g,
                                                              const acc_t* __restrict__ ge,
                                                              const acc_t* __restrict__ lse,
                                                              const acc_t* __restrict__ entropy) {
  const int64_t r = blockIdx.x;
  const acc_t* row = z + r * cw;  // dz may alias z: each element is read by the thread that writes it
  out_t* out = dz + r * cw;
  const acc_t gr = g[r], ger = ge[r], l = lse[r], shift = entropy[r] - l;
  const int64_t local = targets[r] - v_begin;
  for_row(row, cw, [&](int64_t j, acc_t v) {
    const acc_t x = v * inv_temp;
    const acc_t p = exp(x - l);
    acc_t dx = -gr * p - ger * p * (x + shift);
    if (j == local) dx += gr;
    out[j] = static_cast<out_t>(dx * inv_temp);
  });
}

void stats_chunk_cuda(const at::Tensor& z, const at::Tensor& targets, int64_t v_begin, double inv_temp, at::Tensor& m,
                      at::Tensor& s, at::Tensor& t, at::Tensor& zt) {
  const int64_t n = z.size(0), cw = z.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_logprob_stats_cuda", [&] {
    stats_chunk_kernel<scalar_t><<<n, kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), cw, targets.data_ptr<int64_t>(), v_begin, static_cast<scalar_t>(inv_temp),
        m.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grad_chunk_cuda(const at::Tensor& z, at::Tensor& dz, const at::Tensor& targets, int64_t v_begin, double inv_temp,
                     const at::Tensor& g, const at::Tensor& ge, const at::Tensor& lse, const at::Tensor& entropy) {
  const int64_t n = z.size(0), cw = z.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "linear_logprob_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_chunk_kernel<acc_t, scalar_t><<<n, kThreads, 0, stream>>>(
        z.data_ptr<acc_t>(), dz.data_ptr<scalar_t>(), cw, targets.data_ptr<int64_t>(), v_begin,
        static_cast<acc_t>(inv_temp), g.data_ptr<acc_t>(), ge.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        entropy.data_ptr<acc_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_cuda(const at::Tensor& hidden,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& targets, double temperature,
                                                                      int64_t vocab_start, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return d::stats_loop(hidden, weight, targets, temperature, vocab_start, chunk_size, &stats_chunk_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                            const at::Tensor& targets, double temperature,
                                                            int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto [m, s, t, zt] = d::stats_loop(hidden, weight, targets, temperature, 0, chunk_size, &stats_chunk_cuda);
  return d::combine_stats(m, s, t, zt);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                                 const at::Tensor& hidden, const at::Tensor& weight,
                                                 const at::Tensor& targets, const at::Tensor& lse,
                                                 const at::Tensor& entropy, double temperature, int64_t vocab_start,
                                                 int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return d::backward_loop(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, vocab_start,
                          chunk_size, &grad_chunk_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(r1mega, CUDA, m) {
  m.impl("linear_logprob_stats", &stats_cuda);
  m.impl("linear_logprob", &logprob_cuda);
  m.impl("linear_logprob_backward", &backward_cuda);
}

}  // namespace r1mega
