// hetero._host: the C++ host shim. This first version reports how it was built; the
// staging buffers, gather and top-k arrive with the host-shim issue.
#include <pybind11/pybind11.h>

#include <string>
#include <thread>

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
  info["hardware_threads"] = std::thread::hardware_concurrency();
  return info;
}

}  // namespace

PYBIND11_MODULE(_host, m) {
  m.doc() = "hetero's C++ host shim";
  m.def("build_info", &build_info, "Compiler and threading facts of this build of the shim.");
}
