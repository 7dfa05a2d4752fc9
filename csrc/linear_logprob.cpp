// linear_logprob: log-probability of the target token and entropy of softmax(hidden @ weight.T / T),
// computed over vocabulary chunks so that the [N, V] logits never exist (schemas + CPU kernels).
//
// Three ops, all taking `vocab_start` or working on one whole vocabulary:
//   linear_logprob_stats    one vocabulary shard -> per-row (max, sum-exp, entropy partial, target logit);
//                           the vocabulary-parallel path all-reduces these in Python.
//   linear_logprob          the whole vocabulary -> (logp, entropy, lse), for autograd.
//   linear_logprob_backward recomputes each logits chunk and returns (grad_hidden, grad_weight) of one shard.
// The chunk loop and GEMMs live in linear_logprob.h; this file holds the CPU elementwise kernels.
// Left out: ignore-index targets (every target must be a valid id; mask the loss instead), label smoothing.
#include "linear_logprob.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace r1mega {
namespace {

namespace d = linear_logprob_detail;

// Merges a chunk's (cm, cs, ct), relative to the chunk max cm, into the running (m, s, t).
template <typename acc_t>
inline void merge_stats(acc_t& m, acc_t& s, acc_t& t, acc_t cm, acc_t cs, acc_t ct) {
  if (s == acc_t(0)) {
    m = cm, s = cs, t = ct;
    return;
  }
  const acc_t mx = std::max(m, cm);
  const acc_t a = std::exp(m - mx), b = std::exp(cm - mx);
  t = a * (t + s * (m - mx)) + b * (ct + cs * (cm - mx));
  s = a * s + b * cs;
  m = mx;
}

template <typename acc_t>
void stats_chunk_cpu_impl(const at::Tensor& z, const at::Tensor& targets, int64_t v_begin, double inv_temp,
                          at::Tensor& m, at::Tensor& s, at::Tensor& t, at::Tensor& zt) {
  const int64_t n = z.size(0), cw = z.size(1);
  const acc_t* zp = z.data_ptr<acc_t>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  acc_t *mp = m.data_ptr<acc_t>(), *sp = s.data_ptr<acc_t>(), *tt = t.data_ptr<acc_t>(), *ztp = zt.data_ptr<acc_t>();
  const acc_t it = static_cast<acc_t>(inv_temp);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* row = zp + r * cw;
      acc_t cm = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < cw; ++j) cm = std::max(cm, row[j] * it);
      acc_t cs = 0, ct = 0;
      for (int64_t j = 0; j < cw; ++j) {
        const acc_t x = row[j] * it - cm;
        const acc_t e = std::exp(x);
        cs += e;
        ct += e * x;
      }
      merge_stats(mp[r], sp[r], tt[r], cm, cs, ct);
      const int64_t local = tp[r] - v_begin;
      if (local >= 0 && local < cw) ztp[r] = row[local] * it;
    }
  });
}

void stats_chunk_cpu(const at::Tensor& z, const at::Tensor& targets, int64_t v_begin, double inv_temp, at::Tensor& m,
                     at::Tensor& s, at::Tensor& t, at::Tensor& zt) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_logprob_stats", [&] {
    stats_chunk_cpu_impl<scalar_t>(z, targets, v_begin, inv_temp, m, s, t, zt);
  });
}

template <typename acc_t>
void grad_chunk_cpu_impl(const at::Tensor& z, at::Tensor& dz, const at::Tensor& targets, int64_t v_begin,
                         double inv_temp, const at::Tensor& g, const at::Tensor& ge, const at::Tensor& lse,
                         const at::Tensor& entropy) {
  const int64_t n = z.size(0), cw = z.size(1);
  const acc_t* zp = z.data_ptr<acc_t>();
  acc_t* dp = dz.data_ptr<acc_t>();  // may alias zp: each element is read before it is written
  const int64_t* tp = targets.data_ptr<int64_t>();
  const acc_t *gp = g.data_ptr<acc_t>(), *gep = ge.data_ptr<acc_t>();
  const acc_t *lp = lse.data_ptr<acc_t>(), *hp = entropy.data_ptr<acc_t>();
  const acc_t it = static_cast<acc_t>(inv_temp);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* row = zp + r * cw;
      acc_t* out = dp + r * cw;
      const acc_t gr = gp[r], ger = gep[r], l = lp[r], shift = hp[r] - l;
      for (int64_t j = 0; j < cw; ++j) {
        const acc_t x = row[j] * it;
        const acc_t p = std::exp(x - l);
        out[j] = (-gr * p - ger * p * (x + shift)) * it;
      }
      const int64_t local = tp[r] - v_begin;
      if (local >= 0 && local < cw) out[local] += gr * it;
    }
  });
}

void grad_chunk_cpu(const at::Tensor& z, at::Tensor& dz, const at::Tensor& targets, int64_t v_begin, double inv_temp,
                    const at::Tensor& g, const at::Tensor& ge, const at::Tensor& lse, const at::Tensor& entropy) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_logprob_backward", [&] {
    grad_chunk_cpu_impl<scalar_t>(z, dz, targets, v_begin, inv_temp, g, ge, lse, entropy);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                     const at::Tensor& targets, double temperature,
                                                                     int64_t vocab_start, int64_t chunk_size) {
  return d::stats_loop(hidden, weight, targets, temperature, vocab_start, chunk_size, &stats_chunk_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                           const at::Tensor& targets, double temperature,
                                                           int64_t chunk_size) {
  if (targets.numel() > 0) {
    const auto [lo, hi] = at::aminmax(targets);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < weight.size(0),
                "linear_logprob: targets must lie in [0, V)");
  }
  auto [m, s, t, zt] = d::stats_loop(hidden, weight, targets, temperature, 0, chunk_size, &stats_chunk_cpu);
  return d::combine_stats(m, s, t, zt);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                                const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& targets, const at::Tensor& lse,
                                                const at::Tensor& entropy, double temperature, int64_t vocab_start,
                                                int64_t chunk_size) {
  return d::backward_loop(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, vocab_start,
                          chunk_size, &grad_chunk_cpu);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1mega, m) {
  m.def("linear_logprob_stats(Tensor hidden, Tensor weight, Tensor targets, float temperature, int vocab_start, "
        "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_logprob(Tensor hidden, Tensor weight, Tensor targets, float temperature, int chunk_size) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_logprob_backward(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor targets, Tensor lse, Tensor entropy, float temperature, int vocab_start, int chunk_size) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(r1mega, CPU, m) {
  m.impl("linear_logprob_stats", &stats_cpu);
  m.impl("linear_logprob", &logprob_cpu);
  m.impl("linear_logprob_backward", &backward_cpu);
}

}  // namespace r1mega
