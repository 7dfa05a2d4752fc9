// moe_permute / moe_unpermute on CUDA. Same row_map convention as csrc/moe_permute.cpp:
// row_map[n*k + j] = the row of x_sorted holding token n's copy for its j-th expert.
//
// Permute is a stable counting sort in three kernels: (1) each block of 256 (token, slot) pairs
// histograms its experts in shared memory into block_counts [blocks, E]; an ATen cumsum over that
// table in expert-major order gives each block its first row per expert; (2) each pair's rank among
// the equal experts before it in its block (warp __match_any_sync + popc, plus the counts of the
// warps before) gives its row; (3) the rows are copied with 16-byte loads where alignment allows.
// The other kernels gather through row_map (one block per token, no atomics), fp32 accumulation.
// Left out: more than 1024 experts (shared-memory tables), capacity padding, dropped tokens.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace r1mega {
namespace {

constexpr int kWarp = 32;
constexpr int kSortBlock = 256;  // pairs per block in the counting sort
constexpr int kMaxExperts = 1024;

__global__ void count_kernel(const int64_t* __restrict__ expert, int64_t n_pairs, int n_experts,
                             int* __restrict__ block_counts) {
  extern __shared__ int hist[];  // [E]
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t f = blockIdx.x * (int64_t)kSortBlock + threadIdx.x;
  if (f < n_pairs) {
    const int64_t e = expert[f];
    CUDA_KERNEL_ASSERT(e >= 0 && e < n_experts && "moe_permute: expert index out of range");
    if (e >= 0 && e < n_experts) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) block_counts[(int64_t)blockIdx.x * n_experts + e] = hist[e];
}

// first_row [E, blocks]: the first row of x_sorted for block b's pairs of expert e.
__global__ void place_kernel(const int64_t* __restrict__ expert, int64_t n_pairs, int n_experts, int n_blocks,
                             const int64_t* __restrict__ first_row, int64_t* __restrict__ row_map) {
  extern __shared__ int warp_counts[];  // [warps, E]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = kSortBlock / kWarp;
  for (int i = threadIdx.x; i < n_warps * n_experts; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  const int64_t f = blockIdx.x * (int64_t)kSortBlock + threadIdx.x;
  const int64_t raw = f < n_pairs ? expert[f] : -1;
  const int e = raw >= 0 && raw < n_experts ? static_cast<int>(raw) : -1 - lane;  // padding matches nobody
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(same & ((1u << lane) - 1));
  if (e >= 0 && rank_in_warp == 0) warp_counts[warp * n_experts + e] = __popc(same);
  __syncthreads();
  if (e < 0) return;
  int rank = rank_in_warp;
  for (int w = 0; w < warp; ++w) rank += warp_counts[w * n_experts + e];
  row_map[f] = first_row[(int64_t)e * n_blocks + blockIdx.x] + rank;
}

// x_sorted[row_map[f]] = x[f / k], 16 bytes at a time when rows allow, else byte by byte.
template <typename V>
__global__ void copy_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ row_map, int64_t n_pairs,
                                 int top_k, int64_t row_vecs, V* __restrict__ out) {
  for (int64_t f = blockIdx.x; f < n_pairs; f += gridDim.x) {
    const V* src = x + (f / top_k) * row_vecs;
    V* dst = out + row_map[f] * row_vecs;
    for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst[v] = src[v];
  }
}

int rows_grid(int64_t rows) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(rows, 1), 1 << 20)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& x, const at::Tensor& indices,
                                                                int64_t num_experts) {
  TORCH_CHECK(x.dim() == 2 && indices.dim() == 2 && indices.size(0) == x.size(0),
              "moe_permute: need x [N, H] and indices [N, k]");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "moe_permute: num_experts must be in [1, 1024] on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor src = x.contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t top_k = idx.size(1), n_pairs = idx.numel(), row_bytes = x.size(1) * x.element_size();
  at::Tensor x_sorted = at::empty({n_pairs, x.size(1)}, x.options());
  at::Tensor row_map = at::empty({n_pairs}, idx.options());
  if (n_pairs == 0) return {x_sorted, at::zeros({num_experts}, idx.options()), row_map};
  const int n_blocks = static_cast<int>((n_pairs + kSortBlock - 1) / kSortBlock);
  const int n_experts = static_cast<int>(num_experts);
  at::Tensor block_counts = at::empty({n_blocks, num_experts}, idx.options().dtype(at::kInt));
  count_kernel<<<n_blocks, kSortBlock, n_experts * sizeof(int), stream>>>(
      idx.const_data_ptr<int64_t>(), n_pairs, n_experts, block_counts.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // [E, blocks], expert-major: the exclusive cumsum gives each (expert, block) its first row.
  const at::Tensor counts_eb = block_counts.t().contiguous().to(at::kLong);
  const at::Tensor first_row = (counts_eb.view(-1).cumsum(0) - counts_eb.view(-1)).contiguous();
  const at::Tensor tokens_per_expert = counts_eb.sum(1);
  place_kernel<<<n_blocks, kSortBlock, (kSortBlock / kWarp) * n_experts * sizeof(int), stream>>>(
      idx.const_data_ptr<int64_t>(), n_pairs, n_experts, n_blocks, first_row.const_data_ptr<int64_t>(),
      row_map.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool vec16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src.const_data_ptr()) % 16 == 0;
  if (vec16) {
    copy_rows_kernel<uint4><<<rows_grid(n_pairs), 128, 0, stream>>>(
        static_cast<const uint4*>(src.const_data_ptr()), row_map.const_data_ptr<int64_t>(), n_pairs,
        static_cast<int>(top_k), row_bytes / 16, static_cast<uint4*>(x_sorted.mutable_data_ptr()));
  } else {
    copy_rows_kernel<unsigned char><<<rows_grid(n_pairs), 128, 0, stream>>>(
        static_cast<const unsigned char*>(src.const_data_ptr()), row_map.const_data_ptr<int64_t>(), n_pairs,
        static_cast<int>(top_k), row_bytes, static_cast<unsigned char*>(x_sorted.mutable_data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_sorted, tokens_per_expert, row_map};
}

// out[n] = sum_j scale[n, j] * rows[row_map[n*k + j]] (scale 1 when null): one block per token.
template <typename T, typename acc_t>
__global__ void gather_sum_kernel(const T* __restrict__ rows, const int64_t* __restrict__ row_map,
                                  const acc_t* __restrict__ scale, int64_t n_tokens, int top_k, int64_t hidden,
                                  T* __restrict__ out) {
  for (int64_t n = blockIdx.x; n < n_tokens; n += gridDim.x) {
    for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
      acc_t acc = 0;
      for (int j = 0; j < top_k; ++j) {
        const acc_t v = static_cast<acc_t>(rows[row_map[n * top_k + j] * hidden + h]);
        acc += scale ? v * scale[n * top_k + j] : v;
      }
      out[n * hidden + h] = static_cast<T>(acc);
    }
  }
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {  // scratch: one slot per warp
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : T(0);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// grad_y_sorted[row] = w[n, j] * grad_y[n];  grad_w[n, j] = <grad_y[n], y_sorted[row]>.
template <typename T, typename acc_t>
__global__ void unpermute_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ y_sorted,
                                          const int64_t* __restrict__ row_map, const acc_t* __restrict__ w,
                                          int64_t n_tokens, int top_k, int64_t hidden, T* __restrict__ grad_ys,
                                          acc_t* __restrict__ grad_w) {
  __shared__ acc_t scratch[kWarp];
  for (int64_t n = blockIdx.x; n < n_tokens; n += gridDim.x) {
    for (int j = 0; j < top_k; ++j) {
      const int64_t row = row_map[n * top_k + j];
      const acc_t wj = w[n * top_k + j];
      acc_t dot = 0;
      for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
        const acc_t g = static_cast<acc_t>(grad_y[n * hidden + h]);
        grad_ys[row * hidden + h] = static_cast<T>(wj * g);
        dot += g * static_cast<acc_t>(y_sorted[row * hidden + h]);
      }
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) grad_w[n * top_k + j] = dot;
    }
  }
}

at::Tensor moe_permute_backward_cuda(const at::Tensor& grad_sorted, const at::Tensor& row_map, int64_t top_k) {
  TORCH_CHECK(grad_sorted.dim() == 2 && row_map.dim() == 1 && top_k >= 1 && row_map.numel() % top_k == 0,
              "moe_permute_backward: need grad_sorted [M, H], row_map [N*k]");
  const c10::cuda::CUDAGuard guard(grad_sorted.device());
  const at::Tensor grad = grad_sorted.contiguous();
  const at::Tensor map = row_map.to(at::kLong).contiguous();
  const int64_t n_tokens = map.numel() / top_k, hidden = grad.size(1);
  at::Tensor grad_x = at::empty({n_tokens, hidden}, grad.options());
  if (n_tokens == 0 || hidden == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "moe_permute_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_sum_kernel<scalar_t, acc_t><<<rows_grid(n_tokens), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), map.const_data_ptr<int64_t>(), nullptr, n_tokens, static_cast<int>(top_k),
        hidden, grad_x.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

at::ScalarType acc_dtype(const at::Tensor& y) { return y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor moe_unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  TORCH_CHECK(y_sorted.dim() == 2 && weights.dim() == 2 && row_map.dim() == 1 && row_map.numel() == weights.numel(),
              "moe_unpermute: need y_sorted [M, H], row_map [N*k], weights [N, k]");
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const at::Tensor ys = y_sorted.contiguous();
  const at::Tensor map = row_map.to(at::kLong).contiguous();
  const at::Tensor w = weights.to(acc_dtype(y_sorted)).contiguous();
  const int64_t n_tokens = weights.size(0), top_k = weights.size(1), hidden = ys.size(1);
  at::Tensor y = at::empty({n_tokens, hidden}, ys.options());
  if (n_tokens == 0 || hidden == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ys.scalar_type(), "moe_unpermute_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_sum_kernel<scalar_t, acc_t><<<rows_grid(n_tokens), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        ys.const_data_ptr<scalar_t>(), map.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(), n_tokens,
        static_cast<int>(top_k), hidden, y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                               const at::Tensor& row_map, const at::Tensor& weights) {
  TORCH_CHECK(y_sorted.dim() == 2 && weights.dim() == 2 && row_map.dim() == 1 && row_map.numel() == weights.numel(),
              "moe_unpermute_backward: need y_sorted [M, H], row_map [N*k], weights [N, k]");
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const at::Tensor ys = y_sorted.contiguous();
  const at::Tensor gy = grad_y.to(ys.scalar_type()).contiguous();
  const at::Tensor map = row_map.to(at::kLong).contiguous();
  const at::Tensor w = weights.to(acc_dtype(y_sorted)).contiguous();
  const int64_t n_tokens = weights.size(0), top_k = weights.size(1), hidden = ys.size(1);
  at::Tensor grad_ys = at::zeros_like(ys);  // rows no pair maps to get zero gradient
  at::Tensor grad_w = at::zeros({n_tokens, top_k}, w.options());
  if (n_tokens == 0 || hidden == 0) return {grad_ys, grad_w.to(weights.scalar_type())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ys.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    unpermute_backward_kernel<scalar_t, acc_t><<<rows_grid(n_tokens), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        gy.const_data_ptr<scalar_t>(), ys.const_data_ptr<scalar_t>(), map.const_data_ptr<int64_t>(),
        w.const_data_ptr<acc_t>(), n_tokens, static_cast<int>(top_k), hidden, grad_ys.mutable_data_ptr<scalar_t>(),
        grad_w.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_ys, grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1mega, CUDA, m) {
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_permute_backward", &moe_permute_backward_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cuda);
}

}  // namespace r1mega
