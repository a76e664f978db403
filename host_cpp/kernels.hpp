// Registration of the shim's functions with the Python module (one per translation unit).
#pragma once

#include <pybind11/pybind11.h>

namespace hetero_host {

void register_buffers(pybind11::module_& m);
void register_gather(pybind11::module_& m);
void register_topk(pybind11::module_& m);
void register_relevancy(pybind11::module_& m);

}  // namespace hetero_host
