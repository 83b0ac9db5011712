// Device helpers of the CUDA kernels: running window sums along a column held by one thread,
// and window sums across the threads of a block (one image column per thread).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace spatialnorm::cuda {

// A window sum that slides along a line, in double. NaN and infinities are counted rather than
// added: once added, an infinity would never leave the sum (inf - inf is NaN).
struct RunningSum {
  double sum = 0.0;
  int nans = 0;
  int positive_infinities = 0;
  int negative_infinities = 0;

  __device__ void add(double value, int sign) {
    if (isnan(value)) {
      nans += sign;
    } else if (isinf(value)) {
      (value > 0 ? positive_infinities : negative_infinities) += sign;
    } else {
      sum += sign * value;
    }
  }

  __device__ bool finite() const { return nans == 0 && positive_infinities == 0 && negative_infinities == 0; }

  __device__ double value() const {
    if (nans > 0 || (positive_infinities > 0 && negative_infinities > 0)) {
      return NAN;
    }
    if (positive_infinities > 0) {
      return INFINITY;
    }
    return negative_infinities > 0 ? -INFINITY : sum;
  }
};

// Shared memory for window_across_block: blockDim.x + 1 prefix sums and one total per warp.
__host__ __device__ constexpr size_t window_scratch_doubles(int threads) {
  return static_cast<size_t>(threads + 1 + threads / 32);
}

// The sum of `value` over threads [t - before, t + after] of the block, for every thread t
// (threads past either end count as zero). O(1) per thread: an exclusive prefix sum over the
// block, in double so that differences of prefixes lose nothing that matters. Blocks holding a
// NaN or infinity sum directly instead, so those propagate exactly as in a direct sum.
// Every thread of the block must call it; blockDim.x must be a multiple of 32.
__device__ inline double window_across_block(double value, bool all_finite, int before, int after, double* scratch) {
  const int t = threadIdx.x;
  const int n = blockDim.x;
  double* prefix = scratch;            // prefix[i] = sum of the values of threads < i
  double* warp_totals = scratch + n + 1;
  double result = 0.0;
  if (!all_finite) {
    prefix[t] = value;
    __syncthreads();
    for (int i = max(0, t - before); i <= min(n - 1, t + after); ++i) {
      result += prefix[i];
    }
    __syncthreads();
    return result;
  }
  const int lane = t & 31;
  const int warp = t >> 5;
  double inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const double other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) {
      inclusive += other;
    }
  }
  if (lane == 31) {
    warp_totals[warp] = inclusive;
  }
  __syncthreads();
  if (warp == 0) {
    double total = lane < n / 32 ? warp_totals[lane] : 0.0;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const double other = __shfl_up_sync(0xffffffffu, total, offset);
      if (lane >= offset) {
        total += other;
      }
    }
    if (lane < n / 32) {
      warp_totals[lane] = total;
    }
  }
  __syncthreads();
  prefix[t + 1] = inclusive + (warp > 0 ? warp_totals[warp - 1] : 0.0);
  if (t == 0) {
    prefix[0] = 0.0;
  }
  __syncthreads();
  result = prefix[min(t + after, n - 1) + 1] - prefix[max(t - before, 0)];
  __syncthreads();  // the scratch is reused by the next call
  return result;
}

}  // namespace spatialnorm::cuda
