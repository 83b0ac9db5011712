// Sums over a window of one image plane, streamed one output row at a time, that never subtract.
//
// A running sum that adds the value entering the window and subtracts the one leaving it keeps
// the rounding error of every large value it has seen, long after the value left: an output
// would depend on data far outside its window. Here every sum is made only of terms inside its
// window (van Herk / Gil-Werman): a line is cut into blocks as long as the window, so that a
// window covers the end of one block and the start of the next, and its sum is that block's
// suffix sum plus the next block's prefix sum. That is three additions per element whatever the
// window size, and each output's rounding error is bounded by its own window's magnitude. NaN and
// infinities stay inside the windows that hold them, as in a direct sum.
//
// Down the columns the blocks are blocks of rows and every step is a vector operation along a
// row; along a row, small windows are summed directly (a few vectorized additions of shifted
// rows), wider ones by blocks. The sums are kept in double.
#pragma once

#include "../spatial_norm.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace spatialnorm::cpu {

// Window sums along one line of doubles: out[x] = sum of line[x - before .. x + after], terms
// outside [0, length) counting as zero. The line is read from a zero-padded buffer.
class LineWindowSums {
 public:
  LineWindowSums(int64_t length, WindowExtent extent)
      : length_(length),
        before_(clipped(extent, length).before),
        window_(clipped(extent, length).span()),
        // Whole blocks from the first window's start to the last window's end, and one more so
        // that every window's next block exists.
        padded_((length + window_ - 1 + window_ - 1) / window_ * window_ + window_),
        suffix_(window_ > kDirectUpTo ? padded_.size() : 0),
        prefix_(suffix_.size()) {}

  // Where the caller writes the line: `length` doubles, with zeros on both sides.
  double* line() { return padded_.data() + before_; }

  void sum(double* __restrict out) {
    switch (window_) {
      case 1: return sum_directly<1>(out);
      case 2: return sum_directly<2>(out);
      case 3: return sum_directly<3>(out);
      case 4: return sum_directly<4>(out);
      case 5: return sum_directly<5>(out);
      case 6: return sum_directly<6>(out);
      case 7: return sum_directly<7>(out);
      case 8: return sum_directly<8>(out);
      default: return sum_by_blocks(out);
    }
  }

 private:
  // Up to here a direct sum (window - 1 vectorized additions per element) costs less than the
  // block scans, whose dependent additions don't vectorize along the line.
  static constexpr int64_t kDirectUpTo = 8;

  // One pass per row, the window's terms added in registers: the size is a template argument
  // so that the inner loop unrolls.
  template <int64_t kWindow>
  void sum_directly(double* __restrict out) const {
    const double* __restrict in = padded_.data();
    for (int64_t x = 0; x < length_; ++x) {
      double sum = in[x];
      for (int64_t i = 1; i < kWindow; ++i) {
        sum += in[x + i];
      }
      out[x] = sum;
    }
  }

  void sum_by_blocks(double* __restrict out) {
    const double* __restrict in = padded_.data();
    double* __restrict suffix = suffix_.data();
    double* __restrict prefix = prefix_.data();  // before the position, within its block
    // The window at x covers [x, x + window) of the padded line: the suffix of x's block and
    // the part of the next block before x + window (nothing when x starts a block). So suffixes
    // are needed in the blocks that hold an x < length, prefixes in the blocks after them.
    const int64_t blocks = (length_ + window_ - 1) / window_;
    for (int64_t start = 0; start < blocks * window_; start += window_) {
      double backward = 0.0;
      for (int64_t i = window_ - 1; i >= 0; --i) {
        backward += in[start + i];
        suffix[start + i] = backward;
      }
      double forward = 0.0;
      for (int64_t i = window_; i < 2 * window_; ++i) {
        prefix[start + i] = forward;
        forward += in[start + i];
      }
    }
    for (int64_t x = 0; x < length_; ++x) {
      out[x] = suffix[x] + prefix[x + window_];
    }
  }

  int64_t length_;
  int64_t before_;
  int64_t window_;
  std::vector<double> padded_;
  std::vector<double> suffix_;
  std::vector<double> prefix_;
};

class WindowSums {
 public:
  // Windows reach rows.before rows up and rows.after down, likewise for columns, over planes
  // `width` wide. Parts of a window that fall outside the plane count as zero.
  WindowSums(int64_t width, WindowExtent rows, WindowExtent cols)
      : width_(width),
        rows_(rows),
        along_rows_(width, cols),
        prefix_(static_cast<size_t>(width)),
        row_sums_(static_cast<size_t>(width)) {}

  // Calls emit(row, sums) for each row in [row_begin, row_end) of a plane `height` rows tall,
  // where sums[x] is the sum of value(plane[r * width + x']) over the window around (row, x).
  template <typename T, typename Value, typename Emit>
  void run(const T* plane, int64_t height, int64_t row_begin, int64_t row_end, Value value, Emit emit) {
    height_ = height;
    const WindowExtent rows = clipped(rows_, height);
    rows_before_ = rows.before;
    window_rows_ = rows.span();
    // Window starts (its top rows) are grouped in blocks of window_rows_, from the first output's.
    for (int64_t block = row_begin; block < row_end; block += window_rows_) {
      const int64_t outputs = std::min(window_rows_, row_end - block);
      const int64_t top = block - rows_before_;
      block_suffixes(plane, top, outputs, value);
      std::fill(prefix_.begin(), prefix_.end(), 0.0);
      for (int64_t i = 0; i < outputs; ++i) {
        if (i > 0) {
          accumulate(plane, top + window_rows_ + i - 1, prefix_.data(), value);
        }
        double* __restrict columns = along_rows_.line();
        const double* __restrict suffix = suffixes_.data() + i * width_;
        const double* __restrict prefix = prefix_.data();
        for (int64_t x = 0; x < width_; ++x) {
          columns[x] = suffix[x] + prefix[x];
        }
        along_rows_.sum(row_sums_.data());
        emit(block + i, static_cast<const double*>(row_sums_.data()));
      }
    }
  }

 private:
  // suffixes_ row i = sum of rows [top + i, top + window_rows_) for the first `outputs` i.
  template <typename T, typename Value>
  void block_suffixes(const T* plane, int64_t top, int64_t outputs, Value value) {
    suffixes_.resize(static_cast<size_t>(outputs * width_));
    double* last = suffixes_.data() + (outputs - 1) * width_;
    std::fill(last, last + width_, 0.0);
    // Rows below the last output's start are all in its window: one sum for them.
    for (int64_t r = top + outputs - 1; r < top + window_rows_; ++r) {
      accumulate(plane, r, last, value);
    }
    for (int64_t i = outputs - 2; i >= 0; --i) {
      double* __restrict row = suffixes_.data() + i * width_;
      const double* __restrict below = row + width_;
      const int64_t r = top + i;
      if (r < 0 || r >= height_) {
        std::copy(below, below + width_, row);
        continue;
      }
      const T* __restrict terms = plane + r * width_;
      for (int64_t x = 0; x < width_; ++x) {
        row[x] = below[x] + value(terms[x]);
      }
    }
  }

  // sums += value(row r) for a row of the plane; rows outside it are zero.
  template <typename T, typename Value>
  void accumulate(const T* plane, int64_t r, double* __restrict sums, Value value) const {
    if (r < 0 || r >= height_) {
      return;
    }
    const T* __restrict row = plane + r * width_;
    for (int64_t x = 0; x < width_; ++x) {
      sums[x] += value(row[x]);
    }
  }

  int64_t width_;
  WindowExtent rows_;
  int64_t height_ = 0;  // of the plane being run, and the rows' extent clipped to it
  int64_t rows_before_ = 0;
  int64_t window_rows_ = 0;
  LineWindowSums along_rows_;
  std::vector<double> suffixes_;
  std::vector<double> prefix_;
  std::vector<double> row_sums_;
};

}  // namespace spatialnorm::cpu
