// grpo_loss's CPU row kernel, included by csrc/grpo_loss.cpp once per vector ISA, each time inside
// its own namespace and `#pragma GCC target` region: GCC lowers vector comparisons and selects for
// the target of the function that *defines* them, before inlining, so code written for 64-byte
// vectors must be defined under the target it is meant for. Needs VecF, VecI, kLanes, kPartials and
// Rows from grpo_loss.cpp.

#include "lanes.h"

#define R1MEGA_EXP_QUALIFIERS inline
#include "exp_poly.h"
#undef R1MEGA_EXP_QUALIFIERS

inline float exp_fast(float x) { return exp_poly(x); }
inline VecF exp_fast(VecF x) { return exp_poly(x); }
inline double exp_fast(double x) { return std::exp(x); }  // fp64 is for gradcheck, not speed

// c * e where e = exp(x) (a ratio, or exp of the KL's log-ratio): the plain product where it is finite,
// else sign(c) exp(x + ln|c|), which overflows only where the product itself does, and exactly 0 for
// c = 0 whatever e (not 0 * inf = NaN). Scalar std::exp/log: only for the rare rows that need it.
template <typename acc_t>
inline acc_t times_exp(acc_t c, acc_t e, acc_t x) {
  const acc_t product = c * e;
  if (std::isfinite(product)) return product;
  return c == 0 ? acc_t(0) : std::copysign(std::exp(x + std::log(std::abs(c))), c);
}

// One token's terms (V = fp32 or fp64 with M = bool), or a block's (V = VecF, M = VecI): the formula of
// r1mega/ops/grpo_loss.py, written once. kExact: the products ratio * A and beta * exp(x) through
// `times_exp` (scalar only).
template <typename V>
struct Terms {
  V grad;   // unnormalised dloss/dlogp; 0 where masked
  V loss;   // -(surrogate - beta kl); 0 where masked
  V clips;  // 1 where clipped
  V kl;     // 0 where masked
  V ratio;
};

template <bool kExact, bool kRef, typename V, typename M>
inline __attribute__((always_inline)) Terms<V> token_terms(V lp, V old_lp, V ref_lp, V a, M valid, V lo, V hi, V beta) {
  const V log_ratio = where(valid, lp - old_lp, V{});
  const V ratio = exp_fast(log_ratio);
  const M pos = a >= 0;
  const M clipped = both(both(valid, a != 0), either(both(pos, ratio > hi), both(negate(pos), ratio < lo)));
  V ratio_a;
  if constexpr (kExact) {
    ratio_a = times_exp(a, ratio, log_ratio);
  } else {
    ratio_a = ratio * a;
  }
  const V surrogate = where(clipped, where(pos, hi, lo) * a, ratio_a);
  V kl{}, beta_kl{}, beta_dkl{};
  if constexpr (kRef) {
    const V x = where(valid, ref_lp - lp, V{});  // log(pi_ref / pi)
    const V ex = exp_fast(x);
    V beta_ex;
    if constexpr (kExact) {
      beta_ex = times_exp(beta, ex, x);
    } else {
      beta_ex = beta * ex;
    }
    kl = ex - x - 1;
    beta_kl = beta_ex - beta * (x + 1);
    beta_dkl = beta - beta_ex;  // beta * d kl / d logp
  }
  // d(-(surrogate - beta kl))/dlogp; the clipped branch is constant in logp.
  const V grad = where(clipped, V{}, -ratio_a) + beta_dkl;
  return {where(valid, grad, V{}), where(valid, beta_kl - surrogate, V{}), where(clipped, V{} + 1, V{}),
          where(valid, kl, V{}), ratio};
}

// A row's running partials, per lane for VecF.
template <typename V>
struct Sums {
  V loss{}, count{}, clips{}, kl{}, ratio_sum{};
  V ratio_min = V{} + std::numeric_limits<float>::infinity(), ratio_max = V{} - std::numeric_limits<float>::infinity();

  template <typename M>
  void add(const Terms<V>& t, M valid) {
    loss += t.loss;
    count += where(valid, V{} + 1, V{});
    clips += t.clips;
    kl += t.kl;
    ratio_sum += where(valid, t.ratio, V{});
    ratio_min = where(both(valid, t.ratio < ratio_min), t.ratio, ratio_min);
    ratio_max = where(both(valid, t.ratio > ratio_max), t.ratio, ratio_max);
  }

  // Adds the lanes, in lane order, into part[kPartials].
  void add_to(double* part) const {
    constexpr int lanes = std::is_same_v<V, VecF> ? kLanes : 1;
    for (int l = 0; l < lanes; ++l) {
      auto lane = [l](const V& v) -> double {
        if constexpr (std::is_same_v<V, VecF>) return v[l]; else return v;
      };
      part[0] += lane(loss);
      part[1] += lane(count);
      part[2] += lane(clips);
      part[3] += lane(kl);
      part[4] += lane(ratio_sum);
      part[5] = std::min(part[5], lane(ratio_min));
      part[6] = std::max(part[6], lane(ratio_max));
    }
  }
};

// kLanes consecutive values as fp32 lanes.
template <typename T>
inline VecF load_block(const T* p) {
  VecF v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 is the top half of an fp32
    using VecU16 = uint16_t __attribute__((vector_size(2 * kLanes)));
    VecU16 bits;
    std::memcpy(&bits, p, sizeof bits);
    v = as_float(__builtin_convertvector(bits, VecI) << 16);
  } else {
    float tmp[kLanes];
    for (int l = 0; l < kLanes; ++l) tmp[l] = static_cast<float>(p[l]);
    std::memcpy(&v, tmp, sizeof v);
  }
  return v;
}

template <typename mask_t>
inline VecI valid_block(const mask_t* m) {
  if constexpr (std::is_same_v<mask_t, bool>) {  // bytes 0/1 -> lanes 0/-1, widened in two steps (one is scalarised)
    using VecU8 = uint8_t __attribute__((vector_size(kLanes)));
    using VecU16 = uint16_t __attribute__((vector_size(2 * kLanes)));
    VecU8 bytes;
    std::memcpy(&bytes, m, sizeof bytes);
    return -__builtin_convertvector(__builtin_convertvector(bytes, VecU16), VecI);
  } else {
    return load_block(m) != 0.0f;
  }
}

// Tokens [0, T - T % kLanes) of row b in fp32 blocks; returns where they end.
template <bool kRef, bool kPerToken, typename scalar_t, typename mask_t>
inline __attribute__((always_inline)) int64_t row_blocks(const Rows<scalar_t, mask_t, float>& in, int64_t b,
                                                         Sums<VecF>& sums) {
  const int64_t T = in.T, off = b * T, end = T - T % kLanes;
  const VecF lo = VecF{} + in.lo, hi = VecF{} + in.hi, beta = VecF{} + in.beta;
  const VecF row_adv = VecF{} + (kPerToken ? 0.0f : in.adv[b]);
  for (int64_t t = 0; t < end; t += kLanes) {
    const int64_t i = off + t;
    const VecI valid = valid_block(in.mask + i);
    const VecF a = kPerToken ? load_block(in.adv + i) : row_adv;
    const VecF ref = kRef ? load_block(in.ref_logp + i) : VecF{};
    const Terms<VecF> terms = token_terms<false, kRef>(load_block(in.logp + i), load_block(in.old_logp + i), ref,
                                                       a, valid, lo, hi, beta);
    std::memcpy(in.grad + i, &terms.grad, sizeof terms.grad);
    sums.add(terms, valid);
  }
  return end;
}

// Tokens [begin, T) of row b one at a time.
template <bool kExact, bool kRef, bool kPerToken, typename scalar_t, typename mask_t, typename acc_t>
inline __attribute__((always_inline)) void row_tokens(const Rows<scalar_t, mask_t, acc_t>& in, int64_t b,
                                                      int64_t begin, Sums<acc_t>& sums) {
  const int64_t off = b * in.T;
  for (int64_t t = begin; t < in.T; ++t) {
    const int64_t i = off + t;
    const bool valid = static_cast<float>(in.mask[i]) != 0.0f;
    const acc_t a = in.adv[kPerToken ? i : b];
    const acc_t ref = kRef ? static_cast<acc_t>(in.ref_logp[i]) : acc_t(0);
    const Terms<acc_t> terms = token_terms<kExact, kRef>(static_cast<acc_t>(in.logp[i]),
                                                         static_cast<acc_t>(in.old_logp[i]), ref, a, valid, in.lo,
                                                         in.hi, in.beta);
    in.grad[i] = terms.grad;
    sums.add(terms, valid);
  }
}

// Row b: writes its unnormalised dloss/dlogp and its partials; fp32 in blocks, fp64 token by token.
// A product that overflowed (or 0 * inf) makes the row's loss non-finite: the row is then redone
// token by token with the exact products.
template <bool kRef, bool kPerToken, typename scalar_t, typename mask_t, typename acc_t>
inline __attribute__((always_inline)) void forward_row(const Rows<scalar_t, mask_t, acc_t>& in, int64_t b) {
  auto fresh = [](double* p) {
    std::fill(p, p + 5, 0.0);
    p[5] = std::numeric_limits<double>::infinity();
    p[6] = -std::numeric_limits<double>::infinity();
  };
  double* part = in.part + b * kPartials;
  fresh(part);
  int64_t done = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    Sums<VecF> blocks;
    done = row_blocks<kRef, kPerToken>(in, b, blocks);
    blocks.add_to(part);
  }
  Sums<acc_t> tail;
  row_tokens<false, kRef, kPerToken>(in, b, done, tail);
  tail.add_to(part);
  if (!std::isfinite(part[0])) {
    fresh(part);
    Sums<acc_t> exact;
    row_tokens<true, kRef, kPerToken>(in, b, 0, exact);
    exact.add_to(part);
  }
}

// Rows [begin, end): the entry point, called from outside the target region.
template <bool kRef, bool kPerToken, typename scalar_t, typename mask_t, typename acc_t>
void forward_rows(const Rows<scalar_t, mask_t, acc_t>& in, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) forward_row<kRef, kPerToken>(in, b);
}
