// Device helpers of the CUDA kernels: running window sums along a column held by one thread,
// and window sums across the lanes of a warp or the threads of a block (one image column each).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace spatialnorm::cuda {

// A window sum that slides along a line, Kahan-compensated so that long float32 running sums
// don't drift (float32 rather than double: on Hopper, conversions to double and double
// arithmetic cost more than all the rest of the kernels). NaN and infinities are counted rather
// than added: once added, an infinity would never leave the sum (inf - inf is NaN).
template <typename T>
struct RunningSum {
  T sum = 0;
  T compensation = 0;
  int nans = 0;
  int positive_infinities = 0;
  int negative_infinities = 0;

  __device__ void add(T value, int sign) {
    if (isfinite(value)) {  // one test on the common path
      const T y = sign * value - compensation;
      const T t = sum + y;
      compensation = (t - sum) - y;
      sum = t;
    } else if (isnan(value)) {
      nans += sign;
    } else {
      (value > 0 ? positive_infinities : negative_infinities) += sign;
    }
  }

  __device__ bool finite() const { return nans == 0 && positive_infinities == 0 && negative_infinities == 0; }

  __device__ T value() const {
    if (nans > 0 || (positive_infinities > 0 && negative_infinities > 0)) {
      return NAN;
    }
    if (positive_infinities > 0) {
      return INFINITY;
    }
    return negative_infinities > 0 ? -INFINITY : sum;
  }
};

// The sum of `value` over lanes [lane - before, lane + after] of a warp, in shuffles: O(kernel
// width), and the cheapest for the narrow windows it is used for. Meaningful on lanes
// [before, 31 - after]; every lane of the warp must call it.
template <typename T>
__device__ inline T window_across_warp(T value, int before, int after) {
  T sum = value;
  for (int d = 1; d <= before; ++d) {
    sum += __shfl_up_sync(0xffffffffu, value, d);
  }
  for (int d = 1; d <= after; ++d) {
    sum += __shfl_down_sync(0xffffffffu, value, d);
  }
  return sum;
}

// Shared memory for window_across_block<rows>: per row, blockDim.x + 1 prefix sums and one total per warp.
__host__ __device__ constexpr size_t window_scratch_doubles(int threads, int rows) {
  return static_cast<size_t>(rows) * (threads + 1 + threads / 32);
}

// For each of `rows` image rows at once, the sum of `values[j]` over threads [t - before, t + after]
// of the block, for every thread t (threads past either end count as zero); the results replace
// the values. O(1) per thread and row: an exclusive prefix sum over the block, in double so that
// differences of prefixes lose nothing that matters, with the rows interleaved so their
// shuffles overlap and they share each barrier. Blocks holding a NaN or infinity sum directly
// instead, so those propagate exactly as in a direct sum.
// Every thread of the block must call it; blockDim.x must be a multiple of 32.
template <int rows>
__device__ inline void window_across_block(double (&values)[rows], bool all_finite, int before, int after,
                                           double* scratch) {
  const int t = threadIdx.x;
  const int n = blockDim.x;
  const int warps = n / 32;
  double* prefix = scratch;  // prefix[j * (n + 1) + i] = sum over threads < i of row j
  double* warp_totals = scratch + rows * (n + 1);
  const int first = max(0, t - before);
  const int last = min(n - 1, t + after);
  if (!all_finite) {
#pragma unroll
    for (int j = 0; j < rows; ++j) {
      prefix[j * (n + 1) + t] = values[j];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < rows; ++j) {
      double sum = 0.0;
      for (int i = first; i <= last; ++i) {
        sum += prefix[j * (n + 1) + i];
      }
      values[j] = sum;
    }
    __syncthreads();
    return;
  }
  const int lane = t & 31;
  const int warp = t >> 5;
  for (int offset = 1; offset < 32; offset <<= 1) {
#pragma unroll
    for (int j = 0; j < rows; ++j) {
      const double other = __shfl_up_sync(0xffffffffu, values[j], offset);
      values[j] += lane >= offset ? other : 0.0;
    }
  }
  if (lane == 31) {
#pragma unroll
    for (int j = 0; j < rows; ++j) {
      warp_totals[j * warps + warp] = values[j];
    }
  }
  __syncthreads();
  if (t < 32) {
#pragma unroll
    for (int j = 0; j < rows; ++j) {
      double total = lane < warps ? warp_totals[j * warps + lane] : 0.0;
      for (int offset = 1; offset < warps; offset <<= 1) {
        const double other = __shfl_up_sync(0xffffffffu, total, offset);
        total += lane >= offset ? other : 0.0;
      }
      if (lane < warps) {
        warp_totals[j * warps + lane] = total;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < rows; ++j) {
    prefix[j * (n + 1) + t + 1] = values[j] + (warp > 0 ? warp_totals[j * warps + warp - 1] : 0.0);
    if (t == 0) {
      prefix[j * (n + 1)] = 0.0;
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < rows; ++j) {
    values[j] = prefix[j * (n + 1) + last + 1] - prefix[j * (n + 1) + first];
  }
  __syncthreads();  // the scratch is reused by the next call
}

}  // namespace spatialnorm::cuda
