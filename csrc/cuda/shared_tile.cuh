// Device helpers of the CUDA kernels: 2-D arrays in a block's shared memory, loading a region of
// an image plane into one in 16-byte groups, and window sums sliding along its rows or down its
// columns (a few columns at once).
#pragma once

#include "divider.cuh"
#include "lanes.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace spatialnorm::cuda {

// A row-major 2-D array in shared memory. Rows start 16-byte aligned, and a row's bytes are an odd
// multiple of 16: then 16-byte accesses by the threads of a quarter warp along one row, and
// 4-byte accesses by threads on 8 consecutive rows and 4 column stretches of odd length (RowPass),
// all touch different banks.
template <typename T>
struct SharedArray {
  T* data;
  int pitch;

  __host__ __device__ static int pitch_for(int columns) {
    const int chunks = (columns * static_cast<int>(sizeof(T)) + 15) / 16;
    return (chunks | 1) * 16 / static_cast<int>(sizeof(T));
  }

  __device__ T& operator()(int row, int column) const { return data[row * pitch + column]; }

  template <int kSize>
  __device__ Lanes<T, kSize>& lanes(int row, int column) const {
    return *reinterpret_cast<Lanes<T, kSize>*>(&(*this)(row, column));
  }
};

// Hands out consecutive 16-byte aligned arrays of a block's dynamic shared memory. The host runs
// the same code without memory to learn how many bytes a launch needs.
class SharedLayout {
 public:
  __host__ __device__ explicit SharedLayout(unsigned char* base) : base_(base) {}

  template <typename T>
  __host__ __device__ SharedArray<T> take(int rows, int columns) {
    const SharedArray<T> array{base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + used_),
                               SharedArray<T>::pitch_for(columns)};
    used_ += sizeof(T) * rows * array.pitch;
    return array;
  }

  __host__ __device__ size_t bytes() const { return used_; }

 private:
  unsigned char* base_;
  size_t used_ = 0;
};

// A rectangle of a plane, relative to the plane's row-major data. Coordinates are 32-bit: the host
// keeps a plane's height and width, with a tile and its halo, below 2^31.
struct Region {
  int row0;
  int col0;
  int rows;
  int columns;
};

// The smallest region around `region` whose columns are whole groups of `size` counted from the
// plane's first column, so that each group is one aligned load or store.
__host__ __device__ inline Region in_groups(const Region& region, int size) {
  const int col0 = region.col0 >= 0 ? region.col0 / size * size : -((size - 1 - region.col0) / size * size);
  const int end = region.col0 + region.columns;
  const int col_end = end >= 0 ? (end + size - 1) / size * size : -(-end / size * size);
  return {region.row0, col0, region.rows, col_end - col0};
}

// The most columns in_groups makes of a region of `columns` columns.
__host__ __device__ inline int grouped_columns(int columns, int size) { return (columns + 2 * size - 2) / size * size; }

// Which rows and columns of a region lie in the plane.
struct Inside {
  int first_row, last_row, first_column, last_column;

  __device__ Inside(const Region& region, int height, int width)
      : first_row(max(0, -region.row0)),
        last_row(min(region.rows, height - region.row0)),
        first_column(max(0, -region.col0)),
        last_column(min(region.columns, width - region.col0)) {}

  __device__ bool operator()(int r, int c) const {
    return r >= first_row && r < last_row && c >= first_column && c < last_column;
  }
};

// Groups of a load in flight per thread before it stores any.
constexpr int kLoadBatch = 4;

// How a launch loads its regions: in groups of kSize (in_groups). Each thread keeps to one group
// column and walks down the rows, `lanes` threads side by side along a row so that their loads
// coalesce. Set up for the launch's widest region.
struct RegionLoad {
  Divider lanes;      // threads side by side along a row
  int rows_per_step;  // rows the block's threads cover at once

  RegionLoad() = default;
  RegionLoad(int max_columns, int size, int threads) {
    const int groups = std::min(grouped_columns(max_columns, size) / size, threads);
    lanes = Divider(groups);
    rows_per_step = threads / groups;
  }
};

// Hands each group of `region` of a height x width plane to store(row, column, values), relative
// to the region, in the compute type, zeros outside the plane. The region is in groups of kSize,
// and a group lies in the plane or out of it as a whole (the width is a multiple of kSize): each
// group is one load.
// Offsets inside the region are 32-bit: the host keeps rows * width below 2^31.
template <int kSize, typename scalar_t, typename Store>
__device__ inline void load_region(const scalar_t* __restrict__ plane, int height, int width, const Region& region,
                                   const RegionLoad& load, Store store) {
  using Group = Stored<scalar_t, kSize>;
  const Inside in_plane(region, height, width);
  const auto lane = load.lanes.divmod(threadIdx.x);
  const int step = load.rows_per_step;
  if (static_cast<int>(lane.div) >= step) {
    return;
  }
  const scalar_t* origin = plane + (int64_t{region.row0} * width + region.col0);
  for (int c = static_cast<int>(lane.mod) * kSize; c < region.columns; c += load.lanes.divisor * kSize) {
    const bool column_in_plane = c >= in_plane.first_column && c < in_plane.last_column;
    const int first_row = column_in_plane ? in_plane.first_row : region.rows;
    const int last_row = column_in_plane ? in_plane.last_row : 0;
    const scalar_t* column = origin + c;
    for (int r0 = lane.div; r0 < region.rows; r0 += kLoadBatch * step) {
      Group loaded[kLoadBatch];
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int r = r0 + j * step;
        loaded[j] = r >= first_row && r < last_row ? *reinterpret_cast<const Group*>(column + r * width) : Group(0);
      }
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int r = r0 + j * step;
        if (r < region.rows) {
          store(r, c, widen<scalar_t, kSize>(loaded[j]));
        }
      }
    }
  }
}

// Window sums that never subtract, so that each sum's rounding error is bounded by its own
// terms (a running sum keeps the error of a large value long after it left the window) and a NaN
// or infinity reaches only the windows that hold it.
//
// emit(i, sum) gets, for each i < count, the sum of term(j) over j = i .. i + window - 1. Windows
// go in chunks of kChunk <= window consecutive ones: window i0 + t is the chunk's suffix from
// i0 + t (kept in registers) plus its terms from i0 + kChunk on, a prefix that every window of the
// chunk shares and that grows by one term per window. That is (window + kChunk - 1) / kChunk
// terms read per window: two at kernel sizes 3, 5 and 9, as with a running sum.
template <int kChunk, bool kWhole, typename Term, typename Emit>
__device__ inline void chunk_window_sums(Term term, int count, int window, Emit emit) {
  using Sum = decltype(term(0));
  // Terms up to window - 1 lie in the line: count > 0 and kChunk <= window.
  Sum suffix[kChunk];
  suffix[kChunk - 1] = term(kChunk - 1);
#pragma unroll
  for (int t = kChunk - 2; t >= 0; --t) {
    suffix[t] = term(t) + suffix[t + 1];
  }
  Sum beyond = 0;  // terms kChunk .. t + window - 1
  for (int j = kChunk; j < window; ++j) {
    beyond += term(j);
  }
#pragma unroll
  for (int t = 0; t < kChunk; ++t) {
    if (kWhole || t < count) {
      if (t > 0) {
        beyond += term(t + window - 1);
      }
      emit(t, suffix[t] + beyond);
    }
  }
}

template <int kChunk, typename Term, typename Emit>
__device__ inline void chunked_window_sums(Term term, int count, int window, Emit emit) {
  int i0 = 0;
  for (; i0 + kChunk <= count; i0 += kChunk) {
    chunk_window_sums<kChunk, true>([&](int j) { return term(i0 + j); }, kChunk, window,
                                    [&](int t, const auto& sum) { emit(i0 + t, sum); });
  }
  if (i0 < count) {
    chunk_window_sums<kChunk, false>([&](int j) { return term(i0 + j); }, count - i0, window,
                                     [&](int t, const auto& sum) { emit(i0 + t, sum); });
  }
}

// Chunks as long as the window allows, up to kMaxChunk (which bounds the registers a chunk's
// suffix sums take), and no longer than the longest stretch needs: a chunk reads window - 1 terms
// besides one a window whether it is whole or not, so a stretch is best one chunk, a partial one
// where the stretch is shorter than a power of two.
template <int kMaxChunk, typename Term, typename Emit>
__device__ inline void window_sums(Term term, int count, int longest, int window, Emit emit) {
  const int reach = min(window, longest > 1 ? 1 << (32 - __clz(longest - 1)) : 1);
  if (kMaxChunk >= 16 && reach >= 16) {
    chunked_window_sums<16>(term, count, window, emit);
  } else if (kMaxChunk >= 8 && reach >= 8) {
    chunked_window_sums<8>(term, count, window, emit);
  } else if (kMaxChunk >= 4 && reach >= 4) {
    chunked_window_sums<4>(term, count, window, emit);
  } else if (kMaxChunk >= 2 && reach >= 2) {
    chunked_window_sums<2>(term, count, window, emit);
  } else {
    chunked_window_sums<1>(term, count, window, emit);
  }
}

// A pass of window sums along the rows of a shared array. A warp takes 8 consecutive rows and 4
// consecutive stretches of each (of `stretch` columns, an odd number): with the arrays' pitch,
// its 32 threads touch 32 different banks at each step. A row has 4, 8 or 16 stretches, as many
// as keep a thread busy with each unit. Set up for the launch's largest tile.
struct RowPass {
  int stretch;
  int stretches_log2;  // of a row's stretches
  int units;

  RowPass() = default;
  RowPass(int rows, int length, int threads) : stretches_log2(2) {
    const int row_groups = (rows + 7) / 8;
    while (stretches_log2 < 4 && (8 * row_groups) << (stretches_log2 + 1) <= threads) {
      ++stretches_log2;
    }
    stretch = ((length + (1 << stretches_log2) - 1) >> stretches_log2) | 1;
    units = (8 * row_groups) << stretches_log2;
  }
};

// For each of the first `rows` rows and each position i < length, emit(row, i, sum) gets the sum
// of the row's elements column0 + i .. column0 + i + window - 1.
template <typename T, typename Emit>
__device__ inline void slide_rows(const RowPass& pass, SharedArray<T> in, int column0, int rows, int length,
                                  int window, Emit emit) {
  for (int unit = threadIdx.x; unit < pass.units; unit += blockDim.x) {
    const int row = (unit >> (3 + pass.stretches_log2) << 3) + (unit & 7);
    const int begin = (unit >> 3 & ((1 << pass.stretches_log2) - 1)) * pass.stretch;
    const int count = min(length, begin + pass.stretch) - begin;
    if (row < rows && count > 0) {
      const T* line = &in(row, column0 + begin);
      // A chunk's suffix sums take up to 64 bytes of registers: 16 float32 sums, 8 float64.
      window_sums<64 / sizeof(T)>([&](int j) { return line[j]; }, count, pass.stretch, window,
                     [&](int i, T sum) { emit(row, begin + i, sum); });
    }
  }
}

// A pass of window sums down the columns of a shared array, kSize columns (a unit) at once: each
// thread takes a stretch of `stretch` consecutive rows of one unit, consecutive threads on
// consecutive units. Set up for the launch's largest tile; smaller tiles at the plane's edges
// leave some units idle.
struct ColumnPass {
  Divider units_across;  // of a row
  int stretch;
  int items;  // (unit, stretch) pairs

  ColumnPass() = default;
  ColumnPass(int units_across, int length, int threads) : units_across(units_across) {
    const int threads_per_unit = std::max(1, threads / units_across);
    stretch = (length + threads_per_unit - 1) / threads_per_unit;
    items = units_across * ((length + stretch - 1) / stretch);
  }
};

// For each of the first `units_across` units and each row r < length, emit(unit, r, sums) gets the
// sums of the unit's kSize columns over rows r .. r + window - 1.
template <int kSize, typename T, typename Emit>
__device__ inline void slide_columns(const ColumnPass& pass, SharedArray<T> in, int units_across, int length,
                                     int window, Emit emit) {
  // A chunk's suffix sums take kChunk * kSize registers.
  constexpr int kMaxChunk = 16 / kSize;
  for (unsigned int item = threadIdx.x; item < static_cast<unsigned int>(pass.items); item += blockDim.x) {
    const auto at = pass.units_across.divmod(item);
    const int unit = at.mod;
    const int begin = at.div * pass.stretch;
    const int count = min(length, begin + pass.stretch) - begin;
    if (unit < units_across && count > 0) {
      const T* column = &in(begin, unit * kSize);
      window_sums<kMaxChunk>(
          [&](int j) { return *reinterpret_cast<const Lanes<T, kSize>*>(column + j * in.pitch); }, count,
          pass.stretch, window, [&](int i, const Lanes<T, kSize>& sums) { emit(unit, begin + i, sums); });
    }
  }
}

}  // namespace spatialnorm::cuda
