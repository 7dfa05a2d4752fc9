// The few operations that differ between a scalar and a VecF, for grpo_loss's CPU row kernel
// (grpo_loss_rows.h) and the exp it calls (exp_poly.h). A fragment with no include guard, included once
// per vector ISA inside that ISA's namespace; needs VecF and VecI from grpo_loss.cpp.

inline int32_t to_int(float x) { return static_cast<int32_t>(x); }
inline VecI to_int(VecF x) { return __builtin_convertvector(x, VecI); }
inline float as_float(int32_t x) { return std::bit_cast<float>(x); }
inline VecF as_float(VecI x) { return std::bit_cast<VecF>(x); }
inline float where(bool c, float a, float b) { return c ? a : b; }
inline double where(bool c, double a, double b) { return c ? a : b; }
// Bitwise, not `c ? a : b`: GCC 12 lowers a vector ?: on a mask that is not a comparison lane by lane.
inline VecF where(VecI c, VecF a, VecF b) {
  return std::bit_cast<VecF>((std::bit_cast<VecI>(a) & c) | (std::bit_cast<VecI>(b) & ~c));
}
// Mask logic: && || ! on GCC vectors are lowered lane by lane; bitwise operations on -1/0 lanes are not.
inline bool both(bool a, bool b) { return a && b; }
inline VecI both(VecI a, VecI b) { return a & b; }
inline bool either(bool a, bool b) { return a || b; }
inline VecI either(VecI a, VecI b) { return a | b; }
inline bool negate(bool a) { return !a; }
inline VecI negate(VecI a) { return ~a; }
