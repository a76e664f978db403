#include "common.hpp"

#include <sstream>

namespace hetero_host {

namespace {
// numpy's flag bits (stable ABI values).
constexpr int kAligned = 0x0100;
constexpr int kWriteable = 0x0400;
}  // namespace

void fail_value(const std::string& msg) { throw py::value_error(msg); }
void fail_type(const std::string& msg) { throw py::type_error(msg); }
void fail_index(const std::string& msg) { throw py::index_error(msg); }

Elem elem_of(const py::array& a) {
  const py::dtype dt = a.dtype();
  if (!dt.attr("isnative").cast<bool>()) return Elem::Other;
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'f' && size == 4) return Elem::F32;
  if (kind == 'f' && size == 2) return Elem::F16;
  if (kind == 'u' && size == 2) return Elem::U16;
  if (kind == 'i' && size == 4) return Elem::I32;
  if (kind == 'i' && size == 8) return Elem::I64;
  return Elem::Other;
}

const char* elem_name(Elem e) {
  switch (e) {
    case Elem::F32: return "float32";
    case Elem::F16: return "float16";
    case Elem::U16: return "uint16";
    case Elem::I32: return "int32";
    case Elem::I64: return "int64";
    default: return "?";
  }
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) s << ",";
  s << ")";
  return s.str();
}

py::array as_array(py::handle obj, const char* fn, const char* name, bool writable) {
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  if (obj.is_none()) fail_type(std::string(fn) + ": " + name + " must be an array, got None");
  const bool shares = py::hasattr(obj, "__dlpack__") || py::hasattr(obj, "__array_interface__");
  if (writable && !shares)
    fail_type(std::string(fn) + ": " + name + " is written in place, so it must be a numpy.ndarray or a CPU "
              "torch.Tensor, got " + py::str(py::type::of(obj)).cast<std::string>());
  py::object arr;
  try {
    arr = py::module_::import("numpy").attr("asarray")(obj);
  } catch (py::error_already_set& e) {  // e.g. a tensor that requires grad, or lives on a GPU
    fail_type(std::string(fn) + ": " + name + " could not be viewed as a numpy array without a copy: " + e.what());
  }
  if (!py::isinstance<py::array>(arr))
    fail_type(std::string(fn) + ": " + name + " could not be viewed as a numpy array");
  return py::reinterpret_borrow<py::array>(arr);
}

void require_dtype(const py::array& a, const char* fn, const char* name, std::initializer_list<Elem> allowed) {
  const Elem e = elem_of(a);
  for (Elem ok : allowed)
    if (e == ok) return;
  std::string want;
  size_t i = 0;
  for (Elem ok : allowed) {
    if (i) want += (i + 1 == allowed.size()) ? " or " : ", ";
    want += elem_name(ok);
    ++i;
  }
  fail_type(std::string(fn) + ": " + name + " must have dtype " + want + " (native byte order), got " +
            dtype_str(a));
}

void require_layout(const py::array& a, const char* fn, const char* name, bool writable) {
  const int flags = a.flags();
  if (!(flags & py::array::c_style))
    fail_value(std::string(fn) + ": " + name + " must be C-contiguous (got strides that are not; pass "
               "numpy.ascontiguousarray(...) or tensor.contiguous())");
  if (!(flags & kAligned)) fail_value(std::string(fn) + ": " + name + " must be aligned to its element size");
  if (writable && !(flags & kWriteable)) fail_value(std::string(fn) + ": " + name + " must be writable");
}

void require_ndim(const py::array& a, const char* fn, const char* name, py::ssize_t ndim, const char* layout) {
  if (a.ndim() != ndim)
    fail_value(std::string(fn) + ": " + name + " must be " + std::to_string(ndim) + "-D " + layout + ", got shape " +
               shape_str(a));
}

std::vector<int64_t> int_vector(py::handle obj, const char* fn, const char* name, py::ssize_t n) {
  py::array a = as_array(obj, fn, name);
  require_dtype(a, fn, name, {Elem::I32, Elem::I64});
  if (a.ndim() != 1 || a.shape(0) != n)
    fail_value(std::string(fn) + ": " + name + " must have shape (" + std::to_string(n) + ",), got " + shape_str(a));
  std::vector<int64_t> out(static_cast<size_t>(n));
  // Strided reads are fine here: the vector is small and copied once.
  const auto stride = a.strides(0);
  const char* base = static_cast<const char*>(a.data());
  const bool i32 = elem_of(a) == Elem::I32;
  for (py::ssize_t i = 0; i < n; ++i) {
    const char* p = base + i * stride;
    if (i32) {
      int32_t v;
      std::memcpy(&v, p, 4);
      out[static_cast<size_t>(i)] = v;
    } else {
      int64_t v;
      std::memcpy(&v, p, 8);
      out[static_cast<size_t>(i)] = v;
    }
  }
  return out;
}

bool overlaps(const py::array& a, const py::array& b) {
  const auto lo_a = reinterpret_cast<uintptr_t>(a.data());
  const auto lo_b = reinterpret_cast<uintptr_t>(b.data());
  const auto hi_a = lo_a + static_cast<uintptr_t>(a.nbytes());
  const auto hi_b = lo_b + static_cast<uintptr_t>(b.nbytes());
  return a.nbytes() > 0 && b.nbytes() > 0 && lo_a < hi_b && lo_b < hi_a;
}

}  // namespace hetero_host
