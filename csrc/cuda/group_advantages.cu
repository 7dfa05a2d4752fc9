// group_advantages: CUDA kernels (schema and CPU kernel in csrc/group_advantages.cpp, maths in
// r1mega/ops/group_advantages.py).
//
// Fixed-size groups: one warp per group, lanes striding over it; mean and squared deviations are
// reduced in fp64 with xor shuffles (every lane gets the sum), and "all equal" is a warp vote against
// the group's first reward. Arbitrary ids: ATen's unique gives dense group indices; then three
// elementwise passes with fp64 atomics (sums; squared deviations and the "differs" flag against one
// representative reward of the group; output). The atomics make the fp64 sums' order vary between
// runs, far below the fp32 output's precision.
// Left out: anything but 1-D rewards.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace r1mega {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double advantage(double r, double mean, double std, bool equal, double eps, bool scale) {
  if (equal) return 0.0;
  return scale ? (r - mean) / (std + eps) : r - mean;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void fixed_groups_kernel(const scalar_t* __restrict__ r, scalar_t* __restrict__ out, int64_t n_groups,
                                    int64_t size, double eps, bool scale) {
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (g >= n_groups) return;  // whole warps leave together: g is uniform within a warp
  const scalar_t* x = r + g * size;
  const scalar_t first = x[0];
  double sum = 0;
  bool equal = true;
  for (int64_t i = lane; i < size; i += 32) {
    sum += x[i];
    equal &= x[i] == first;
  }
  const double mean = warp_sum(sum) / size;
  equal = __all_sync(0xffffffffu, equal);
  double ss = 0;
  for (int64_t i = lane; i < size; i += 32) ss += (x[i] - mean) * (x[i] - mean);
  ss = warp_sum(ss);
  const double std = size > 1 ? sqrt(ss / (size - 1)) : 0.0;
  for (int64_t i = lane; i < size; i += 32) out[g * size + i] = static_cast<scalar_t>(advantage(x[i], mean, std, equal, eps, scale));
}

template <typename scalar_t>
__global__ void id_sums_kernel(const scalar_t* __restrict__ r, const int64_t* __restrict__ index, int64_t n,
                               double* __restrict__ sum, double* __restrict__ count, double* __restrict__ rep) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t g = index[i];
  const double v = r[i];
  atomicAdd(sum + g, v);
  atomicAdd(count + g, 1.0);
  // Any one reward of the group serves as its representative for the equality test.
  atomicExch(reinterpret_cast<unsigned long long*>(rep + g), static_cast<unsigned long long>(__double_as_longlong(v)));
}

template <typename scalar_t>
__global__ void id_deviations_kernel(const scalar_t* __restrict__ r, const int64_t* __restrict__ index, int64_t n,
                                     const double* __restrict__ sum, const double* __restrict__ count,
                                     const double* __restrict__ rep, double* __restrict__ ss, int* __restrict__ differs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t g = index[i];
  const double v = r[i], d = v - sum[g] / count[g];
  atomicAdd(ss + g, d * d);
  if (v != rep[g]) differs[g] = 1;  // every writer writes 1: the race is benign
}

template <typename scalar_t>
__global__ void id_output_kernel(const scalar_t* __restrict__ r, const int64_t* __restrict__ index, int64_t n,
                                 const double* __restrict__ sum, const double* __restrict__ count,
                                 const double* __restrict__ ss, const int* __restrict__ differs, double eps, bool scale,
                                 scalar_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t g = index[i];
  const double c = count[g];
  const double std = c > 1 ? sqrt(ss[g] / (c - 1)) : 0.0;
  out[i] = static_cast<scalar_t>(advantage(r[i], sum[g] / c, std, differs[g] == 0, eps, scale));
}

at::Tensor group_advantages_cuda(const at::Tensor& rewards, const std::optional<at::Tensor>& group_ids,
                                 int64_t group_size, double eps, bool scale_by_std) {
  TORCH_CHECK(rewards.dim() == 1, "group_advantages: rewards must be [N]");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "group_advantages: rewards must be float32 or float64");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = rewards.contiguous();
  const int64_t n = r.numel();
  at::Tensor out = at::empty_like(r);
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (!group_ids.has_value()) {
    TORCH_CHECK(group_size >= 1 && n % group_size == 0, "group_advantages: group_size must be >= 1 and divide N");
    const int64_t n_groups = n / group_size;
    const int64_t blocks = (n_groups * 32 + kThreads - 1) / kThreads;
    AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "group_advantages_fixed_cuda", [&] {
      fixed_groups_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(r.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                                      n_groups, group_size, eps, scale_by_std);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  TORCH_CHECK(group_ids->sizes() == rewards.sizes() && !at::isFloatingType(group_ids->scalar_type()),
              "group_advantages: group_ids must be integer [N]");
  auto [values, inverse, counts] = at::_unique2(*group_ids, /*sorted=*/false, /*return_inverse=*/true,
                                                /*return_counts=*/false);
  const at::Tensor index = inverse.to(at::kLong).contiguous();  // [N] dense group of each sample
  const int64_t n_groups = values.numel();
  const auto f64 = r.options().dtype(at::kDouble);
  at::Tensor sum = at::zeros({n_groups}, f64), count = at::zeros({n_groups}, f64), ss = at::zeros({n_groups}, f64);
  at::Tensor rep = at::empty({n_groups}, f64);
  at::Tensor differs = at::zeros({n_groups}, r.options().dtype(at::kInt));
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "group_advantages_ids_cuda", [&] {
    const scalar_t* x = r.data_ptr<scalar_t>();
    const int64_t* idx = index.data_ptr<int64_t>();
    id_sums_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, idx, n, sum.data_ptr<double>(), count.data_ptr<double>(),
                                                              rep.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    id_deviations_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x, idx, n, sum.data_ptr<double>(), count.data_ptr<double>(), rep.data_ptr<double>(), ss.data_ptr<double>(),
        differs.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    id_output_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, idx, n, sum.data_ptr<double>(), count.data_ptr<double>(),
                                                                ss.data_ptr<double>(), differs.data_ptr<int>(), eps,
                                                                scale_by_std, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1mega, CUDA, m) { m.impl("group_advantages", &group_advantages_cuda); }

}  // namespace r1mega
