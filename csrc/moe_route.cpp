// moe_route: router logits -> group-limited top-k experts and their combine weights (schema + CPU kernel).
//
// The scores (sigmoid or softmax) come from ATen's own kernels so that they are bit-identical to the
// plain-PyTorch reference (r1mega/ops/moe_route.py), which makes the selection exact. One pass per
// token then does the group scores, the group top-k and the expert top-k with a threshold insertion
// into a k-long sorted list (E is small: the threshold test rejects most experts in one comparison).
// Ties: the lower expert (group) index wins, and the chosen experts are listed by descending score.
// Left out: anything but 2-D logits; gradients to the bias (it only selects).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace r1mega {
namespace {

constexpr double kNormEps = 1e-20;  // as transformers' DeepSeek-V3 router

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor route_probs(const at::Tensor& logits, c10::string_view score) {
  at::Tensor scores = logits.to(acc_type(logits));
  return score == "sigmoid" ? at::sigmoid(scores) : at::softmax(scores, -1);
}

void check_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k, int64_t n_group,
                 int64_t topk_group, c10::string_view score) {
  TORCH_CHECK(logits.dim() == 2, "moe_route: logits must be [N, E]");
  const int64_t n_experts = logits.size(1);
  TORCH_CHECK(score == "sigmoid" || score == "softmax", "moe_route: score must be sigmoid or softmax");
  TORCH_CHECK(n_group >= 1 && n_experts % n_group == 0, "moe_route: n_group must divide the number of experts");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group must be in [1, n_group]");
  TORCH_CHECK(top_k >= 1 && top_k <= topk_group * (n_experts / n_group), "moe_route: top_k exceeds the kept experts");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n_experts), "moe_route: bias must be [E]");
}

// Keeps the k best (value, index) pairs seen so far, sorted by descending value. Candidates must
// arrive in ascending index order: a candidate equal to a kept value goes after it, so ties favour
// the lower index, exactly as a stable descending sort does.
template <typename T>
struct TopK {
  T* val;
  int64_t* idx;
  int64_t k;
  int64_t size = 0;

  void push(T v, int64_t i) {
    if (size == k && !(v > val[k - 1])) return;
    int64_t pos = size < k ? size++ : k - 1;
    for (; pos > 0 && val[pos - 1] < v; --pos) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
    }
    val[pos] = v;
    idx[pos] = i;
  }
};

template <typename acc_t>
void route_rows(const acc_t* probs, const acc_t* bias, int64_t n_experts, int64_t top_k, int64_t n_group,
                int64_t topk_group, acc_t scaling, bool norm_topk, int64_t begin, int64_t end, acc_t* weights,
                int64_t* indices) {
  const int64_t group_size = n_experts / n_group;
  std::vector<acc_t> choice(n_experts), group_val(topk_group), top_val(top_k), w(top_k);
  std::vector<int64_t> group_idx(topk_group);
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* p = probs + n * n_experts;
    int64_t* out_idx = indices + n * top_k;
    for (int64_t e = 0; e < n_experts; ++e) choice[e] = bias ? p[e] + bias[e] : p[e];  // [E]
    TopK<acc_t> best{top_val.data(), out_idx, top_k};
    if (n_group == 1) {
      for (int64_t e = 0; e < n_experts; ++e) best.push(choice[e], e);
    } else {
      // A group's score is the sum of its two best choice scores (its only one if it has one expert).
      TopK<acc_t> groups{group_val.data(), group_idx.data(), topk_group};
      for (int64_t g = 0; g < n_group; ++g) {
        const acc_t* c = choice.data() + g * group_size;
        acc_t first = -std::numeric_limits<acc_t>::infinity(), second = first;
        for (int64_t e = 0; e < group_size; ++e) {
          if (c[e] > first) {
            second = first;
            first = c[e];
          } else if (c[e] > second) {
            second = c[e];
          }
        }
        groups.push(group_size > 1 ? first + second : first, g);
      }
      // Visit the kept groups in ascending order so that experts arrive by ascending index.
      std::sort(group_idx.begin(), group_idx.end());
      for (int64_t g : group_idx)
        for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) best.push(choice[e], e);
    }
    acc_t sum = 0;
    for (int64_t j = 0; j < top_k; ++j) {
      w[j] = p[out_idx[j]];
      sum += w[j];
    }
    const acc_t denom = sum + static_cast<acc_t>(kNormEps);
    for (int64_t j = 0; j < top_k; ++j) weights[n * top_k + j] = (norm_topk ? w[j] / denom : w[j]) * scaling;
  }
}

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                 int64_t top_k, int64_t n_group, int64_t topk_group, double scaling,
                                                 c10::string_view score, bool norm_topk) {
  check_route(logits, bias, top_k, n_group, topk_group, score);
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1);
  const at::Tensor probs = route_probs(logits, score).contiguous();  // [N, E]
  at::Tensor weights = at::empty({n_tokens, top_k}, probs.options());
  at::Tensor indices = at::empty({n_tokens, top_k}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_route_cpu", [&] {
    const at::Tensor b = bias.has_value() ? bias->to(probs.scalar_type()).contiguous() : at::Tensor();
    const scalar_t* bias_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* w = weights.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_tokens, 256, [&](int64_t begin, int64_t end) {
      route_rows<scalar_t>(probs.const_data_ptr<scalar_t>(), bias_ptr, n_experts, top_k, n_group, topk_group,
                           static_cast<scalar_t>(scaling), norm_topk, begin, end, w,
                           indices.mutable_data_ptr<int64_t>());
    });
  });
  return {weights, indices};
}

// d weights / d logits. With u_j = p[idx_j], D = sum_j u_j + eps and w_j = c u_j / D (c = scaling):
// dL/du_j = c / D * (g_j - sum_i g_i u_i / D)   (c g_j without normalisation);
// sigmoid: dL/dlogit_e = dL/du * u (1 - u) at the chosen experts, 0 elsewhere;
// softmax: dL/dlogit_e = p_e (dL/dp_e - sum_j dL/du_j u_j), with dL/dp zero off the chosen experts.
at::Tensor moe_route_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& logits,
                                  const at::Tensor& indices, double scaling, c10::string_view score, bool norm_topk) {
  TORCH_CHECK(logits.dim() == 2 && indices.dim() == 2 && grad_weights.sizes() == indices.sizes(),
              "moe_route_backward: need logits [N, E], indices and grad_weights [N, k]");
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1), top_k = indices.size(1);
  const at::Tensor probs = route_probs(logits, score).contiguous();  // [N, E]
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor grad = grad_weights.to(probs.scalar_type()).contiguous();
  at::Tensor grad_logits = at::empty({n_tokens, n_experts}, probs.options());
  const bool sigmoid = score == "sigmoid";
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_route_backward_cpu", [&] {
    const scalar_t* p_all = probs.const_data_ptr<scalar_t>();
    const scalar_t* g_all = grad.const_data_ptr<scalar_t>();
    const int64_t* i_all = idx.const_data_ptr<int64_t>();
    scalar_t* out_all = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_tokens, 256, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> grad_u(top_k);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* p = p_all + n * n_experts;
        const scalar_t* g = g_all + n * top_k;
        const int64_t* ix = i_all + n * top_k;
        scalar_t* out = out_all + n * n_experts;
        scalar_t sum = 0, dot = 0;
        for (int64_t j = 0; j < top_k; ++j) {
          TORCH_CHECK(ix[j] >= 0 && ix[j] < n_experts, "moe_route_backward: index out of range");
          sum += p[ix[j]];
        }
        const scalar_t denom = sum + static_cast<scalar_t>(kNormEps);
        for (int64_t j = 0; j < top_k; ++j) dot += g[j] * p[ix[j]];
        for (int64_t j = 0; j < top_k; ++j)
          grad_u[j] = norm_topk ? static_cast<scalar_t>(scaling) / denom * (g[j] - dot / denom)
                                : static_cast<scalar_t>(scaling) * g[j];
        if (sigmoid) {
          for (int64_t e = 0; e < n_experts; ++e) out[e] = 0;
          for (int64_t j = 0; j < top_k; ++j) out[ix[j]] = grad_u[j] * p[ix[j]] * (1 - p[ix[j]]);
        } else {
          scalar_t dot_p = 0;
          for (int64_t j = 0; j < top_k; ++j) dot_p += grad_u[j] * p[ix[j]];
          for (int64_t e = 0; e < n_experts; ++e) out[e] = -p[e] * dot_p;
          for (int64_t j = 0; j < top_k; ++j) out[ix[j]] += p[ix[j]] * grad_u[j];
        }
      }
    });
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1mega, m) {
  m.def("moe_route(Tensor logits, Tensor? bias, int top_k, int n_group, int topk_group, float scaling, str score, "
        "bool norm_topk) -> (Tensor, Tensor)");
  m.def("moe_route_backward(Tensor grad_weights, Tensor logits, Tensor indices, float scaling, str score, "
        "bool norm_topk) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1mega, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_route_backward", &moe_route_backward_cpu);
}

}  // namespace r1mega
