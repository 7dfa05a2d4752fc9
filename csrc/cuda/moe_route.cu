// moe_route on CUDA: one warp per token does the group scores, the group top-k and the expert top-k.
//
// The scores come from ATen's sigmoid/softmax (not recomputed here with --use_fast_math) so they are
// bit-identical to the reference and the selection is exact. Each top-k round is a warp argmax with
// shuffles, ordered by (higher score, then lower index): the same tie rule as the CPU kernel and the
// stable sort of the reference. Scratch scores live in shared memory, E floats per warp.
// Left out: E above 4096 (shared memory), gradients to the bias.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <limits>

namespace r1mega {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr double kNormEps = 1e-20;  // as transformers' DeepSeek-V3 router

// Warp-wide argmax of (value, index): higher value wins, ties go to the lower index. All lanes get it.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& val, int& idx) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other_val = __shfl_xor_sync(0xffffffffu, val, offset);
    const int other_idx = __shfl_xor_sync(0xffffffffu, idx, offset);
    if (other_val > val || (other_val == val && other_idx < idx)) {
      val = other_val;
      idx = other_idx;
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void route_kernel(const T* __restrict__ probs, const T* __restrict__ bias, int64_t n_tokens, int n_experts,
                             int top_k, int n_group, int topk_group, T scaling, bool norm_topk, T* __restrict__ weights,
                             int64_t* __restrict__ indices) {
  extern __shared__ unsigned char smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  // Per warp: choice scores [E], group scores [G], eligibility flags [E] and kept-group flags [G].
  const int per_warp = (n_experts + n_group) * sizeof(T) + n_experts + n_group;
  unsigned char* base = smem + warp * ((per_warp + 15) / 16 * 16);
  T* choice = reinterpret_cast<T*>(base);
  T* group_score = choice + n_experts;
  unsigned char* eligible = reinterpret_cast<unsigned char*>(group_score + n_group);
  unsigned char* group_unpicked = eligible + n_experts;
  const int group_size = n_experts / n_group;
  const T neg_inf = -std::numeric_limits<T>::infinity();

  for (int64_t n = blockIdx.x * (int64_t)kWarpsPerBlock + warp; n < n_tokens; n += (int64_t)gridDim.x * kWarpsPerBlock) {
    const T* p = probs + n * n_experts;
    for (int e = lane; e < n_experts; e += kWarp) {
      choice[e] = bias ? p[e] + bias[e] : p[e];
      eligible[e] = n_group == 1;
    }
    __syncwarp();
    if (n_group > 1) {
      for (int g = lane; g < n_group; g += kWarp) {  // a group's score: the sum of its two best
        T first = neg_inf, second = neg_inf;
        for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
          const T c = choice[e];
          if (c > first) {
            second = first;
            first = c;
          } else if (c > second) {
            second = c;
          }
        }
        group_score[g] = group_size > 1 ? first + second : first;
        group_unpicked[g] = 1;
      }
      __syncwarp();
      for (int round = 0; round < topk_group; ++round) {
        T best = neg_inf;
        int best_idx = INT_MAX;
        for (int g = lane; g < n_group; g += kWarp)
          if (group_unpicked[g] && (group_score[g] > best || best_idx == INT_MAX)) {
            best = group_score[g];
            best_idx = g;
          }
        warp_argmax(best, best_idx);
        if (lane == 0) group_unpicked[best_idx] = 0;  // picked = kept
        __syncwarp();
      }
      for (int e = lane; e < n_experts; e += kWarp) eligible[e] = !group_unpicked[e / group_size];
      __syncwarp();
    }
    int64_t* out_idx = indices + n * top_k;
    for (int j = 0; j < top_k; ++j) {
      T best = neg_inf;
      int best_idx = INT_MAX;
      for (int e = lane; e < n_experts; e += kWarp)  // ascending e per lane: strict > keeps the lower index
        if (eligible[e] && (choice[e] > best || best_idx == INT_MAX)) {
          best = choice[e];
          best_idx = e;
        }
      warp_argmax(best, best_idx);
      if (lane == 0) {
        out_idx[j] = best_idx;
        eligible[best_idx] = 0;
      }
      __syncwarp();
    }
    if (lane == 0) {  // sequential sum in the order of the CPU kernel
      T sum = 0;
      for (int j = 0; j < top_k; ++j) sum += p[out_idx[j]];
      const T denom = sum + static_cast<T>(kNormEps);
      for (int j = 0; j < top_k; ++j) {
        const T u = p[out_idx[j]];
        weights[n * top_k + j] = (norm_topk ? u / denom : u) * scaling;
      }
    }
    __syncwarp();
  }
}

// See moe_route_backward_cpu for the formula.
template <typename T>
__global__ void route_backward_kernel(const T* __restrict__ probs, const T* __restrict__ grad, const int64_t* __restrict__ indices,
                                      int64_t n_tokens, int n_experts, int top_k, T scaling, bool norm_topk, bool sigmoid,
                                      T* __restrict__ out_all) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t n = blockIdx.x * (int64_t)kWarpsPerBlock + warp; n < n_tokens; n += (int64_t)gridDim.x * kWarpsPerBlock) {
    const T* p = probs + n * n_experts;
    const T* g = grad + n * top_k;
    const int64_t* ix = indices + n * top_k;
    T* out = out_all + n * n_experts;
    T sum = 0, dot = 0;
    for (int j = lane; j < top_k; j += kWarp) {
      sum += p[ix[j]];
      dot += g[j] * p[ix[j]];
    }
    sum = warp_sum(sum);
    dot = warp_sum(dot);
    const T denom = sum + static_cast<T>(kNormEps);
    T dot_p = 0;  // sum_j dL/du_j u_j, for softmax
    for (int j = lane; j < top_k; j += kWarp) {
      const T grad_u = norm_topk ? scaling / denom * (g[j] - dot / denom) : scaling * g[j];
      dot_p += grad_u * p[ix[j]];
    }
    dot_p = warp_sum(dot_p);
    for (int e = lane; e < n_experts; e += kWarp) out[e] = sigmoid ? T(0) : -p[e] * dot_p;
    __syncwarp();
    for (int j = lane; j < top_k; j += kWarp) {
      const T u = p[ix[j]];
      const T grad_u = norm_topk ? scaling / denom * (g[j] - dot / denom) : scaling * g[j];
      out[ix[j]] += sigmoid ? grad_u * u * (1 - u) : u * grad_u;
    }
    __syncwarp();
  }
}

at::Tensor route_probs(const at::Tensor& logits, c10::string_view score) {
  const at::Tensor scores = logits.to(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return (score == "sigmoid" ? at::sigmoid(scores) : at::softmax(scores, -1)).contiguous();
}

int grid_for(int64_t n_tokens) {
  const int64_t blocks = (n_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                  int64_t top_k, int64_t n_group, int64_t topk_group, double scaling,
                                                  c10::string_view score, bool norm_topk) {
  TORCH_CHECK(logits.dim() == 2, "moe_route: logits must be [N, E]");
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1);
  TORCH_CHECK(score == "sigmoid" || score == "softmax", "moe_route: score must be sigmoid or softmax");
  TORCH_CHECK(n_group >= 1 && n_experts % n_group == 0, "moe_route: n_group must divide the number of experts");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_route: topk_group must be in [1, n_group]");
  TORCH_CHECK(top_k >= 1 && top_k <= topk_group * (n_experts / n_group), "moe_route: top_k exceeds the kept experts");
  TORCH_CHECK(n_experts <= 4096, "moe_route: at most 4096 experts on CUDA");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n_experts), "moe_route: bias must be [E]");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor probs = route_probs(logits, score);  // [N, E]
  at::Tensor weights = at::empty({n_tokens, top_k}, probs.options());
  at::Tensor indices = at::empty({n_tokens, top_k}, logits.options().dtype(at::kLong));
  if (n_tokens == 0) return {weights, indices};
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_route_cuda", [&] {
    const at::Tensor b = bias.has_value() ? bias->to(probs.options()).contiguous() : at::Tensor();
    const int per_warp = (n_experts + n_group) * sizeof(scalar_t) + n_experts + n_group;
    const size_t smem = kWarpsPerBlock * ((per_warp + 15) / 16 * 16);
    route_kernel<scalar_t><<<grid_for(n_tokens), kWarpsPerBlock * kWarp, smem, at::cuda::getCurrentCUDAStream()>>>(
        probs.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, n_tokens,
        static_cast<int>(n_experts), static_cast<int>(top_k), static_cast<int>(n_group), static_cast<int>(topk_group),
        static_cast<scalar_t>(scaling), norm_topk, weights.mutable_data_ptr<scalar_t>(),
        indices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, indices};
}

at::Tensor moe_route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
                                   double scaling, c10::string_view score, bool norm_topk) {
  TORCH_CHECK(logits.dim() == 2 && indices.dim() == 2 && grad_weights.sizes() == indices.sizes(),
              "moe_route_backward: need logits [N, E], indices and grad_weights [N, k]");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1), top_k = indices.size(1);
  const at::Tensor probs = route_probs(logits, score);  // [N, E]
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor grad = grad_weights.to(probs.scalar_type()).contiguous();
  at::Tensor grad_logits = at::empty({n_tokens, n_experts}, probs.options());
  if (n_tokens == 0) return grad_logits.to(logits.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_route_backward_cuda", [&] {
    route_backward_kernel<scalar_t><<<grid_for(n_tokens), kWarpsPerBlock * kWarp, 0, at::cuda::getCurrentCUDAStream()>>>(
        probs.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), n_tokens,
        static_cast<int>(n_experts), static_cast<int>(top_k), static_cast<scalar_t>(scaling), norm_topk,
        score == "sigmoid", grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(r1mega, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_route_backward", &moe_route_backward_cuda);
}

}  // namespace r1mega
