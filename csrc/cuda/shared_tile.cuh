// Device helpers of the CUDA kernels: 2-D arrays in a block's shared memory, loading a region of
// an image plane into one, and window sums sliding along its rows or down its columns.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace spatialnorm::cuda {

using Divider = at::cuda::detail::IntDivider<unsigned int>;

// A row-major 2-D array in shared memory. The pitch is odd, so that the threads of a warp walking
// along 32 different rows at once touch 32 different banks.
template <typename T>
struct SharedArray {
  T* data;
  int pitch;

  __device__ T& operator()(int row, int column) const { return data[row * pitch + column]; }
};

// Hands out consecutive 16-byte aligned arrays of a block's dynamic shared memory. The host runs
// the same code without memory to learn how many bytes a launch needs.
class SharedLayout {
 public:
  __host__ __device__ explicit SharedLayout(unsigned char* base) : base_(base) {}

  template <typename T>
  __host__ __device__ SharedArray<T> take(int rows, int columns) {
    const SharedArray<T> array{base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + used_), columns | 1};
    used_ += (sizeof(T) * rows * array.pitch + 15) / 16 * 16;
    return array;
  }

  __host__ __device__ size_t bytes() const { return used_; }

 private:
  unsigned char* base_;
  size_t used_ = 0;
};

// A rectangle of a plane, relative to the plane's row-major data.
struct Region {
  int64_t row0;
  int64_t col0;
  int rows;
  int columns;
};

// Which rows and columns of a region lie in the plane.
struct Inside {
  int first_row, last_row, first_column, last_column;

  __device__ Inside(const Region& region, int64_t height, int64_t width)
      : first_row(static_cast<int>(max(int64_t{0}, -region.row0))),
        last_row(static_cast<int>(min(int64_t{region.rows}, height - region.row0))),
        first_column(static_cast<int>(max(int64_t{0}, -region.col0))),
        last_column(static_cast<int>(min(int64_t{region.columns}, width - region.col0))) {}

  __device__ bool operator()(int r, int c) const {
    return r >= first_row && r < last_row && c >= first_column && c < last_column;
  }
};

// How a launch reads its regions: in groups of `vector` consecutive elements (one 16-byte load
// each where the rows allow it). Each thread keeps to one group column and walks down the rows,
// `lanes` threads side by side along a row so that their loads coalesce.
struct RegionLoad {
  int groups;         // the most groups a row of a region spans
  Divider lanes;      // threads side by side along a row
  int rows_per_step;  // rows the block's threads cover at once
  int vector;

  RegionLoad() = default;
  RegionLoad(int max_columns, int vector, int threads)
      : groups((max_columns + 2 * (vector - 1)) / vector),
        lanes(std::min(groups, threads)),
        rows_per_step(threads / std::min(groups, threads)),
        vector(vector) {}
};

template <typename scalar_t, int size>
struct alignas(sizeof(scalar_t) * size) Group {
  scalar_t values[size];
};

// Groups of a load in flight per thread before it stores any.
constexpr int kLoadBatch = 4;

template <int kVector, typename T, typename scalar_t>
__device__ inline void load_groups(SharedArray<T> array, const scalar_t* __restrict__ plane, int64_t height,
                                   int64_t width, const Region& region, const RegionLoad& load) {
  // The groups start at a multiple of kVector columns: whole groups lie in the plane or out of it.
  const int64_t aligned_col0 =
      region.col0 >= 0 ? region.col0 / kVector * kVector : -((kVector - 1 - region.col0) / kVector * kVector);
  const int shift = static_cast<int>(region.col0 - aligned_col0);
  const scalar_t* origin = plane + region.row0 * width + aligned_col0;
  const int stride = static_cast<int>(width);
  const Inside in_plane(Region{region.row0, aligned_col0, region.rows, region.columns + shift}, height, width);
  const auto lane = load.lanes.divmod(threadIdx.x);
  if (static_cast<int>(lane.div) >= load.rows_per_step) {
    return;
  }
  for (int c = static_cast<int>(lane.mod) * kVector; c - shift < region.columns; c += load.lanes.divisor * kVector) {
    const bool column_in_plane = c >= in_plane.first_column && c < in_plane.last_column;
    for (int r0 = lane.div; r0 < region.rows; r0 += kLoadBatch * load.rows_per_step) {
      Group<scalar_t, kVector> loaded[kLoadBatch];
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int r = r0 + j * load.rows_per_step;
        if (column_in_plane && r < in_plane.last_row && r >= in_plane.first_row) {
          loaded[j] = *reinterpret_cast<const Group<scalar_t, kVector>*>(origin + r * stride + c);
        } else {
#pragma unroll
          for (int e = 0; e < kVector; ++e) {
            loaded[j].values[e] = scalar_t(0);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int r = r0 + j * load.rows_per_step;
#pragma unroll
        for (int e = 0; e < kVector; ++e) {
          const int column = c + e - shift;
          if (r < region.rows && column >= 0 && column < region.columns) {
            array(r, column) = static_cast<T>(loaded[j].values[e]);
          }
        }
      }
    }
  }
}

// Whether copy_region_async can copy a plane's values into shared memory as they are: cp.async
// moves 4, 8 or 16 bytes, so 16-bit values go through registers (and get converted).
template <typename T, typename scalar_t>
constexpr bool kCopiesAsync = std::is_same_v<T, scalar_t> && sizeof(T) >= 4;

// Starts copying *source to *destination; the copy lands by the next wait_for_copies.
template <typename T>
__device__ inline void copy_async(T* destination, const T* source) {
#if __CUDA_ARCH__ >= 800
  const auto address = static_cast<unsigned int>(__cvta_generic_to_shared(destination));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(address), "l"(source), "n"(sizeof(T)));
#else
  *destination = *source;
#endif
}

__device__ inline void wait_for_copies() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// Each thread keeps to one column and issues the copies of all its rows before any arrives, so
// that its loads wait on memory once, not once per batch. Elements outside the plane are set to
// zero directly.
template <typename T>
__device__ inline void copy_region(SharedArray<T> array, const T* __restrict__ plane, int64_t height, int64_t width,
                                   const Region& region, const RegionLoad& load) {
  const Inside in_plane(region, height, width);
  const auto lane = load.lanes.divmod(threadIdx.x);
  const int step = load.rows_per_step;
  if (static_cast<int>(lane.div) >= step) {
    return;
  }
  for (int c = static_cast<int>(lane.mod); c < region.columns; c += load.lanes.divisor) {
    const bool column_in_plane = c >= in_plane.first_column && c < in_plane.last_column;
    const int first_row = column_in_plane ? in_plane.first_row : region.rows;
    int r = lane.div;
    for (; r < first_row; r += step) {
      array(r, c) = T(0);
    }
    const int last_row = column_in_plane ? in_plane.last_row : region.rows;
    const T* source = plane + (region.row0 + r) * width + region.col0 + c;
#pragma unroll 4
    for (; r < last_row; r += step, source += step * width) {
      copy_async(&array(r, c), source);
    }
    for (; r < region.rows; r += step) {
      array(r, c) = T(0);
    }
  }
}

// Copies `region` of a height x width plane into `array`, converted to its type, zero outside the
// plane. Offsets inside the region are 32-bit: the host keeps rows * width below 2^31.
template <typename T, typename scalar_t>
__device__ inline void load_region(SharedArray<T> array, const scalar_t* __restrict__ plane, int64_t height,
                                   int64_t width, const Region& region, const RegionLoad& load) {
  constexpr int kVector = 16 / sizeof(scalar_t);
  if (load.vector == kVector) {
    load_groups<kVector>(array, plane, height, width, region, load);
  } else {
    load_groups<1>(array, plane, height, width, region, load);
  }
}

// load_region, asynchronously where the values need no conversion: then the block sees them
// after wait_for_copies and a barrier. Loads that keep few warps per multiprocessor busy wait on
// memory once this way, not once per batch; with a load of one element per copy, though, it
// takes more instructions than 16-byte loads through registers.
template <typename T, typename scalar_t>
__device__ inline void copy_region_async(SharedArray<T> array, const scalar_t* __restrict__ plane, int64_t height,
                                         int64_t width, const Region& region, const RegionLoad& load) {
  if constexpr (kCopiesAsync<T, scalar_t>) {
    copy_region(array, plane, height, width, region, load);
  } else {
    load_region(array, plane, height, width, region, load);
  }
}

// How one pass of window sums along the lines of a tile is shared by a block's threads: each
// takes a stretch of `stretch` consecutive windows of one line. Set up for the largest tile of a
// launch; smaller tiles at the plane's edges leave some units idle.
struct LinePass {
  Divider lines;
  int stretch;
  int units;

  LinePass() = default;
  LinePass(int lines, int length, int threads) : lines(lines) {
    const int threads_per_line = std::max(1, threads / lines);
    stretch = (length + threads_per_line - 1) / threads_per_line;
    units = lines * ((length + stretch - 1) / stretch);
  }
};

// Window sums that never subtract, so that each sum's rounding error is bounded by its own
// terms (a running sum keeps the error of a large value long after it left the window) and a NaN
// or infinity reaches only the windows that hold it.
//
// emit(i, sum) gets, for each i < count, the sum of value(term) over terms i .. i + window - 1
// of a line that starts at `terms` and steps by `step`. Windows go in chunks of kChunk <= window
// consecutive ones: window i0 + t is the chunk's suffix from i0 + t (kept in registers) plus its
// terms from i0 + kChunk on, a prefix that every window of the chunk shares and that grows by one
// term per window. That is (window + kChunk - 1) / kChunk terms read per window: two at kernel
// sizes 3, 5 and 9, as with a running sum.
template <int kChunk, bool kWhole, typename In, typename Value, typename Emit>
__device__ inline void chunk_window_sums(const In* terms, int step, int count, int window, Value value, Emit emit) {
  using Sum = decltype(value(*terms));
  // Terms up to window - 1 lie in the line: count > 0 and kChunk <= window.
  Sum suffix[kChunk];
  suffix[kChunk - 1] = value(terms[(kChunk - 1) * step]);
#pragma unroll
  for (int t = kChunk - 2; t >= 0; --t) {
    suffix[t] = value(terms[t * step]) + suffix[t + 1];
  }
  Sum beyond = 0;  // terms kChunk .. t + window - 1
  for (int j = kChunk; j < window; ++j) {
    beyond += value(terms[j * step]);
  }
#pragma unroll
  for (int t = 0; t < kChunk; ++t) {
    if (kWhole || t < count) {
      if (t > 0) {
        beyond += value(terms[(t + window - 1) * step]);
      }
      emit(t, suffix[t] + beyond);
    }
  }
}

template <int kChunk, typename In, typename Value, typename Emit>
__device__ inline void chunked_window_sums(const In* terms, int step, int count, int window, Value value, Emit emit) {
  int i0 = 0;
  for (; i0 + kChunk <= count; i0 += kChunk) {
    chunk_window_sums<kChunk, true>(terms + i0 * step, step, kChunk, window, value,
                                    [&](int t, auto sum) { emit(i0 + t, sum); });
  }
  if (i0 < count) {
    chunk_window_sums<kChunk, false>(terms + i0 * step, step, count - i0, window, value,
                                     [&](int t, auto sum) { emit(i0 + t, sum); });
  }
}

template <typename In, typename Value, typename Emit>
__device__ inline void window_sums(const In* terms, int step, int count, int window, Value value, Emit emit) {
  if (window >= 8) {
    chunked_window_sums<8>(terms, step, count, window, value, emit);
  } else if (window >= 4) {
    chunked_window_sums<4>(terms, step, count, window, value, emit);
  } else if (window >= 2) {
    chunked_window_sums<2>(terms, step, count, window, value, emit);
  } else {
    chunked_window_sums<1>(terms, step, count, window, value, emit);
  }
}

// Window sums of `window` terms along lines of `in` (its rows, or `down_columns` its columns):
// for each of the first `lines` lines and each position i < length, emit(line, i, sum) gets the
// sum of value(term) over terms i .. i + window - 1 of the line. Each thread takes stretches of
// consecutive windows of one line.
template <typename In, typename Value, typename Emit>
__device__ inline void slide_windows(const LinePass& pass, SharedArray<In> in, bool down_columns, int lines,
                                     int length, int window, Value value, Emit emit) {
  const int line_step = down_columns ? 1 : in.pitch;
  const int step = down_columns ? in.pitch : 1;
  for (unsigned int unit = threadIdx.x; unit < static_cast<unsigned int>(pass.units); unit += blockDim.x) {
    const auto at = pass.lines.divmod(unit);
    const int line = at.mod;
    const int begin = at.div * pass.stretch;
    const int count = min(length, begin + pass.stretch) - begin;
    if (line < lines && count > 0) {
      window_sums(in.data + line * line_step + begin * step, step, count, window, value,
                  [&](int i, auto sum) { emit(line, begin + i, sum); });
    }
  }
}

}  // namespace spatialnorm::cuda
