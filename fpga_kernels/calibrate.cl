// Calibration kernels: the physical limits the memory-bound steps are compared against.

// Streaming copy in 16-float vectors, one vector per work-item: read + write bandwidth.
__kernel void copy_f16(__global const float16 *restrict src, __global float16 *restrict dst) {
  const size_t i = get_global_id(0);
  dst[i] = src[i];
}
