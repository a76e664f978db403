// Shared by the host shim's translation units: argument checking (every bad input becomes
// a Python exception that names the function, the argument and what was expected), dtype
// facts, and the float <-> order-preserving key used by every top-k.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace hetero_host {

namespace py = pybind11;

// Element kinds the shim computes on. F16 is IEEE half (numpy float16); U16 is the same
// two bytes seen as uint16 (only copied, never interpreted, except where documented).
enum class Elem { F32, F16, U16, I32, I64, Other };

Elem elem_of(const py::array& a);
const char* elem_name(Elem e);
std::string dtype_str(const py::array& a);
std::string shape_str(const py::array& a);

// The argument as a numpy array without any copy or dtype conversion: numpy arrays as they
// are, torch CPU tensors (and other array-likes) through numpy.asarray, which shares their
// memory. `writable` arguments are written in place, so they must be an ndarray or an
// object numpy views without copying (a tensor); anything else is a TypeError.
py::array as_array(py::handle obj, const char* fn, const char* name, bool writable = false);

// The checks raise TypeError (dtype) or ValueError (layout, rank, shape).
void require_dtype(const py::array& a, const char* fn, const char* name, std::initializer_list<Elem> allowed);
void require_layout(const py::array& a, const char* fn, const char* name, bool writable = false);
void require_ndim(const py::array& a, const char* fn, const char* name, py::ssize_t ndim, const char* layout);

// An integer vector ([n], int32 or int64) copied out (so a concurrent writer cannot change
// it between checking and use).
std::vector<int64_t> int_vector(py::handle obj, const char* fn, const char* name, py::ssize_t n);

// True when the byte ranges of two arrays overlap.
bool overlaps(const py::array& a, const py::array& b);

[[noreturn]] void fail_value(const std::string& msg);
[[noreturn]] void fail_type(const std::string& msg);
[[noreturn]] void fail_index(const std::string& msg);

// ---- top-k keys -------------------------------------------------------------------
// A (value, index) pair packed into one uint64 whose unsigned order is the ranking order:
// larger value first, equal values -> lower index first. -0.0 ranks equal to +0.0 (as in
// comparisons), -inf ranks last among non-NaN values. NaN is rejected before keys are made.
inline uint32_t float_order(float v) {
  v += 0.0f;  // -0.0 -> +0.0
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
inline float order_float(uint32_t o) {
  uint32_t bits = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
inline uint64_t make_key(float v, int32_t idx) {
  const uint32_t low = ~(static_cast<uint32_t>(idx) ^ 0x80000000u);
  return (static_cast<uint64_t>(float_order(v)) << 32) | low;
}
inline int32_t key_index(uint64_t key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key) ^ 0x80000000u);
}
inline float key_value(uint64_t key) { return order_float(static_cast<uint32_t>(key >> 32)); }

// IEEE half -> float, branch-free so loops over it vectorize.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const float sub = static_cast<float>(em) * 5.9604644775390625e-8f;  // subnormals: em * 2^-24
  uint32_t sub_bits;
  std::memcpy(&sub_bits, &sub, 4);
  const uint32_t norm = (em << 13) + (em >= 0x7c00u ? (255u - 31u) << 23 : (127u - 15u) << 23);
  const uint32_t bits = (em < 0x0400u ? sub_bits : norm) | sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace hetero_host
