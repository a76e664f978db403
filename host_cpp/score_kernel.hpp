// The relevancy bound of pages for a group of query heads, vectorized over head_dim.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace hetero_host {

// scores[p] (p < n_pages) = max over g < G of sum_d max(q[g, d] * mn_p[d], q[g, d] * mx_p[d]),
// where page p's summary row is rows + p * stride elements: mn (D values) then mx (D
// values), float32 (half_rows = false) or IEEE half (half_rows = true). q is [G, D] float32.
void score_pages(const void* rows, bool half_rows, size_t stride, size_t n_pages, size_t D, const float* q, size_t G,
                 float* scores);

// The instruction set the kernel runs with: "avx512", "avx2" or "baseline" (SSE2). Chosen
// at load time from the CPU (HETERO_HOST_ISA overrides); set_score_isa() switches it (for
// tests), returning false when the CPU lacks it.
std::string score_isa();
bool set_score_isa(const std::string& isa);

}  // namespace hetero_host
