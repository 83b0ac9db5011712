// Sums over a window of one image plane, for a band of rows at a time, that never subtract.
//
// A running sum that adds the value entering the window and subtracts the one leaving it keeps
// the rounding error of every large value it has seen, long after the value left: an output
// would depend on data far outside its window. Here every sum is made only of terms inside its
// window, so that each output's rounding error is bounded by its own window's magnitude, and NaN
// and infinities stay inside the windows that hold them, as in a direct sum. Small windows are
// summed directly. Down the columns, wider ones go by blocks (van Herk / Gil-Werman): the rows
// are cut into blocks as tall as the window, so that a window covers the end of one block and the
// start of the next, and its sum is that block's suffix sum plus the next block's prefix sum,
// three vectorized additions per element whatever the window's height. Along a row, where a
// block's prefix sums would be a chain of dependent scalar additions, wider windows are cut into
// pieces of powers of two, summed from level sums of 2, 4, 8, ... columns: about 2 log2(width)
// vectorized additions per element, fewer operations than the blocks' at every width.
//
// The column sums of the whole band go first, into rows with zero margins, then the row sums:
// every step down the columns is a vector operation along a row, and the row sums read columns
// written long before (reading a vector just stored, shifted by an element, stalls the load).
// The sums are kept in sum_t: double, or float where the caller checks that float suffices.
#pragma once

#include "../spatial_norm.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace spatialnorm::cpu {

// Rows [first, last) of an image plane.
struct RowRange {
  int64_t first;
  int64_t last;
};

template <typename sum_t>
class WindowSums {
 public:
  // Windows reach rows.before rows up and rows.after down, likewise for columns, over planes
  // `width` wide. Parts of a window that fall outside the plane count as zero.
  WindowSums(int64_t width, WindowExtent rows, WindowExtent cols)
      : width_(width),
        rows_(rows),
        cols_(clipped(cols, width)),
        // A row of column sums has the window's reach before and after it as zeros.
        stride_(width + cols_.span()) {}

  // The rows of the plane that the windows of rows [row_begin, row_end) reach.
  RowRange rows_reached(int64_t row_begin, int64_t row_end, int64_t height) const {
    return {std::max<int64_t>(0, row_begin - rows_.before), std::min(height, row_end + rows_.after)};
  }

  // sums[(r - row_begin) * width + x] = the sum of the plane's values over the window around
  // (r, x), for the rows [row_begin, row_end) of a plane `height` rows tall; `values` holds its
  // rows_reached(row_begin, row_end, height), from their first.
  void run(const sum_t* values, int64_t height, int64_t row_begin, int64_t row_end, sum_t* __restrict sums) {
    const int64_t rows = row_end - row_begin;
    // New rows are zeros, and only the columns inside the plane are ever written: the margins stay zero.
    columns_.resize(static_cast<size_t>(rows * stride_));
    const RowRange reached = rows_reached(row_begin, row_end, height);
    const Rows plane{values, reached.first, reached.last, width_};
    // Clipped to the plane, the window's rows stay as they are and its span bounds the blocks.
    const WindowExtent reach = clipped(rows_, height);
    switch (reach.span()) {
      case 1: column_sums_directly<1>(plane, reach, row_begin, row_end); break;
      case 2: column_sums_directly<2>(plane, reach, row_begin, row_end); break;
      case 3: column_sums_directly<3>(plane, reach, row_begin, row_end); break;
      case 4: column_sums_directly<4>(plane, reach, row_begin, row_end); break;
      case 5: column_sums_directly<5>(plane, reach, row_begin, row_end); break;
      case 6: column_sums_directly<6>(plane, reach, row_begin, row_end); break;
      case 7: column_sums_directly<7>(plane, reach, row_begin, row_end); break;
      case 8: column_sums_directly<8>(plane, reach, row_begin, row_end); break;
      default: column_sums_by_blocks(plane, reach, row_begin, row_end);
    }
    for (int64_t r = 0; r < rows; ++r) {
      row_sums(columns_.data() + r * stride_, sums + r * width_);
    }
  }

 private:
  // Up to this span a direct sum (span - 1 vectorized additions per element) costs less than the
  // block sums and the sums by powers of two.
  static constexpr int64_t kDirectUpTo = 8;

  // The rows [first, last) of a plane's values; the plane's other rows are not needed.
  struct Rows {
    const sum_t* values;
    int64_t first;
    int64_t last;
    int64_t width;

    bool holds(int64_t r) const { return r >= first && r < last; }
    const sum_t* operator[](int64_t r) const { return values + (r - first) * width; }
  };

  // Where the plane's columns start in a row of column sums.
  sum_t* column_row(int64_t band_row) { return columns_.data() + band_row * stride_ + cols_.before; }

  // Each output row sums kSpan rows in one pass, rows outside the plane read as a row of zeros.
  template <int64_t kSpan>
  void column_sums_directly(const Rows& plane, WindowExtent reach, int64_t row_begin, int64_t row_end) {
    zeros_.resize(static_cast<size_t>(width_));
    for (int64_t r = row_begin; r < row_end; ++r) {
      const sum_t* terms[kSpan];
      for (int64_t i = 0; i < kSpan; ++i) {
        const int64_t row = r - reach.before + i;
        terms[i] = plane.holds(row) ? plane[row] : zeros_.data();
      }
      sum_t* __restrict out = column_row(r - row_begin);
      for (int64_t x = 0; x < width_; ++x) {  // vectorizes
        sum_t sum = terms[0][x];
        for (int64_t i = 1; i < kSpan; ++i) {
          sum += terms[i][x];
        }
        out[x] = sum;
      }
    }
  }

  // Window starts (their top rows) are grouped in blocks of `span`, from the first output's: the
  // block's suffix sums from each start, plus a prefix of the next rows, grown one row per output.
  void column_sums_by_blocks(const Rows& plane, WindowExtent reach, int64_t row_begin, int64_t row_end) {
    const int64_t span = reach.span();
    block_prefix_.resize(static_cast<size_t>(width_));
    for (int64_t block = row_begin; block < row_end; block += span) {
      const int64_t outputs = std::min(span, row_end - block);
      const int64_t top = block - reach.before;
      block_suffixes(plane, top, span, outputs);
      sum_t* __restrict prefix = block_prefix_.data();
      std::fill(prefix, prefix + width_, 0.0);
      for (int64_t i = 0; i < outputs; ++i) {
        const sum_t* __restrict suffix = block_suffixes_.data() + i * width_;
        sum_t* __restrict out = column_row(block + i - row_begin);
        const int64_t r = top + span + i - 1;  // the row entering the prefix
        if (i > 0 && plane.holds(r)) {
          const sum_t* __restrict terms = plane[r];
          for (int64_t x = 0; x < width_; ++x) {  // vectorizes
            prefix[x] += terms[x];
            out[x] = suffix[x] + prefix[x];
          }
        } else {
          for (int64_t x = 0; x < width_; ++x) {  // vectorizes
            out[x] = suffix[x] + prefix[x];
          }
        }
      }
    }
  }

  // block_suffixes_ row i = sum of rows [top + i, top + span) for the first `outputs` i.
  void block_suffixes(const Rows& plane, int64_t top, int64_t span, int64_t outputs) {
    block_suffixes_.resize(static_cast<size_t>(outputs * width_));
    sum_t* __restrict last = block_suffixes_.data() + (outputs - 1) * width_;
    std::fill(last, last + width_, 0.0);
    // Rows below the last output's start are all in its window: one sum for them.
    for (int64_t r = std::max(plane.first, top + outputs - 1); r < std::min(plane.last, top + span); ++r) {
      const sum_t* __restrict terms = plane[r];
      for (int64_t x = 0; x < width_; ++x) {  // vectorizes
        last[x] += terms[x];
      }
    }
    for (int64_t i = outputs - 2; i >= 0; --i) {
      sum_t* __restrict row = block_suffixes_.data() + i * width_;
      const sum_t* __restrict below = row + width_;
      if (!plane.holds(top + i)) {
        std::copy(below, below + width_, row);
        continue;
      }
      const sum_t* __restrict terms = plane[top + i];
      for (int64_t x = 0; x < width_; ++x) {  // vectorizes
        row[x] = below[x] + terms[x];
      }
    }
  }

  // out[x] = the sum of columns[x .. x + span) for a row of column sums with its margins.
  void row_sums(const sum_t* columns, sum_t* __restrict out) {
    switch (cols_.span()) {
      case 1: return row_sums_directly<1>(columns, out);
      case 2: return row_sums_directly<2>(columns, out);
      case 3: return row_sums_directly<3>(columns, out);
      case 4: return row_sums_directly<4>(columns, out);
      case 5: return row_sums_directly<5>(columns, out);
      case 6: return row_sums_directly<6>(columns, out);
      case 7: return row_sums_directly<7>(columns, out);
      case 8: return row_sums_directly<8>(columns, out);
      default: return row_sums_by_powers_of_two(columns, out);
    }
  }

  // The span is a template argument, so that the inner loop unrolls.
  template <int64_t kSpan>
  void row_sums_directly(const sum_t* __restrict columns, sum_t* __restrict out) const {
    for (int64_t x = 0; x < width_; ++x) {  // vectorizes
      sum_t sum = columns[x];
      for (int64_t i = 1; i < kSpan; ++i) {
        sum += columns[x + i];
      }
      out[x] = sum;
    }
  }

  // A window of `span` columns is the concatenation of pieces 2^b long, one for each bit b of
  // span; the pieces' sums come from the level sums L_b[x] = L_(b-1)[x] + L_(b-1)[x + 2^(b-1)]. Every
  // step is a vectorized pass along the row, about 2 log2(span) of them, where the blocks' sums
  // would be a dependent scalar addition per element.
  void row_sums_by_powers_of_two(const sum_t* columns, sum_t* __restrict out) {
    const int64_t span = cols_.span();
    for (std::vector<sum_t>& level : levels_) {
      level.resize(static_cast<size_t>(stride_));
    }
    const sum_t* level = columns;  // sums of `piece` consecutive columns, from x
    int64_t offset = 0;  // where the next piece of the window starts, after x
    for (int64_t piece = 1; piece <= span; piece *= 2) {
      if (span & piece) {
        const sum_t* __restrict terms = level + offset;
        if (offset == 0) {
          std::copy(terms, terms + width_, out);
        } else {
          for (int64_t x = 0; x < width_; ++x) {  // vectorizes
            out[x] += terms[x];
          }
        }
        offset += piece;
      }
      if (2 * piece <= span) {
        // The next level is read up to x + span - 2 * piece for x < width.
        sum_t* __restrict next = level == levels_[0].data() ? levels_[1].data() : levels_[0].data();
        const sum_t* __restrict from = level;
        for (int64_t x = 0; x < width_ + span - 2 * piece; ++x) {  // vectorizes
          next[x] = from[x] + from[x + piece];
        }
        level = next;
      }
    }
  }

  int64_t width_;
  WindowExtent rows_;
  WindowExtent cols_;
  int64_t stride_;
  std::vector<sum_t> columns_;  // the band's column sums, a row of stride_ per output row
  std::vector<sum_t> zeros_;  // a row outside the plane
  std::vector<sum_t> block_suffixes_;
  std::vector<sum_t> block_prefix_;
  std::vector<sum_t> levels_[2];  // of a row of column sums, by powers of two
};

}  // namespace spatialnorm::cpu
