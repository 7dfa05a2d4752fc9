// group_advantages: rewards -> (r - group mean) / (group std + eps) (schema + CPU kernel).
//
// The maths is in r1mega/ops/group_advantages.py. Fixed-size groups: one pass per group, in parallel
// over groups (mean, then the sum of squared deviations: two passes over a group that is in cache).
// Arbitrary group ids: ATen's unique gives each sample a dense group index, then three sequential
// sweeps (sums and min/max, squared deviations, output); N is the number of samples of one step
// (thousands), so a sequential sweep is cheaper than any parallel scatter. Statistics in fp64.
// Left out: anything but 1-D rewards.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace r1mega {
namespace {

// Advantage of reward r in a group with the given mean and std; all-equal groups give exactly 0.
inline double advantage(double r, double mean, double std, bool equal, double eps, bool scale) {
  if (equal) return 0.0;
  return scale ? (r - mean) / (std + eps) : r - mean;
}

template <typename scalar_t>
void fixed_groups(const scalar_t* r, scalar_t* out, int64_t n_groups, int64_t size, double eps, bool scale) {
  at::parallel_for(0, n_groups, std::max<int64_t>(1, 4096 / size), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const scalar_t* x = r + g * size;
      double sum = 0;
      bool equal = true;
      for (int64_t i = 0; i < size; ++i) {
        sum += x[i];
        equal &= x[i] == x[0];
      }
      const double mean = sum / size;
      double ss = 0;
      for (int64_t i = 0; i < size; ++i) ss += (x[i] - mean) * (x[i] - mean);
      const double std = size > 1 ? std::sqrt(ss / (size - 1)) : 0.0;
      for (int64_t i = 0; i < size; ++i) out[g * size + i] = static_cast<scalar_t>(advantage(x[i], mean, std, equal, eps, scale));
    }
  });
}

template <typename scalar_t>
void id_groups(const scalar_t* r, const int64_t* index, int64_t n, int64_t n_groups, scalar_t* out, double eps, bool scale) {
  std::vector<double> sum(n_groups, 0.0), ss(n_groups, 0.0), count(n_groups, 0.0);
  std::vector<double> first(n_groups, 0.0);
  std::vector<char> seen(n_groups, 0), equal(n_groups, 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = index[i];
    sum[g] += r[i];
    count[g] += 1;
    if (!seen[g]) {
      seen[g] = 1;
      first[g] = r[i];
    }
    equal[g] &= static_cast<double>(r[i]) == first[g];
  }
  for (int64_t g = 0; g < n_groups; ++g) sum[g] /= count[g];  // now the mean
  for (int64_t i = 0; i < n; ++i) {
    const double d = r[i] - sum[index[i]];
    ss[index[i]] += d * d;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = index[i];
    const double std = count[g] > 1 ? std::sqrt(ss[g] / (count[g] - 1)) : 0.0;
    out[i] = static_cast<scalar_t>(advantage(r[i], sum[g], std, equal[g], eps, scale));
  }
}

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& group_ids,
                                int64_t group_size, double eps, bool scale_by_std) {
  TORCH_CHECK(rewards.dim() == 1, "group_advantages: rewards must be [N]");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "group_advantages: rewards must be float32 or float64");
  const at::Tensor r = rewards.contiguous();
  const int64_t n = r.numel();
  at::Tensor out = at::empty_like(r);
  if (group_ids.has_value()) {
    TORCH_CHECK(group_ids->sizes() == rewards.sizes() && !at::isFloatingType(group_ids->scalar_type()),
                "group_advantages: group_ids must be integer [N]");
    auto [values, inverse, counts] = at::_unique2(*group_ids, /*sorted=*/false, /*return_inverse=*/true,
                                                  /*return_counts=*/false);
    const at::Tensor index = inverse.to(at::kLong).contiguous();  // [N] dense group of each sample
    AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "group_advantages_ids", [&] {
      id_groups<scalar_t>(r.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), n, values.numel(),
                          out.data_ptr<scalar_t>(), eps, scale_by_std);
    });
  } else {
    TORCH_CHECK(group_size >= 1 && n % group_size == 0, "group_advantages: group_size must be >= 1 and divide N");
    AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "group_advantages_fixed", [&] {
      fixed_groups<scalar_t>(r.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n / group_size, group_size, eps,
                             scale_by_std);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1mega, m) {
  m.def("group_advantages(Tensor rewards, Tensor? group_ids, int group_size, float eps, bool scale_by_std) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1mega, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }

}  // namespace r1mega
