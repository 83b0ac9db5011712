// Sums over a window of one image plane, for a band of rows at a time, that never subtract.
//
// A running sum that adds the value entering the window and subtracts the one leaving it keeps
// the rounding error of every large value it has seen, long after the value left: an output
// would depend on data far outside its window. Here every sum is made only of terms inside its
// window, so that each output's rounding error is bounded by its own window's magnitude, and NaN
// and infinities stay inside the windows that hold them, as in a direct sum. Small windows are
// summed directly; wider ones go by blocks (van Herk / Gil-Werman): the lines are cut into
// blocks as long as the window, so that a window covers the end of one block and the start of
// the next, and its sum is that block's suffix sum plus the next block's prefix sum, three
// vectorized additions per element whatever the window's size. Down the columns a vector of
// columns goes through a whole block at a time, its running sums in registers. Along the rows,
// where a block's sums would be a chain of dependent scalar additions, the band's rows are
// transposed in square tiles of one vector per row (transpose.h) first and back after: every
// step along a row is then one vector operation on a whole group of rows.
//
// The column sums of the whole band go first, into rows with zero margins, then the row sums,
// which read columns written long before (reading a vector just stored, shifted by an element,
// stalls the load). The column sums may square the values as they read them (the forward
// window's X^2, where X is already in sum_t), which saves a pass that would write the squares
// and read them back.
// The sums are kept in sum_t: double, or float where the caller checks that float suffices.
#pragma once

#include "../spatial_norm.h"
#include "transpose.h"
#include "vectorized.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace spatialnorm::cpu {

// Rows [first, last) of an image plane.
struct RowRange {
  int64_t first;
  int64_t last;
};

// What a window sums: rows of values in sum_t, or their squares.
template <typename sum_t>
struct WindowTerms {
  const sum_t* rows;
  bool squares;
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
        // A row of column sums has the window's reach before and after it as zeros, and whole tiles.
        stride_(rounded_up(width + cols_.span() - 1, kWidestTile)),
        zeros_(static_cast<size_t>(width), 0) {}

  // The rows of the plane that the windows of rows [row_begin, row_end) reach.
  RowRange rows_reached(int64_t row_begin, int64_t row_end, int64_t height) const {
    return {std::max<int64_t>(0, row_begin - rows_.before), std::min(height, row_end + rows_.after)};
  }

  // sums[(r - row_begin) * width + x] = the sum of the plane's terms over the window around
  // (r, x), for the rows [row_begin, row_end) of a plane `height` rows tall; `terms.rows` holds
  // its rows_reached(row_begin, row_end, height), from their first.
  SPATIALNORM_VECTORIZED_APART
  void run(WindowTerms<sum_t> terms, int64_t height, int64_t row_begin, int64_t row_end, sum_t* __restrict sums) {
    const int64_t rows = row_end - row_begin;
    // New rows are zeros, and only the columns inside the plane are ever written: the margins stay
    // zero. The rows go up to a whole number of tiles, which the row sums transpose whole.
    columns_.resize(static_cast<size_t>(rounded_up(rows, kWidestTile) * stride_));
    const RowRange reached = rows_reached(row_begin, row_end, height);
    const Rows plane{terms.rows, reached.first, reached.last, width_, zeros_.data()};
    // Clipped to the plane, the window's rows stay as they are and its span bounds the blocks.
    const WindowExtent reach = clipped(rows_, height);
    if (terms.squares) {
      column_sums<true>(plane, reach, row_begin, row_end);
    } else {
      column_sums<false>(plane, reach, row_begin, row_end);
    }
    row_sums(rows, sums);
  }

 private:
  // Up to these spans a direct sum (span - 1 vectorized additions per element) costs less than the
  // block sums down the columns, and than the transposed block sums along the rows (one thread,
  // row sums of planes 12 to 112 wide, AVX-512 and AVX2: tiles as fast or faster from 11 columns,
  // direct sums mostly faster at 9).
  static constexpr int64_t kDirectUpTo = 8;
  static constexpr int64_t kDirectAlongRowsUpTo = 10;

  // The rows [first, last) of a plane's values; the plane's other rows are not needed.
  // Other rows read as a row of zeros.
  struct Rows {
    const sum_t* values;
    int64_t first;
    int64_t last;
    int64_t width;
    const sum_t* zeros;

    const sum_t* operator[](int64_t r) const { return r >= first && r < last ? values + (r - first) * width : zeros; }
  };

  // Where the plane's columns start in a row of column sums.
  sum_t* column_row(int64_t band_row) { return columns_.data() + band_row * stride_ + cols_.before; }

  // A term as summed: the value, or its square.
  template <bool kSquares, typename T>
  static T term(T value) {
    if constexpr (kSquares) {
      return value * value;
    } else {
      return value;
    }
  }

  template <bool kSquares>
  void column_sums(const Rows& plane, WindowExtent reach, int64_t row_begin, int64_t row_end) {
    switch (reach.span()) {
      case 1: return column_sums_directly<1, kSquares>(plane, reach, row_begin, row_end);
      case 2: return column_sums_directly<2, kSquares>(plane, reach, row_begin, row_end);
      case 3: return column_sums_directly<3, kSquares>(plane, reach, row_begin, row_end);
      case 4: return column_sums_directly<4, kSquares>(plane, reach, row_begin, row_end);
      case 5: return column_sums_directly<5, kSquares>(plane, reach, row_begin, row_end);
      case 6: return column_sums_directly<6, kSquares>(plane, reach, row_begin, row_end);
      case 7: return column_sums_directly<7, kSquares>(plane, reach, row_begin, row_end);
      case 8: return column_sums_directly<8, kSquares>(plane, reach, row_begin, row_end);
      default: return column_sums_by_blocks<kSquares>(plane, reach, row_begin, row_end);
    }
  }

  // Each output row sums kSpan rows in one pass, rows outside the plane read as a row of zeros.
  template <int64_t kSpan, bool kSquares>
  void column_sums_directly(const Rows& plane, WindowExtent reach, int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const sum_t* terms[kSpan];
      for (int64_t i = 0; i < kSpan; ++i) {
        terms[i] = plane[r - reach.before + i];
      }
      sum_t* __restrict out = column_row(r - row_begin);
      for (int64_t x = 0; x < width_; ++x) {  // vectorizes
        sum_t sum = term<kSquares>(terms[0][x]);
        for (int64_t i = 1; i < kSpan; ++i) {
          sum += term<kSquares>(terms[i][x]);
        }
        out[x] = sum;
      }
    }
  }

  // Window starts (their top rows) are grouped in blocks of `span`, from the first output's: the
  // block's suffix sums from each start, plus a prefix of the next rows, grown one row per output.
  // A vector of columns at a time goes through a whole block, its running sums in registers.
  template <bool kSquares>
  void column_sums_by_blocks(const Rows& plane, WindowExtent reach, int64_t row_begin, int64_t row_end) {
    with_vector_bytes(
        [&](auto bytes) { column_sums_by_blocks<kSquares, decltype(bytes)::value>(plane, reach, row_begin, row_end); });
  }

  // Vectors of kBytes, or narrower ones where the plane is narrower than that.
  template <bool kSquares, int kBytes>
  void column_sums_by_blocks(const Rows& plane, WindowExtent reach, int64_t row_begin, int64_t row_end) {
    if constexpr (kBytes > static_cast<int>(sizeof(sum_t))) {
      if (width_ < Tile<sum_t, kBytes>::kSize) {
        return column_sums_by_blocks<kSquares, kBytes / 2>(plane, reach, row_begin, row_end);
      }
    }
    using Tile = Tile<sum_t, kBytes>;
    constexpr int64_t n = Tile::kSize;
    const int64_t top = row_begin - reach.before;  // of the first output's window
    for (int64_t stretch = 0; stretch < width_; stretch += n) {
      const int64_t x = std::min(stretch, width_ - n);  // the last vector overlaps the one before
      sums_by_blocks<typename Tile::Vector>(
          row_end - row_begin, reach.span(),
          [&](int64_t j) { return term<kSquares, typename Tile::Vector>(Tile::at(plane[top + j] + x)); },
          [&](int64_t i) -> auto& { return Tile::at(column_row(i) + x); });
    }
  }

  // out(i) = the sum of term(j) over j = i .. i + span - 1, for i < count, by blocks of span
  // starts (van Herk / Gil-Werman): the block's suffix sum from i, then the prefix of the next
  // block's terms up to i + span - 1. term(j) must give count + span - 1 terms.
  template <typename Vector, typename Term, typename Out>
  static void sums_by_blocks(int64_t count, int64_t span, const Term& term, const Out& out) {
    for (int64_t block = 0; block < count; block += span) {
      const int64_t end = std::min(block + span, count);
      Vector suffix{};
      for (int64_t j = block + span - 1; j >= end; --j) {  // in the windows of every start here
        suffix += term(j);
      }
      for (int64_t i = end - 1; i >= block; --i) {
        suffix += term(i);
        out(i) = suffix;
      }
      Vector prefix{};
      for (int64_t i = block + 1; i < end; ++i) {
        prefix += term(i + span - 1);
        out(i) += prefix;
      }
    }
  }

  // sums[r * width + x] = the sum of columns_[r * stride_ + x + i] over i < span, for the band's
  // `rows` rows of column sums with their margins.
  void row_sums(int64_t rows, sum_t* __restrict sums) {
    switch (cols_.span()) {
      case 1: return row_sums_directly<1>(rows, sums);
      case 2: return row_sums_directly<2>(rows, sums);
      case 3: return row_sums_directly<3>(rows, sums);
      case 4: return row_sums_directly<4>(rows, sums);
      case 5: return row_sums_directly<5>(rows, sums);
      case 6: return row_sums_directly<6>(rows, sums);
      case 7: return row_sums_directly<7>(rows, sums);
      case 8: return row_sums_directly<8>(rows, sums);
      case 9: return row_sums_directly<9>(rows, sums);
      case kDirectAlongRowsUpTo: return row_sums_directly<kDirectAlongRowsUpTo>(rows, sums);
      default: return row_sums_by_blocks(rows, sums);
    }
  }

  // The span is a template argument, so that the inner loop unrolls.
  template <int64_t kSpan>
  void row_sums_directly(int64_t rows, sum_t* __restrict sums) const {
    for (int64_t r = 0; r < rows; ++r) {
      const sum_t* __restrict columns = columns_.data() + r * stride_;
      sum_t* __restrict out = sums + r * width_;
      for (int64_t x = 0; x < width_; ++x) {  // vectorizes
        sum_t sum = columns[x];
        for (int64_t i = 1; i < kSpan; ++i) {
          sum += columns[x + i];
        }
        out[x] = sum;
      }
    }
  }

  // Along the rows, the band goes in groups of rows transposed in tiles, so that a step along
  // the rows is one vector operation on the whole group: then by blocks as wide as the window,
  // as down the columns. A window that starts on a block's first column is that block; any
  // other, the block's suffix from its start plus the next block's prefix.
  void row_sums_by_blocks(int64_t rows, sum_t* __restrict sums) {
    with_vector_bytes([&](auto bytes) { row_sums_in_tiles<Tile<sum_t, decltype(bytes)::value>>(rows, sums); });
  }

  template <typename Tile>
  void row_sums_in_tiles(int64_t rows, sum_t* __restrict sums) {
    constexpr int64_t n = Tile::kSize;
    // The tiles that hold the plane's columns; the margins' other columns stay zeros.
    const int64_t first_tile = cols_.before / n * n;
    const int64_t tiles_end = cols_.before + width_;
    transposed_.resize(static_cast<size_t>(stride_ * n));
    // Whole tiles: a plane narrower than a tile has its one tile transposed whole.
    block_sums_.resize(static_cast<size_t>(rounded_up(width_, n) * n));
    sum_t* __restrict t = transposed_.data();
    sum_t* __restrict s = block_sums_.data();
    // Where the band and the plane are at least a tile tall and wide, the last group of rows and
    // the last tile of a row overlap the ones before (their sums are made twice, the same) rather
    // than ending past the band: every tile goes back whole, straight into the sums, where a
    // partial one would go through a buffer and a copy a row (one thread, 512 planes of 56x56,
    // 31x31 windows: both passes' sums 666-897 us with the copies, 543-709 without).
    for (int64_t next_group = 0; next_group < rows; next_group += n) {
      const int64_t group = rows >= n ? std::min(next_group, rows - n) : next_group;
      for (int64_t column = first_tile; column < tiles_end; column += n) {
        transpose_tile<Tile>(columns_.data() + group * stride_ + column, stride_, t + column * n, n);
      }
      sums_by_blocks<typename Tile::Vector>(
          width_, cols_.span(), [&](int64_t j) -> const auto& { return Tile::at(t + j * n); },
          [&](int64_t i) -> auto& { return Tile::at(s + i * n); });
      const int64_t group_rows = std::min(n, rows - group);
      for (int64_t stretch = 0; stretch < width_; stretch += n) {
        const int64_t x = width_ >= n ? std::min(stretch, width_ - n) : stretch;
        sum_t* out = sums + group * width_ + x;
        const int64_t columns = std::min(n, width_ - x);
        if (group_rows == n && columns == n) {
          transpose_tile<Tile>(s + x * n, n, out, width_);
          continue;
        }
        sum_t tile[n * n];
        transpose_tile<Tile>(s + x * n, n, tile, n);
        for (int64_t r = 0; r < group_rows; ++r) {
          std::copy(tile + r * n, tile + r * n + columns, out + r * width_);
        }
      }
    }
  }

  // Whole tiles of the widest vectors (64 bytes) fit any narrower ones.
  static constexpr int64_t kWidestTile = Tile<sum_t, 64>::kSize;

  static int64_t rounded_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

  int64_t width_;
  WindowExtent rows_;
  WindowExtent cols_;
  int64_t stride_;
  std::vector<sum_t> columns_;  // the band's column sums, a row of stride_ per output row
  std::vector<sum_t> zeros_;  // a row outside the plane
  std::vector<sum_t> transposed_;  // a group of rows of column sums, transposed
  std::vector<sum_t> block_sums_;  // its row sums, transposed
};

}  // namespace spatialnorm::cpu
