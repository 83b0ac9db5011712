// Sums over a window of one image plane, streamed one output row at a time.
//
// Column sums over the window's rows are updated as the window moves down (add the row that
// enters, subtract the row that leaves), and each output row is then a running sum along the
// column sums. Both steps do O(1) work per element whatever the kernel size. The sums are kept
// in double so that long running sums of float32 data don't drift.
//
// A NaN or infinity would stay in a running sum after it leaves the window (inf - inf is NaN),
// so a band in which one turns up is summed again window by window, which is O(kernel size)
// per element but propagates them exactly as a direct sum does.
#pragma once

#include "../spatial_norm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace spatialnorm::cpu {

class SlidingWindowSums {
 public:
  // Windows reach rows.before rows up and rows.after down, likewise for columns, over planes
  // `width` wide. Parts of a window that fall outside the plane count as zero.
  SlidingWindowSums(int64_t width, WindowExtent rows, WindowExtent cols)
      : width_(width),
        rows_(rows),
        // Reaching further than the plane changes nothing, and clipping bounds the buffers.
        cols_{std::min(cols.before, width - 1), std::min(cols.after, width - 1)},
        // Zeros on both sides of the column sums let the running sum step in and out of the
        // plane without branches.
        column_sums_(static_cast<size_t>(cols_.before + 1 + width + cols_.after)),
        row_sums_(static_cast<size_t>(width)) {}

  // Calls emit(row, sums) for each row in [row_begin, row_end) of a plane `height` rows tall,
  // where sums[x] is the sum of value(plane[r * width + x']) over the window around (row, x).
  template <typename T, typename Value, typename Emit>
  void run(const T* plane, int64_t height, int64_t row_begin, int64_t row_end, Value value, Emit emit) {
    height_ = height;
    if (!run_sliding(plane, row_begin, row_end, value, emit)) {
      run_direct(plane, row_begin, row_end, value, emit);
    }
  }

 private:
  // 1 for NaN and infinities (all exponent bits set), else 0; integer arithmetic, so the loops
  // that collect it still vectorize.
  static uint64_t non_finite(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    constexpr uint64_t exponent = 0x7ff0000000000000ull;
    return (bits & exponent) == exponent;
  }

  // False, with rows emitted that must be redone, where a value entering the window was not finite.
  template <typename T, typename Value, typename Emit>
  bool run_sliding(const T* plane, int64_t row_begin, int64_t row_end, Value value, Emit emit) {
    uint64_t seen_non_finite = 0;
    double* columns = clear_columns();
    const int64_t first = std::max<int64_t>(0, row_begin - rows_.before);
    const int64_t last = std::min(height_ - 1, row_begin + rows_.after);
    for (int64_t r = first; r <= last; ++r) {
      seen_non_finite |= update(columns, plane + r * width_, static_cast<const T*>(nullptr), value);
    }
    for (int64_t row = row_begin; row < row_end; ++row) {
      if (row > row_begin) {
        const int64_t entering = row + rows_.after;
        const int64_t leaving = row - rows_.before - 1;
        seen_non_finite |= update(columns, entering < height_ ? plane + entering * width_ : nullptr,
                                  leaving >= 0 ? plane + leaving * width_ : nullptr, value);
      }
      if (seen_non_finite) {
        return false;
      }
      sum_along_row(columns);
      emit(row, static_cast<const double*>(row_sums_.data()));
    }
    return true;
  }

  template <typename T, typename Value, typename Emit>
  void run_direct(const T* plane, int64_t row_begin, int64_t row_end, Value value, Emit emit) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      double* columns = clear_columns();
      const int64_t first = std::max<int64_t>(0, row - rows_.before);
      const int64_t last = std::min(height_ - 1, row + rows_.after);
      for (int64_t r = first; r <= last; ++r) {
        update(columns, plane + r * width_, static_cast<const T*>(nullptr), value);
      }
      for (int64_t x = 0; x < width_; ++x) {
        double sum = 0.0;
        for (int64_t i = -cols_.before; i <= cols_.after; ++i) {
          sum += columns[x + i];
        }
        row_sums_[x] = sum;
      }
      emit(row, static_cast<const double*>(row_sums_.data()));
    }
  }

  // Zeroes the column sums and their padding; returns the address of column 0.
  double* clear_columns() {
    std::fill(column_sums_.begin(), column_sums_.end(), 0.0);
    return column_sums_.data() + cols_.before + 1;
  }

  // Adds the entering row to the column sums and subtracts the leaving one (either may be
  // null); returns non-zero if an entering value was not finite. (Leaving values entered before.)
  template <typename T, typename Value>
  uint64_t update(double* __restrict columns, const T* __restrict entering, const T* __restrict leaving, Value value) {
    uint64_t seen_non_finite = 0;
    if (entering && leaving) {
      for (int64_t x = 0; x < width_; ++x) {
        const double in = value(entering[x]);
        seen_non_finite |= non_finite(in);
        columns[x] += in - value(leaving[x]);
      }
    } else if (entering) {
      for (int64_t x = 0; x < width_; ++x) {
        const double in = value(entering[x]);
        seen_non_finite |= non_finite(in);
        columns[x] += in;
      }
    } else if (leaving) {
      for (int64_t x = 0; x < width_; ++x) {
        columns[x] -= value(leaving[x]);
      }
    }
    return seen_non_finite;
  }

  void sum_along_row(const double* __restrict columns) {
    double* __restrict out = row_sums_.data();
    double sum = 0.0;
    for (int64_t i = -cols_.before; i <= cols_.after; ++i) {
      sum += columns[i];
    }
    out[0] = sum;
    // sum(x) = sum(x - 1) + step(x). Four steps at a time, their partial sums formed off the
    // chain, so the chain of dependent additions is a quarter as long.
    const double* __restrict in = columns + cols_.after;
    const double* __restrict out_of = columns - cols_.before - 1;
    int64_t x = 1;
    for (; x + 3 < width_; x += 4) {
      const double s1 = in[x] - out_of[x];
      const double s2 = s1 + (in[x + 1] - out_of[x + 1]);
      const double s3 = s2 + (in[x + 2] - out_of[x + 2]);
      const double s4 = s3 + (in[x + 3] - out_of[x + 3]);
      out[x] = sum + s1;
      out[x + 1] = sum + s2;
      out[x + 2] = sum + s3;
      sum += s4;
      out[x + 3] = sum;
    }
    for (; x < width_; ++x) {
      sum += in[x] - out_of[x];
      out[x] = sum;
    }
  }

  int64_t height_ = 0;  // of the plane being run
  int64_t width_;
  WindowExtent rows_;
  WindowExtent cols_;
  std::vector<double> column_sums_;
  std::vector<double> row_sums_;
};

}  // namespace spatialnorm::cpu
