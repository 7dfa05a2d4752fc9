// moe_permute / moe_unpermute: sort token rows by expert and combine expert outputs back (schemas + CPU kernels).
//
// row_map[n * k + j] is the row of x_sorted that holds token n's copy for its j-th expert (see
// r1mega/ops/moe_permute.py). Permute is a stable parallel counting sort: each thread histograms a
// contiguous chunk of the N*k (token, slot) pairs, an expert-major prefix sum over (expert, chunk)
// gives every chunk its first row per expert, and each thread then places its pairs in order, copying
// each x row k times while it is hot in cache. The other kernels gather through row_map (no atomics),
// accumulating in fp32 (fp64 for fp64 input).
// Left out: capacity padding and dropped tokens (every index must be in [0, E)).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace r1mega {
namespace {

constexpr int64_t kPairsPerChunk = 16384;  // below this a second histogram costs more than it saves

// A fresh output of hundreds of MB spends most of its first write in 4 KiB page faults (x_sorted is
// k times the size of x); transparent huge pages cut them 512-fold. torch does the same for every
// allocation under THP_MEM_ALLOC_ENABLE=1. Only a hint: where it is refused nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& x, const at::Tensor& indices,
                                                               int64_t num_experts) {
  TORCH_CHECK(x.dim() == 2 && indices.dim() == 2 && indices.size(0) == x.size(0),
              "moe_permute: need x [N, H] and indices [N, k]");
  TORCH_CHECK(num_experts >= 1, "moe_permute: num_experts must be >= 1");
  const at::Tensor src = x.contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t top_k = idx.size(1), n_pairs = idx.numel(), row_bytes = x.size(1) * x.element_size();
  at::Tensor x_sorted = at::empty({n_pairs, x.size(1)}, x.options());
  advise_huge_pages(x_sorted);
  at::Tensor counts = at::empty({num_experts}, idx.options());
  at::Tensor row_map = at::empty({n_pairs}, idx.options());

  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_pairs / kPairsPerChunk));
  const int64_t chunk = (n_pairs + n_chunks - 1) / n_chunks;
  const int64_t* expert = idx.const_data_ptr<int64_t>();
  std::vector<int64_t> next_row(n_chunks * num_experts, 0);  // [chunks, E]: histogram, then first free row

  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t* hist = next_row.data() + c * num_experts;
      for (int64_t f = c * chunk; f < std::min(n_pairs, (c + 1) * chunk); ++f) {
        TORCH_CHECK(expert[f] >= 0 && expert[f] < num_experts, "moe_permute: expert index out of range");
        ++hist[expert[f]];
      }
    }
  });
  int64_t row = 0;
  int64_t* count = counts.mutable_data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t first = row;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t n = next_row[c * num_experts + e];
      next_row[c * num_experts + e] = row;
      row += n;
    }
    count[e] = row - first;
  }
  const char* x_ptr = static_cast<const char*>(src.const_data_ptr());
  char* out_ptr = static_cast<char*>(x_sorted.mutable_data_ptr());
  int64_t* map = row_map.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t* next = next_row.data() + c * num_experts;
      for (int64_t f = c * chunk; f < std::min(n_pairs, (c + 1) * chunk); ++f) {
        const int64_t dst = next[expert[f]]++;
        map[f] = dst;
        std::memcpy(out_ptr + dst * row_bytes, x_ptr + (f / top_k) * row_bytes, row_bytes);
      }
    }
  });
  return {x_sorted, counts, row_map};
}

// grad_x[n] = sum_j grad_sorted[row_map[n*k + j]].
at::Tensor moe_permute_backward_cpu(const at::Tensor& grad_sorted, const at::Tensor& row_map, int64_t top_k) {
  TORCH_CHECK(grad_sorted.dim() == 2 && row_map.dim() == 1 && top_k >= 1 && row_map.numel() % top_k == 0,
              "moe_permute_backward: need grad_sorted [M, H], row_map [N*k]");
  const at::Tensor grad = grad_sorted.contiguous();
  const at::Tensor map = row_map.to(at::kLong).contiguous();
  const int64_t n_tokens = map.numel() / top_k, hidden = grad.size(1), n_rows = grad.size(0);
  at::Tensor grad_x = at::empty({n_tokens, hidden}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "moe_permute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* rows = map.const_data_ptr<int64_t>();
    scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(hidden);  // [H]
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = rows[n * top_k + j];
          TORCH_CHECK(r >= 0 && r < n_rows, "moe_permute_backward: row_map out of range");
          const scalar_t* src = g + r * hidden;
          for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<acc_t>(src[h]);
        }
        for (int64_t h = 0; h < hidden; ++h) out[n * hidden + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return grad_x;
}

at::ScalarType acc_dtype(const at::Tensor& y) { return y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_unpermute(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  TORCH_CHECK(y_sorted.dim() == 2 && weights.dim() == 2 && row_map.dim() == 1 && row_map.numel() == weights.numel(),
              "moe_unpermute: need y_sorted [M, H], row_map [N*k], weights [N, k]");
}

// y[n] = sum_j weights[n, j] * y_sorted[row_map[n*k + j]].
at::Tensor moe_unpermute_cpu(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  check_unpermute(y_sorted, row_map, weights);
  const at::Tensor ys = y_sorted.contiguous();
  const at::Tensor map = row_map.to(at::kLong).contiguous();
  const at::Tensor w = weights.to(acc_dtype(y_sorted)).contiguous();
  const int64_t n_tokens = weights.size(0), top_k = weights.size(1), hidden = ys.size(1), n_rows = ys.size(0);
  at::Tensor y = at::empty({n_tokens, hidden}, ys.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ys.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src_all = ys.const_data_ptr<scalar_t>();
    const acc_t* w_all = w.const_data_ptr<acc_t>();
    const int64_t* rows = map.const_data_ptr<int64_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(hidden);  // [H]
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = rows[n * top_k + j];
          TORCH_CHECK(r >= 0 && r < n_rows, "moe_unpermute: row_map out of range");
          const scalar_t* src = src_all + r * hidden;
          const acc_t wj = w_all[n * top_k + j];
          for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<acc_t>(src[h]) * wj;
        }
        for (int64_t h = 0; h < hidden; ++h) out[n * hidden + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return y;
}

// grad_y_sorted[row_map[n*k + j]] = weights[n, j] * grad_y[n];  grad_weights[n, j] = <grad_y[n], y_sorted[row]>.
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                              const at::Tensor& row_map, const at::Tensor& weights) {
  check_unpermute(y_sorted, row_map, weights);
  const at::Tensor ys = y_sorted.contiguous();
  const at::Tensor gy = grad_y.to(ys.scalar_type()).contiguous();
  const at::Tensor map = row_map.to(at::kLong).contiguous();
  const at::Tensor w = weights.to(acc_dtype(y_sorted)).contiguous();
  const int64_t n_tokens = weights.size(0), top_k = weights.size(1), hidden = ys.size(1), n_rows = ys.size(0);
  // Rows that no pair maps to (none when row_map comes from moe_permute) get zero gradient.
  at::Tensor grad_ys = at::zeros_like(ys);
  at::Tensor grad_w = at::empty({n_tokens, top_k}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ys.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ys_all = ys.const_data_ptr<scalar_t>();
    const scalar_t* gy_all = gy.const_data_ptr<scalar_t>();
    const acc_t* w_all = w.const_data_ptr<acc_t>();
    const int64_t* rows = map.const_data_ptr<int64_t>();
    scalar_t* gys_all = grad_ys.mutable_data_ptr<scalar_t>();
    acc_t* gw_all = grad_w.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n_tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* g = gy_all + n * hidden;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = rows[n * top_k + j];
          TORCH_CHECK(r >= 0 && r < n_rows, "moe_unpermute_backward: row_map out of range");
          const scalar_t* src = ys_all + r * hidden;
          scalar_t* dst = gys_all + r * hidden;
          const acc_t wj = w_all[n * top_k + j];
          acc_t dot = 0;
          for (int64_t h = 0; h < hidden; ++h) {
            dst[h] = static_cast<scalar_t>(wj * static_cast<acc_t>(g[h]));
            dot += static_cast<acc_t>(g[h]) * static_cast<acc_t>(src[h]);
          }
          gw_all[n * top_k + j] = dot;
        }
      }
    });
  });
  return {grad_ys, grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1mega, m) {
  m.def("moe_permute(Tensor x, Tensor indices, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def("moe_permute_backward(Tensor grad_sorted, Tensor row_map, int top_k) -> Tensor");
  m.def("moe_unpermute(Tensor y_sorted, Tensor row_map, Tensor weights) -> Tensor");
  m.def("moe_unpermute_backward(Tensor grad_y, Tensor y_sorted, Tensor row_map, Tensor weights) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(r1mega, CPU, m) {
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_permute_backward", &moe_permute_backward_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cpu);
}

}  // namespace r1mega
