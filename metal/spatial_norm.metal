// Metal kernels of torch_spatialnorm: MPSCNNSpatialNormalization and its gradient (docs/definition.md).
//
// The tiled kernels (forward_tiled, gradient_tiled) each make one pass over the data. A
// threadgroup owns a strip of columns of one image plane (the whole width where it fits) and a
// segment of its rows, and sweeps down them a few rows per step, keeping in threadgroup memory
// ring buffers of the rows its windows still need: every element is read from device memory
// once and written once, in 32-element runs that start on a 32-element boundary, so the loads and
// stores of a SIMD-group are coalesced. Window sums are formed in threadgroup memory along rows
// and down columns with sums that never subtract (WindowWalk).
//
// Windows too large for threadgroup memory take the general path: separable passes with one
// thread per row or column and full-size float32 row sums in device memory, summed by blocks
// (BlockWalk) at a cost per window that does not grow with the window.
//
// Inputs and outputs are float, half or bfloat; all arithmetic is float32.
//
// Every kernel parameter has [[buffer(i)]] equal to its position, the order in which
// torch.mps.compile_shader binds arguments. Python ints arrive as 64-bit (long), Python
// floats as 32-bit float, lists of ints as arrays of long.
#include <metal_stdlib>
using namespace metal;

// Consecutive windows of a line that share a chunk: the size of WindowWalk's suffix array.
enum : int { kMaxChunk = 8 };

// Window sums over a line of terms: window i covers terms [first + i, first + i + window - 1],
// and next() returns windows 0, 1, 2, ... The terms come from `Terms`, an accessor whose
// operator()(i) gives term i (zero outside the data). MSL has no lambdas, so the walk is an object
// the caller steps.
//
// The sums never subtract: a running sum that drops the leaving value keeps the rounding error
// of a large value long after the value left the window, and an infinity would never leave it.
// Windows go in chunks of `chunk` = min(window, kMaxChunk) consecutive ones: window i0 + t is
// the chunk's suffix from its term t (kept in `suffix`) plus the terms from `chunk` to
// t + window - 1, which every later window of the chunk shares and which grow by one term per
// window. Each sum is made of its own window's terms only, about (window + chunk) / chunk terms
// read per window.
template <typename Terms>
struct WindowWalk {
  Terms terms;
  long window;
  int chunk;
  int position;  // of the next window in its chunk
  long first;    // index of the current chunk's first term
  float suffix[kMaxChunk];
  float beyond;

  WindowWalk(Terms terms_, long first_, long window_)
      : terms(terms_), window(window_), chunk(int(min(window_, long(kMaxChunk)))), position(0), first(first_),
        beyond(0.0f) {
    start_chunk();
  }

  void start_chunk() {
    float sum = 0.0f;
    for (int t = chunk - 1; t >= 0; --t) {
      sum = terms(first + t) + sum;
      suffix[t] = sum;
    }
    beyond = 0.0f;
    for (long j = chunk; j < window; ++j) {
      beyond += terms(first + j);
    }
  }

  float next() {
    if (position == chunk) {
      first += chunk;
      position = 0;
      start_chunk();
    } else if (position > 0) {
      beyond += terms(first + position + window - 1);
    }
    return suffix[position++] + beyond;
  }
};

struct Square {
  template <typename T>
  float operator()(T v) const {
    const float x = static_cast<float>(v);
    return x * x;
  }
};

struct AsFloat {
  template <typename T>
  float operator()(T v) const {
    return static_cast<float>(v);
  }
};

// T = delta + scale * (window sum of X^2); just delta when alpha (so scale) is 0, whatever the
// window holds (also infinities or NaN).
inline float denominator(float window_sum, float scale, float delta) {
  return scale == 0.0f ? delta : delta + scale * window_sum;
}

// a * t^e, exact wherever the product is a finite float (docs/definition.md): NaN where t <= 0;
// a where e = 0 (pow(t, 0) is 1 even for an infinite or NaN t); and where t is subnormal or t^e
// alone leaves float's normal range (t = 1e-8, e = -5: 1e40), the product of a's fraction and
// 2^r, |r| <= 1/2, scaled by a's exponent plus the rest of e * log2(t), so that 0 * t^e is 0 and
// 1e-20 * 1e40 is 1e20. compile_shader builds with precise math, but a user may turn fast math
// on, whose pow is far less accurate for large exponents: precise:: keeps float32 accuracy.
inline float times_power(float a, float t, float e) {
  if (!(t > 0.0f) && !isnan(t)) {
    return NAN;
  }
  if (e == 0.0f) {
    return a;
  }
  const bool subnormal = t < FLT_MIN;
  if (!subnormal) {
    const float power = precise::pow(t, e);
    if (isnormal(power) || !isfinite(t)) {
      return a * power;
    }
  }
  const float log2_t = subnormal ? precise::log2(t * 16777216.0f) - 24.0f : precise::log2(t);
  const float l = clamp(e * log2_t, -400.0f, 400.0f);  // beyond, a * 2^l is 0 or infinite for any float a
  const float whole = rint(l);
  int exponent = 0;
  const float fraction = frexp(a, exponent);
  return ldexp(fraction * precise::exp2(l - whole), exponent + int(whole));
}

// ----------------------------------------------------------------------------------------------
// Tiled kernels: one pass, threadgroup memory, no scratch in device memory.

enum : int {
  kThreads = 256,  // lanes of a threadgroup (the host dispatches exactly this many)
  kSimdWidth = 32,
  kSimdgroups = kThreads / kSimdWidth,
  kThreadgroupFloats = 7168,  // 28 KiB, within every Apple GPU's 32 KiB
};

// Where an array lies in threadgroup memory (in floats) and how many rows its ring holds.
struct RingLayout {
  long offset;
  long pitch;
  long rows;
};

// How threadgroups sweep the planes; filled in by the host (torch_spatialnorm/mps.py), which
// also lays out threadgroup memory. Only longs: the host binds it from a list of Python ints.
struct Sweep {
  long height, width;           // of a plane
  long strip_width, strips;     // output columns of a threadgroup, and strips across a plane
  long segment_rows, segments;  // output rows of a threadgroup, and segments down a plane
  long step_rows;               // rows a step of the sweep adds
  long before_y, after_y, before_x, after_x;  // how far the forward window W reaches
  RingLayout x;          // X, with the columns its window sums need
  RingLayout x_sums;     // row sums of X^2
  RingLayout terms;      // gradient: dY, then G = dY * X * T^(-beta-1), a step's rows
  RingLayout scaled;     // gradient: dY * T^-beta, then dX
  RingLayout term_sums;  // gradient: row sums of G over the mirrored window
};

// A ring of rows in threadgroup memory: plane row r lives in slot r mod rows.
struct Ring {
  threadgroup float* data;
  long pitch;
  long rows;

  threadgroup float& operator()(long row, long column) const {
    long slot = row % rows;
    slot += slot < 0 ? rows : 0;
    return data[slot * pitch + column];
  }
};

inline Ring ring_in(threadgroup float* memory, constant RingLayout& layout) {
  return Ring{memory + layout.offset, layout.pitch, layout.rows};
}

struct Lanes {
  uint index;      // in the threadgroup
  uint simd_lane;  // in its SIMD-group
  uint simdgroup;  // in the threadgroup
};

// The part of the planes a threadgroup owns: output rows [first_row, last_row) and columns
// [column, column + width) of one plane.
struct Tile {
  long plane_start, first_row, last_row, column;
  long width;

  Tile(constant Sweep& sweep, uint2 group) {
    const long strip = long(group.x) % sweep.strips;
    const long segment = long(group.x) / sweep.strips;
    plane_start = long(group.y) * sweep.height * sweep.width;
    column = strip * sweep.strip_width;
    width = min(sweep.strip_width, sweep.width - column);
    first_row = segment * sweep.segment_rows;
    last_row = min(first_row + sweep.segment_rows, sweep.height);
  }
};

// Elements of the rectangle rows [first_row, last_row) x columns [first_column, last_column) of
// a plane, which lies in it, as runs of consecutive addresses: each row, or the whole rectangle
// where it spans the plane's width. Each SIMD-group takes one 32-element run piece at a time,
// starting on a 32-element boundary of the buffer, so that its lanes touch whole segments.
struct Runs {
  long first_row, first_column, width;
  long runs, length, pieces;  // per run

  Runs(long first_row_, long last_row, long first_column_, long last_column, long width_)
      : first_row(first_row_), first_column(first_column_), width(width_) {
    const bool whole_rows = first_column == 0 && last_column == width;
    const bool empty = last_row <= first_row || last_column <= first_column;
    runs = empty ? 0 : whole_rows ? 1 : last_row - first_row;
    length = whole_rows ? (last_row - first_row) * width : last_column - first_column;
    pieces = (length + kSimdWidth - 1) / kSimdWidth + 1;
  }

  // The buffer index of `lanes`' element of piece `p`, or -1 where that lane has none.
  long element(long plane_start, long p, Lanes lanes) const {
    const long start = plane_start + (first_row + p / pieces) * width + first_column;
    const long i = (start / kSimdWidth + p % pieces) * kSimdWidth + lanes.simd_lane;
    return i >= start && i < start + length ? i : -1;
  }
};

// Copies the part of rows [first_row, first_row + rows) x columns [origin, origin + columns) of a
// plane that lies in it into `ring` (its column 0 is plane column `origin`), as float; zero where
// the rectangle leaves the plane.
template <typename T>
void load_rows(device const T* data, constant Sweep& sweep, long plane_start, long first_row, long rows, long origin,
               long columns, Ring ring, Lanes lanes) {
  for (long e = lanes.index; e < rows * columns; e += kThreads) {
    const long row = first_row + e / columns, column = origin + e % columns;
    if (row < 0 || row >= sweep.height || column < 0 || column >= sweep.width) {
      ring(row, e % columns) = 0.0f;
    }
  }
  const Runs runs(max(first_row, 0L), min(first_row + rows, sweep.height), max(origin, 0L),
                  min(origin + columns, sweep.width), sweep.width);
  for (long p = lanes.simdgroup; p < runs.runs * runs.pieces; p += kSimdgroups) {
    const long i = runs.element(plane_start, p, lanes);
    if (i >= 0) {
      ring((i - plane_start) / sweep.width, (i - plane_start) % sweep.width - origin) = static_cast<float>(data[i]);
    }
  }
}

// Writes rows [first_row, last_row) x columns [column, column + width) of a plane from `ring`
// (its column 0 is plane column `origin`).
template <typename T>
void store_rows(device T* data, constant Sweep& sweep, long plane_start, long first_row, long last_row, long column,
                long width, long origin, Ring ring, Lanes lanes) {
  const Runs runs(first_row, last_row, column, column + width, sweep.width);
  for (long p = lanes.simdgroup; p < runs.runs * runs.pieces; p += kSimdgroups) {
    const long i = runs.element(plane_start, p, lanes);
    if (i >= 0) {
      data[i] = static_cast<T>(ring((i - plane_start) / sweep.width, (i - plane_start) % sweep.width - origin));
    }
  }
}

// Terms along a row of threadgroup memory (squared for the sums of X^2).
template <bool kSquares>
struct RowTerms {
  threadgroup const float* row;

  float operator()(long i) const {
    const float v = row[i];
    return kSquares ? v * v : v;
  }
};

// Terms down a column of a ring.
struct RingColumn {
  Ring ring;
  long column;

  float operator()(long row) const { return ring(row, column); }
};

// sums(r, c) = sum of source(r, c .. c + window - 1) (squared first if kSquares), for the rows
// [first_row, first_row + rows) and the columns [0, outputs). A lane takes kMaxChunk consecutive
// windows of one row; neighbouring lanes take neighbouring rows.
template <bool kSquares>
void row_window_sums(Ring source, Ring sums, long first_row, long rows, long outputs, long window, Lanes lanes) {
  const long chunks = (outputs + kMaxChunk - 1) / kMaxChunk;
  for (long e = lanes.index; e < rows * chunks; e += kThreads) {
    const long row = first_row + e % rows;
    const long first = e / rows * kMaxChunk;
    WindowWalk<RowTerms<kSquares>> walk(RowTerms<kSquares>{&source(row, 0)}, first, window);
    for (long c = first; c < min(first + kMaxChunk, outputs); ++c) {
      sums(row, c) = walk.next();
    }
  }
}

inline long floor_div(long a, long b) { return a >= 0 ? a / b : -((b - 1 - a) / b); }

// Y = X * (delta + scale * sum of X^2 over W)^-beta, in one dispatch: threadgroup (strip and
// segment, plane). The sweep goes in blocks of step_rows rows that start at multiples of
// step_rows, so that each block's loads and stores start on the same boundaries: each step loads
// a block of X and sums its squares along the rows, and finishes the block of Y whose windows
// that completes (`lag` blocks earlier): sums down the columns, the power, the store.
template <typename T>
kernel void forward_tiled(device const T* input [[buffer(0)]], device T* output [[buffer(1)]],
                          constant Sweep& sweep [[buffer(2)]], constant float& scale [[buffer(3)]],
                          constant float& delta [[buffer(4)]], constant float& neg_beta [[buffer(5)]],
                          uint2 group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_threadgroup]],
                          uint simd_lane [[thread_index_in_simdgroup]],
                          uint simdgroup [[simdgroup_index_in_threadgroup]]) {
  threadgroup float memory[kThreadgroupFloats];
  const Lanes lanes{lane, simd_lane, simdgroup};
  const Tile tile(sweep, group);
  const Ring x = ring_in(memory, sweep.x), x_sums = ring_in(memory, sweep.x_sums);
  const long window_y = sweep.before_y + sweep.after_y + 1, window_x = sweep.before_x + sweep.after_x + 1;
  const long origin = tile.column - sweep.before_x;  // plane column of x's column 0
  const long step = sweep.step_rows, lag = (sweep.after_y + step - 1) / step;
  const long first_needed = tile.first_row - sweep.before_y, end_needed = tile.last_row + sweep.after_y;
  const long last_block = floor_div(tile.last_row - 1, step) + lag;
  for (long block = floor_div(first_needed, step); block <= last_block; ++block) {
    const long row = max(block * step, first_needed), rows = max(min(block * step + step, end_needed) - row, 0L);
    load_rows(input, sweep, tile.plane_start, row, rows, origin, tile.width + window_x - 1, x, lanes);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    row_window_sums<true>(x, x_sums, row, rows, tile.width, window_x, lanes);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Y replaces X in place.
    const long first = max((block - lag) * step, tile.first_row), last = min((block - lag + 1) * step, tile.last_row);
    for (long c = lanes.index; c < tile.width && first < last; c += kThreads) {
      WindowWalk<RingColumn> walk(RingColumn{x_sums, c}, first - sweep.before_y, window_y);
      for (long y = first; y < last; ++y) {
        threadgroup float& value = x(y, c + sweep.before_x);
        value = times_power(value, denominator(walk.next(), scale, delta), neg_beta);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    store_rows(output, sweep, tile.plane_start, first, last, tile.column, tile.width, origin, x, lanes);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the next blocks take these slots
  }
}

// dX = dY * T^-beta - gradient_scale * X * (sum over M of G), G = dY * X * T^(-beta-1), in one
// dispatch, in aligned blocks as the forward. A step loads a block of X; finishes T, G and
// dY * T^-beta for the block of rows whose windows W that completes (lag_t blocks earlier), at
// the columns the mirrored sums need; and finishes dX for the block whose mirrored windows M
// those complete (lag_d blocks earlier still).
template <typename T>
kernel void gradient_tiled(device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],
                           device T* grad_input [[buffer(2)]], constant Sweep& sweep [[buffer(3)]],
                           constant float& scale [[buffer(4)]], constant float& delta [[buffer(5)]],
                           constant float& neg_beta [[buffer(6)]], constant float& g_exponent [[buffer(7)]],
                           constant float& gradient_scale [[buffer(8)]], uint2 group [[threadgroup_position_in_grid]],
                           uint lane [[thread_index_in_threadgroup]], uint simd_lane [[thread_index_in_simdgroup]],
                           uint simdgroup [[simdgroup_index_in_threadgroup]]) {
  threadgroup float memory[kThreadgroupFloats];
  const Lanes lanes{lane, simd_lane, simdgroup};
  const Tile tile(sweep, group);
  const Ring x = ring_in(memory, sweep.x), x_sums = ring_in(memory, sweep.x_sums);
  const Ring terms = ring_in(memory, sweep.terms), scaled = ring_in(memory, sweep.scaled);
  const Ring term_sums = ring_in(memory, sweep.term_sums);
  const long window_y = sweep.before_y + sweep.after_y + 1, window_x = sweep.before_x + sweep.after_x + 1;
  // G is needed at the columns [column - after_x, column + width + before_x), and T there needs X
  // from before_x further left to after_x further right.
  const long term_origin = tile.column - sweep.after_x, term_columns = tile.width + window_x - 1;
  const long x_origin = term_origin - sweep.before_x;
  const long step = sweep.step_rows;
  const long lag_t = (sweep.after_y + step - 1) / step, lag_d = (sweep.before_y + step - 1) / step;
  // Rows of X, and of G, that the tile's rows need.
  const long first_needed = tile.first_row - (window_y - 1), end_needed = tile.last_row + window_y - 1;
  const long first_term_row = tile.first_row - sweep.after_y, end_term_row = tile.last_row + sweep.before_y;
  const long last_block = floor_div(tile.last_row - 1, step) + lag_t + lag_d;
  for (long block = floor_div(first_needed, step); block <= last_block; ++block) {
    const long row = max(block * step, first_needed), rows = max(min(block * step + step, end_needed) - row, 0L);
    const long first_t = max((block - lag_t) * step, first_term_row);
    const long last_t = min((block - lag_t + 1) * step, end_term_row);
    const long term_rows = max(last_t - first_t, 0L);
    load_rows(input, sweep, tile.plane_start, row, rows, x_origin, term_columns + window_x - 1, x, lanes);
    load_rows(grad_output, sweep, tile.plane_start, first_t, term_rows, term_origin, term_columns, terms, lanes);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    row_window_sums<true>(x, x_sums, row, rows, term_columns, window_x, lanes);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (long g = lanes.index; g < term_columns && term_rows > 0; g += kThreads) {
      WindowWalk<RingColumn> walk(RingColumn{x_sums, g}, first_t - sweep.before_y, window_y);
      const long column = term_origin + g;
      const bool strip_column = g >= sweep.after_x && g < sweep.after_x + tile.width;
      for (long y = first_t; y < last_t; ++y) {
        const float t = denominator(walk.next(), scale, delta);
        if (y >= 0 && y < sweep.height && column >= 0 && column < sweep.width) {
          threadgroup float& term = terms(y, g);
          const float dy = term;
          term = times_power(dy * x(y, g + sweep.before_x), t, g_exponent);
          if (strip_column) {
            scaled(y, g - sweep.after_x) = times_power(dy, t, neg_beta);
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    row_window_sums<false>(terms, term_sums, first_t, term_rows, tile.width, window_x, lanes);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // dX replaces dY * T^-beta in place.
    const long first_d = (block - lag_t - lag_d) * step;
    const long first = max(first_d, tile.first_row), last = min(first_d + step, tile.last_row);
    for (long c = lanes.index; c < tile.width && first < last; c += kThreads) {
      WindowWalk<RingColumn> walk(RingColumn{term_sums, c}, first - sweep.after_y, window_y);
      for (long y = first; y < last; ++y) {
        const float neighbours = walk.next();
        threadgroup float& value = scaled(y, c);
        if (gradient_scale != 0.0f) {
          value -= gradient_scale * x(y, c + window_x - 1) * neighbours;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    store_rows(grad_input, sweep, tile.plane_start, first, last, tile.column, tile.width, tile.column, scaled, lanes);
  }
}

// ----------------------------------------------------------------------------------------------
// General path: separable passes for windows too large for threadgroup memory.

// Window sums along a line by blocks (van Herk / Gil-Werman), for the general path's threads,
// each of which walks a whole line: next() returns the sums over [i - before, i + after] for
// i = 0, 1, 2, ... (terms outside the line are zero). The line is cut into blocks as long as the
// window from its first term; a window that starts at term a >= 0 is the suffix of a's block from
// a plus the prefix of the next block up to a + window - 1. When the walk reaches a block's
// first term it makes the block's suffix sums, backwards, and keeps them where the Line says
// (over the terms themselves where the line is scratch: every term is read before its suffix
// takes its place); the prefix grows by one term per window. The first `before` windows, which
// start before the line, are prefixes of the first block. About three terms per window whatever
// its size, none subtracted.
template <typename Line>
struct BlockWalk {
  Line line;
  long before, after, window;
  long i;        // the next window
  float prefix;  // of the first block (windows before the line), then of the next block

  BlockWalk(Line line_, long before_, long after_)
      : line(line_), before(before_), after(after_), window(before_ + after_ + 1), i(0), prefix(0.0f) {}

  float next() {
    const long a = i++ - before;
    if (a < 0) {
      if (a == -before) {
        for (long j = 0; j < after; ++j) {
          prefix += line.term(j);
        }
      }
      prefix += line.term(a + window - 1);
      return prefix;
    }
    if (a % window == 0) {
      float suffix = 0.0f;
      for (long j = min(a + window, line.length) - 1; j >= a; --j) {
        suffix += line.term(j);
        line.keep(j, suffix);
      }
      prefix = 0.0f;
    } else {
      prefix += line.term(a + window - 1);
    }
    return line.kept(a) + prefix;
  }
};

// A column of float scratch, `stride` elements apart, that the walk overwrites with its suffixes.
struct ScratchColumn {
  device float* line;
  long length;
  long stride;

  float term(long j) const { return j < length ? line[j * stride] : 0.0f; }
  void keep(long j, float suffix) const { line[j * stride] = suffix; }
  float kept(long j) const { return line[j * stride]; }
};

// A row of the input, f applied, whose sums go to a row of scratch: the suffix from term j is
// kept where window j + before's sum goes, which the walk has not written yet.
template <typename T, typename F>
struct RowIntoSums {
  device const T* row;
  device float* sums;
  long length;
  long before;

  float term(long j) const { return j < length ? F()(row[j]) : 0.0f; }
  void keep(long j, float suffix) const {
    if (j + before < length) {
      sums[j + before] = suffix;
    }
  }
  float kept(long j) const { return sums[j + before]; }
};

// One thread per (plane, row): sums along the row over [x - before, x + after], f applied first.
template <typename T, typename F>
void row_sums_impl(device const T* input, device float* sums, long width, long lines, long before, long after,
                   uint index) {
  if (long(index) >= lines) {
    return;
  }
  const long start = long(index) * width;
  BlockWalk<RowIntoSums<T, F>> window(RowIntoSums<T, F>{input + start, sums + start, width, before}, before, after);
  for (long x = 0; x < width; ++x) {
    sums[start + x] = window.next();
  }
}

template <typename T>
kernel void row_sums_of_squares(device const T* input [[buffer(0)]], device float* sums [[buffer(1)]],
                                constant long& width [[buffer(2)]], constant long& lines [[buffer(3)]],
                                constant long& before [[buffer(4)]], constant long& after [[buffer(5)]],
                                uint index [[thread_position_in_grid]]) {
  row_sums_impl<T, Square>(input, sums, width, lines, before, after, index);
}

kernel void row_sums(device const float* input [[buffer(0)]], device float* sums [[buffer(1)]],
                     constant long& width [[buffer(2)]], constant long& lines [[buffer(3)]],
                     constant long& before [[buffer(4)]], constant long& after [[buffer(5)]],
                     uint index [[thread_position_in_grid]]) {
  row_sums_impl<float, AsFloat>(input, sums, width, lines, before, after, index);
}

// Where a (plane, column) thread starts: the offset of its column's first element.
inline long column_start(uint index, long width, long height) {
  const long plane = long(index) / width;
  return plane * height * width + long(index) % width;
}

// One thread per (plane, column): Y = X * (delta + scale * window sum)^-beta.
template <typename T>
kernel void forward_from_row_sums(device const T* input [[buffer(0)]], device float* row_sums [[buffer(1)]],
                                  device T* output [[buffer(2)]], constant long& width [[buffer(3)]],
                                  constant long& height [[buffer(4)]], constant long& columns [[buffer(5)]],
                                  constant long& before [[buffer(6)]], constant long& after [[buffer(7)]],
                                  constant float& scale [[buffer(8)]], constant float& delta [[buffer(9)]],
                                  constant float& neg_beta [[buffer(10)]], uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  BlockWalk<ScratchColumn> window(ScratchColumn{row_sums + start, height, width}, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    const float t = denominator(window.next(), scale, delta);
    output[i] = static_cast<T>(times_power(static_cast<float>(input[i]), t, neg_beta));
  }
}

// One thread per (plane, column): dY * T^-beta and G = dY * X * T^(-beta-1), each taken as one
// product with its power (T^-beta alone can overflow where dY * T^-beta is finite).
template <typename T>
kernel void gradient_terms(device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],
                           device float* row_sums [[buffer(2)]], device float* scaled_gradient [[buffer(3)]],
                           device float* terms [[buffer(4)]], constant long& width [[buffer(5)]],
                           constant long& height [[buffer(6)]], constant long& columns [[buffer(7)]],
                           constant long& before [[buffer(8)]], constant long& after [[buffer(9)]],
                           constant float& scale [[buffer(10)]], constant float& delta [[buffer(11)]],
                           constant float& neg_beta [[buffer(12)]], constant float& g_exponent [[buffer(13)]],
                           uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  BlockWalk<ScratchColumn> window(ScratchColumn{row_sums + start, height, width}, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    const float t = denominator(window.next(), scale, delta);
    const float dy = static_cast<float>(grad_output[i]);
    scaled_gradient[i] = times_power(dy, t, neg_beta);
    terms[i] = times_power(dy * static_cast<float>(input[i]), t, g_exponent);
  }
}

// One thread per (plane, column): dX = dY * T^-beta - gradient_scale * X * (mirrored window sum
// of G); with alpha or beta 0 (gradient_scale 0) the second term is absent, whatever G holds.
template <typename T>
kernel void gradient_from_row_sums(device const T* input [[buffer(0)]], device const float* scaled_gradient [[buffer(1)]],
                                   device float* term_row_sums [[buffer(2)]], device T* grad_input [[buffer(3)]],
                                   constant long& width [[buffer(4)]], constant long& height [[buffer(5)]],
                                   constant long& columns [[buffer(6)]], constant long& before [[buffer(7)]],
                                   constant long& after [[buffer(8)]], constant float& gradient_scale [[buffer(9)]],
                                   uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  BlockWalk<ScratchColumn> window(ScratchColumn{term_row_sums + start, height, width}, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    const float neighbours = window.next();
    grad_input[i] = static_cast<T>(gradient_scale == 0.0f ? scaled_gradient[i]
                                                          : scaled_gradient[i] - gradient_scale *
                                                                static_cast<float>(input[i]) * neighbours);
  }
}

#define INSTANTIATE_FOR(T)                                                                                          \
  template [[host_name("forward_tiled_" #T)]] kernel void forward_tiled<T>(                                         \
      device const T* input [[buffer(0)]], device T* output [[buffer(1)]], constant Sweep& sweep [[buffer(2)]],     \
      constant float& scale [[buffer(3)]], constant float& delta [[buffer(4)]], constant float& neg_beta [[buffer(5)]], \
      uint2 group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_threadgroup]],                     \
      uint simd_lane [[thread_index_in_simdgroup]], uint simdgroup [[simdgroup_index_in_threadgroup]]);            \
  template [[host_name("gradient_tiled_" #T)]] kernel void gradient_tiled<T>(                                       \
      device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]], device T* grad_input [[buffer(2)]], \
      constant Sweep& sweep [[buffer(3)]], constant float& scale [[buffer(4)]], constant float& delta [[buffer(5)]], \
      constant float& neg_beta [[buffer(6)]], constant float& g_exponent [[buffer(7)]],                            \
      constant float& gradient_scale [[buffer(8)]], uint2 group [[threadgroup_position_in_grid]],                  \
      uint lane [[thread_index_in_threadgroup]], uint simd_lane [[thread_index_in_simdgroup]],                     \
      uint simdgroup [[simdgroup_index_in_threadgroup]]);                                                           \
  template [[host_name("row_sums_of_squares_" #T)]] kernel void row_sums_of_squares<T>(                             \
      device const T* input [[buffer(0)]], device float* sums [[buffer(1)]], constant long& width [[buffer(2)]],    \
      constant long& lines [[buffer(3)]], constant long& before [[buffer(4)]], constant long& after [[buffer(5)]], \
      uint index [[thread_position_in_grid]]);                                                                      \
  template [[host_name("forward_from_row_sums_" #T)]] kernel void forward_from_row_sums<T>(                         \
      device const T* input [[buffer(0)]], device float* row_sums [[buffer(1)]], device T* output [[buffer(2)]], \
      constant long& width [[buffer(3)]], constant long& height [[buffer(4)]], constant long& columns [[buffer(5)]], \
      constant long& before [[buffer(6)]], constant long& after [[buffer(7)]], constant float& scale [[buffer(8)]], \
      constant float& delta [[buffer(9)]], constant float& neg_beta [[buffer(10)]],                                \
      uint index [[thread_position_in_grid]]);                                                                      \
  template [[host_name("gradient_terms_" #T)]] kernel void gradient_terms<T>(                                       \
      device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],                              \
      device float* row_sums [[buffer(2)]], device float* scaled_gradient [[buffer(3)]],                     \
      device float* terms [[buffer(4)]], constant long& width [[buffer(5)]], constant long& height [[buffer(6)]],  \
      constant long& columns [[buffer(7)]], constant long& before [[buffer(8)]], constant long& after [[buffer(9)]], \
      constant float& scale [[buffer(10)]], constant float& delta [[buffer(11)]], constant float& neg_beta [[buffer(12)]], \
      constant float& g_exponent [[buffer(13)]], uint index [[thread_position_in_grid]]);                          \
  template [[host_name("gradient_from_row_sums_" #T)]] kernel void gradient_from_row_sums<T>(                       \
      device const T* input [[buffer(0)]], device const float* scaled_gradient [[buffer(1)]],                      \
      device float* term_row_sums [[buffer(2)]], device T* grad_input [[buffer(3)]],                         \
      constant long& width [[buffer(4)]], constant long& height [[buffer(5)]], constant long& columns [[buffer(6)]], \
      constant long& before [[buffer(7)]], constant long& after [[buffer(8)]],                                     \
      constant float& gradient_scale [[buffer(9)]], uint index [[thread_position_in_grid]]);

INSTANTIATE_FOR(float)
INSTANTIATE_FOR(half)
#if __METAL_VERSION__ >= 310  // bfloat arrived with MSL 3.1 (macOS 14)
INSTANTIATE_FOR(bfloat)
#endif
