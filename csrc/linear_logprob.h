// linear_logprob: the vocabulary-chunk loop shared by the CPU (linear_logprob.cpp) and CUDA
// (cuda/linear_logprob.cu) kernels. Only the per-chunk elementwise work differs between devices; the
// GEMMs are ATen calls (MKL/oneDNN on CPU, cuBLAS on CUDA) into one preallocated chunk buffer.
//
// Conventions: z = hidden @ weight[v0:v0+cw].T is the raw logit chunk [N, cw] in the accumulation type
// (fp32, or fp64 for fp64 inputs); the temperature is applied inside the elementwise kernels
// (x = z * inv_temp), so hidden is never rescaled or copied. `vocab_start` is the global id of this
// shard's first row of `weight` (0 without vocabulary parallelism).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace r1mega {
namespace linear_logprob_detail {

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                         double temperature, int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "linear_logprob: hidden must be [N, H] and weight [V, H]");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "linear_logprob: hidden and weight disagree on H");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_logprob: hidden and weight must share a dtype");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "linear_logprob: targets must be [N]");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "linear_logprob: targets must be int64");
  TORCH_CHECK(temperature > 0, "linear_logprob: temperature must be positive");
  TORCH_CHECK(chunk_size > 0, "linear_logprob: chunk_size must be positive");
}

// GEMM operands: on CUDA the inputs go to cuBLAS in their own dtype (bf16 x bf16 -> fp32 output);
// the CPU BLAS has no mixed-dtype GEMM, so low-precision inputs are upcast (hidden once, weight per chunk).
inline at::Tensor gemm_operand(const at::Tensor& t) {
  return t.is_cuda() ? t.contiguous() : t.contiguous().to(acc_type(t));
}

// out = a @ b in out's dtype (a mixed-dtype cuBLAS GEMM when a is bf16/fp16 and out fp32).
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

// acc += a @ b, acc in the accumulation dtype.
inline void addmm_into(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    at::addmm_out(acc, acc, a, b, acc.scalar_type());
  }
}

// The first n*cw elements of a flat buffer, as a contiguous [n, cw] matrix (the last chunk is narrower).
inline at::Tensor chunk_view(const at::Tensor& flat, int64_t n, int64_t cw) {
  return flat.narrow(0, 0, n * cw).view({n, cw});
}

// Per-row statistics of one shard of the vocabulary, relative to the row's running max m:
//   s = sum_j exp(x_j - m),  t = sum_j exp(x_j - m) * (x_j - m),  zt = x[target] (0 if not in this shard).
// The chunk function merges one chunk into (m, s, t, zt) in place.
using StatsChunkFn = void (*)(const at::Tensor& z, const at::Tensor& targets, int64_t v_begin, double inv_temp,
                              at::Tensor& m, at::Tensor& s, at::Tensor& t, at::Tensor& zt);

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_loop(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double temperature,
    int64_t vocab_start, int64_t chunk_size, StatsChunkFn chunk_fn) {
  check_inputs(hidden, weight, targets, temperature, chunk_size);
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  at::Tensor m = at::full({n}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor s = at::zeros({n}, opts), t = at::zeros({n}, opts), zt = at::zeros({n}, opts);
  if (n == 0 || v == 0) return {m, s, t, zt};
  const at::Tensor h = gemm_operand(hidden);
  const at::Tensor tg = targets.contiguous();
  const int64_t chunk = std::min(chunk_size, v);
  at::Tensor flat = at::empty({n * chunk}, opts);  // the one [N, chunk] logits buffer
  for (int64_t v0 = 0; v0 < v; v0 += chunk) {
    const int64_t cw = std::min(chunk, v - v0);
    at::Tensor z = chunk_view(flat, n, cw);
    mm_into(z, h, gemm_operand(weight.narrow(0, v0, cw)).t());
    chunk_fn(z, tg, vocab_start + v0, 1.0 / temperature, m, s, t, zt);
  }
  return {m, s, t, zt};
}

// logp = zt - lse, entropy = log s - t / s, with lse = m + log s (one shard = the whole vocabulary).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> combine_stats(const at::Tensor& m, const at::Tensor& s,
                                                                    const at::Tensor& t, const at::Tensor& zt) {
  at::Tensor log_s = s.log();
  at::Tensor lse = m + log_s;
  return {zt - lse, log_s - t / s, lse};
}

// Writes dz = d(loss)/d(hidden @ w_chunk.T) for one chunk into `dz` (dtype of the GEMM operands; may
// alias z), given per-row upstream grads of logp (g) and entropy (ge) and the global lse and entropy:
//   dx_j = g (1[j = target] - p_j) - ge p_j (x_j - lse + H),   p_j = exp(x_j - lse),   dz = dx * inv_temp.
using GradChunkFn = void (*)(const at::Tensor& z, at::Tensor& dz, const at::Tensor& targets, int64_t v_begin,
                             double inv_temp, const at::Tensor& g, const at::Tensor& ge, const at::Tensor& lse,
                             const at::Tensor& entropy);

inline std::tuple<at::Tensor, at::Tensor> backward_loop(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    int64_t vocab_start, int64_t chunk_size, GradChunkFn chunk_fn) {
  check_inputs(hidden, weight, targets, temperature, chunk_size);
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor grad_hidden = at::zeros({n, hidden.size(1)}, opts);  // accumulated over chunks in fp32
  if (n == 0 || v == 0) return {grad_hidden.to(hidden.scalar_type()), grad_weight.zero_()};
  const at::Tensor h = gemm_operand(hidden);
  const at::Tensor tg = targets.contiguous();
  const at::Tensor g = grad_logp.to(acc).contiguous(), ge = grad_entropy.to(acc).contiguous();
  const at::Tensor l = lse.to(acc).contiguous(), e = entropy.to(acc).contiguous();
  const int64_t chunk = std::min(chunk_size, v);
  at::Tensor flat = at::empty({n * chunk}, opts);
  // dz feeds the gradient GEMMs in the operands' dtype: in place over z when that is the acc type
  at::Tensor dz_flat = h.scalar_type() == acc ? flat : at::empty({n * chunk}, h.options());
  for (int64_t v0 = 0; v0 < v; v0 += chunk) {
    const int64_t cw = std::min(chunk, v - v0);
    const at::Tensor w = gemm_operand(weight.narrow(0, v0, cw));  // [cw, H]
    at::Tensor z = chunk_view(flat, n, cw);
    at::Tensor dz = chunk_view(dz_flat, n, cw);
    mm_into(z, h, w.t());  // recompute the logits chunk
    chunk_fn(z, dz, tg, vocab_start + v0, 1.0 / temperature, g, ge, l, e);
    addmm_into(grad_hidden, dz, w);  // [N, H] += [N, cw] @ [cw, H]
    at::Tensor gw = grad_weight.narrow(0, v0, cw);  // [cw, H], written once
    if (gw.scalar_type() == dz.scalar_type()) {
      at::mm_out(gw, dz.t(), h);
    } else {
      gw.copy_(at::mm(dz.t(), h));
    }
  }
  return {grad_hidden.to(hidden.scalar_type()), grad_weight};
}

}  // namespace linear_logprob_detail
}  // namespace r1mega
