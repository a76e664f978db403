// hetero._host: the C++ host shim. Staging buffers (BufferPool / HostBuffer), page gather and
// token scatter, top-k, and page-sparse relevancy (+ retrieval) on the host. Every compute
// function checks its arguments with the GIL held, then releases the GIL and runs on the
// shim's thread pool (threads.hpp).
#include <pybind11/pybind11.h>

#include <string>
#include <thread>

#include "kernels.hpp"
#include "score_kernel.hpp"
#include "threads.hpp"

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
  info["threads"] = hetero_host::num_threads();
  info["score_kernel"] = hetero_host::score_isa();
#if defined(__SANITIZE_ADDRESS__)
  info["sanitize"] = "address";
#else
  info["sanitize"] = py::none();
#endif
#if defined(NDEBUG)
  info["debug"] = false;
#else
  info["debug"] = true;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_host, m) {
  m.doc() = "hetero's C++ host shim: staging buffers, page gather/scatter, top-k, page-sparse relevancy.";
  m.def("build_info", &build_info, "Compiler, threading and vector-ISA facts of this build of the shim.");
  m.def("num_threads", &hetero_host::num_threads, "Threads the shim's kernels use (the caller included).");
  m.def(
      "set_num_threads",
      [](int64_t n) {
        if (n < 0) throw py::value_error("set_num_threads: n must be >= 0 (0 = the default), got " + std::to_string(n));
        hetero_host::set_num_threads(static_cast<size_t>(n));
      },
      py::arg("n"), "Threads for the shim's kernels; 0 restores the default (HETERO_HOST_THREADS or all cores).");
  m.def(
      "_set_score_isa",
      [](const std::string& isa) { return hetero_host::set_score_isa(isa); }, py::arg("isa"),
      "Testing aid: run the relevancy kernel as 'avx512', 'avx2' or 'baseline'. False if the CPU lacks it.");
  hetero_host::register_buffers(m);
  hetero_host::register_gather(m);
  hetero_host::register_topk(m);
  hetero_host::register_relevancy(m);
}
