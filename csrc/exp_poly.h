// exp for fp32, scalar or vector, written once for the CPU row kernel (grpo_loss_rows.h, per vector
// ISA) and the CUDA kernel (cuda/grpo_loss.cu, where expf would become the less accurate __expf under
// --use_fast_math). Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for exp(r) (Cephes'
// expf, ~1 ulp) and 2^n built from exponent bits in two halves so n = 128 does not overflow. Returns
// inf above fp32's range, 0 below the smallest normal (denormals flushed), NaN for NaN. n is rounded by
// adding and subtracting 1.5 * 2^23 (no floor, which baseline x86-64 cannot vectorise).
//
// A fragment with no include guard: the CPU kernel includes it once per ISA namespace. The includer
// defines R1MEGA_EXP_QUALIFIERS and, for its types, `where(mask, a, b)`, `to_int` (float -> int32
// lanes) and `as_float` (the bits of int32 lanes as float): csrc/lanes.h on the CPU.
template <typename V>
R1MEGA_EXP_QUALIFIERS V exp_poly(V x) {
  constexpr float kHi = 88.72283935546875f, kLo = -87.3f, kRound = 12582912.0f;
  const V xc = where(x > kHi, V{} + kHi, where(x < kLo, V{} + kLo, x));
  const V n = (xc * 1.44269504088896341f + kRound) - kRound;
  const V r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  const auto e = to_int(n), e1 = e >> 1;
  const V out = y * as_float((e1 + 127) << 23) * as_float((e - e1 + 127) << 23);
  const V inf = V{} + as_float(0x7f800000);
  return where(x > kHi, inf, where(x < kLo, V{}, where(x != x, x, out)));
}
