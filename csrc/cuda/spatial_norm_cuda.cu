// CUDA kernels of spatialnorm::forward and spatialnorm::backward.
//
// A block owns a strip of image columns (one thread per column, the window's halo included) over
// a band of rows, and streams down the band: each thread keeps the running vertical window sum
// of its column, and every row's horizontal window sums come from a prefix sum across the block.
// Both are O(1) per element whatever the kernel size, and each pass reads its inputs and writes
// its output once, apart from the halos. The gradient is one fused kernel: G = dY*X*T^(-beta-1)
// and T^-beta of the rows still inside the mirrored window wait in shared-memory rings.
// Narrow windows use warp kernels instead: a warp per strip, shuffles across it, no barriers.
// Kernels too large for a strip run a composite of ATen ops.
#include "../spatial_norm.h"
#include "block_window.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/constant_pad_nd.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace spatialnorm::cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMinBandRows = 64;
// Rows each block advances per round of barriers: independent loads and shuffles overlap.
constexpr int kRowsPerStep = 4;

// Rows per band: enough that re-reading the first window's rows costs little.
int64_t band_rows_for(const PlaneShape& shape, int64_t kernel_height) {
  return std::min<int64_t>(shape.height, std::max<int64_t>(kMinBandRows, 4 * kernel_height));
}

// How a call is cut into blocks: strips of columns times bands of rows times planes.
struct Launch {
  int threads;        // one per column of a strip, halo included; a multiple of 32
  int halo;           // columns of a strip that only feed other columns' windows
  int64_t strips;
  int64_t bands;
  int64_t band_rows;
  size_t shared_bytes;

  int64_t blocks(int64_t planes) const { return planes * strips * bands; }
};

// Strips of `halo` extra columns each; threads == 0 where the halo or the rings don't fit a block.
Launch plan(const PlaneShape& shape, int64_t halo, int64_t kernel_height, size_t ring_bytes_per_row) {
  Launch launch{};
  if (halo > kMaxThreads / 2) {
    return launch;
  }
  const int64_t columns = std::min<int64_t>(shape.width, kMaxThreads - halo);
  launch.threads = static_cast<int>((columns + halo + 31) / 32 * 32);
  launch.halo = static_cast<int>(halo);
  launch.strips = (shape.width + (launch.threads - halo) - 1) / (launch.threads - halo);
  launch.band_rows = band_rows_for(shape, kernel_height);
  launch.bands = (shape.height + launch.band_rows - 1) / launch.band_rows;
  launch.shared_bytes = window_scratch_doubles(launch.threads, kRowsPerStep) * sizeof(double) +
                        ring_bytes_per_row * (kernel_height + kRowsPerStep) * launch.threads;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (launch.shared_bytes > static_cast<size_t>(max_shared)) {
    launch.threads = 0;
  }
  return launch;
}

// The warp kernels' cut: strips of 32 columns whose outer `halo` columns only feed others' windows.
struct WarpLaunch {
  int64_t strips;
  int64_t bands;
  int64_t band_rows;
  int64_t blocks;
  size_t shared_bytes;
};

// Block index -> (plane, band, strip).
struct BlockPosition {
  int64_t plane;
  int64_t band;
  int64_t strip;
};

__device__ inline BlockPosition block_position(int64_t strips, int64_t bands) {
  int64_t index = blockIdx.x;
  const int64_t strip = index % strips;
  index /= strips;
  return {index / bands, index % bands, strip};
}

template <typename opmath_t>
struct Coefficients {
  opmath_t scale;          // alpha / (kw * kh)
  opmath_t delta;
  opmath_t neg_beta;
  opmath_t gradient_scale;  // 2 * alpha * beta / (kw * kh)
};

// Extents of the forward window W; the gradient's M is its mirror image.
struct Extents {
  int left, right, top, bottom;
};

template <typename scalar_t>
__device__ inline at::opmath_type<scalar_t> squared(scalar_t v) {
  const at::opmath_type<scalar_t> x = static_cast<at::opmath_type<scalar_t>>(v);
  return x * x;
}

// T^-beta and T^(-beta-1). In float32 as exp2(e * log2(T)): powf's extra-precise algorithm costs
// several times more than the whole rest of a kernel, while rounding e * log2(T) to float loses
// only |e * log2(T)| * 2^-24 of relative accuracy. float64 uses pow.
struct Powers {
  float power;           // T^-beta
  float power_over_t;    // T^(-beta-1)
};

__device__ inline Powers negative_powers(float t, float neg_beta) {
  if (neg_beta == 0.0f) {
    return {1.0f, 1.0f / t};  // pow(x, 0) == 1 even for infinite or NaN x
  }
  const float lg = log2f(t);
  return {exp2f(neg_beta * lg), exp2f((neg_beta - 1.0f) * lg)};
}

struct DoublePowers {
  double power;
  double power_over_t;
};

__device__ inline DoublePowers negative_powers(double t, double neg_beta) {
  const double power = ::pow(t, neg_beta);
  return {power, power / t};
}

// One thread's column: a strip of `lanes` columns, of which the outer `before` and `after` only
// feed other columns' windows, and a band of rows.
struct Column {
  int64_t index;  // in the image
  bool in_image;
  bool writes;  // an output column of the strip
  int64_t row_begin;
  int64_t row_end;

  __device__ Column(const BlockPosition& at, int lanes, int lane, int before, int after, int64_t height,
                    int64_t width, int64_t band_rows)
      : index(at.strip * (lanes - before - after) - before + lane),
        in_image(index >= 0 && index < width),
        writes(in_image && lane >= before && lane < lanes - after),
        row_begin(at.band * band_rows),
        row_end(min(height, at.band * band_rows + band_rows)) {}
};

// The running sum of X^2 over the window of row `row` - 1, so that each row from `row` on adds
// one row and drops one.
template <typename scalar_t>
__device__ inline RunningSum<at::opmath_type<scalar_t>> window_above(const scalar_t* x, int64_t row, Extents w,
                                                                     int64_t height, int64_t width,
                                                                     const Column& column) {
  RunningSum<at::opmath_type<scalar_t>> sum;
  if (column.in_image) {
    for (int64_t r = max(int64_t{0}, row - w.top - 1); r <= min(height - 1, row + w.bottom - 1); ++r) {
      sum.add(squared(x[r * width + column.index]), 1);
    }
  }
  return sum;
}

// What a column's running window sum needs for rows row0 .. row0 + kRowsPerStep - 1: the
// squares of the rows entering and leaving the window (0 outside the image or the rows asked
// for). Loaded in one go so that the loads' latencies overlap.
template <typename opmath_t>
struct SlidingRows {
  opmath_t entering[kRowsPerStep];
  opmath_t leaving[kRowsPerStep];

  template <typename scalar_t>
  __device__ void load(const scalar_t* x, int64_t row0, int64_t row_end, bool active, int top, int bottom,
                       int64_t height, int64_t width, int64_t column) {
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      const int64_t row = row0 + j;
      const bool wanted = active && row < row_end;
      const int64_t in = row + bottom;
      const int64_t out = row - top - 1;
      entering[j] = wanted && in < height ? squared(x[in * width + column]) : opmath_t(0);
      leaving[j] = wanted && out >= 0 ? squared(x[out * width + column]) : opmath_t(0);
    }
  }

  __device__ void slide(RunningSum<opmath_t>& sum, int j) const {
    sum.add(entering[j], 1);
    sum.add(leaving[j], -1);
  }
};

// Rows row0 .. row0 + kRowsPerStep - 1 of one column of a tensor, where `active` (else 0).
template <typename scalar_t, typename opmath_t>
struct ColumnRows {
  opmath_t values[kRowsPerStep];

  __device__ void load(const scalar_t* data, int64_t row0, int64_t row_end, bool active, int64_t width,
                       int64_t column) {
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      const int64_t row = row0 + j;
      values[j] = active && row >= 0 && row < row_end ? static_cast<opmath_t>(data[row * width + column]) : opmath_t(0);
    }
  }
};

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, int64_t height,
                               int64_t width, int64_t strips, int64_t bands, int64_t band_rows, Extents w,
                               Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ double scratch[];
  const BlockPosition block = block_position(strips, bands);
  const Column c(block, blockDim.x, threadIdx.x, w.left, w.right, height, width, band_rows);
  const int64_t column = c.index;
  const bool in_image = c.in_image;
  const bool writes = c.writes;
  const int64_t row_begin = c.row_begin;
  const int64_t row_end = c.row_end;
  const scalar_t* x = input + block.plane * height * width;
  scalar_t* y = output + block.plane * height * width;
  RunningSum<opmath_t> vertical = window_above(x, row_begin, w, height, width, c);
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kRowsPerStep) {
    SlidingRows<opmath_t> rows;
    rows.load(x, row0, row_end, in_image, w.top, w.bottom, height, width, column);
    ColumnRows<scalar_t, opmath_t> centre;
    centre.load(x, row0, row_end, writes, width, column);
    double sums[kRowsPerStep];
    bool finite = true;
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      rows.slide(vertical, j);
      sums[j] = vertical.value();
      finite &= vertical.finite();
    }
    window_across_block(sums, !__syncthreads_or(!finite), w.left, w.right, scratch);
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      const int64_t row = row0 + j;
      if (writes && row < row_end) {
        const opmath_t denominator = k.delta + k.scale * static_cast<opmath_t>(sums[j]);
        y[row * width + column] = static_cast<scalar_t>(centre.values[j] * negative_powers(denominator, k.neg_beta).power);
      }
    }
  }
}

// dX = dY*P - gradient_scale * X * (M-window sum of G), P = T^-beta, G = dY*X*P/T.
// Row r of G is made once its T is known, and output row r - (top extent of W) once the
// mirrored window around it is complete; G and P wait in rings of kh + kRowsPerStep rows, each
// thread touching only its own column of them.
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                scalar_t* __restrict__ grad_input, int64_t height, int64_t width, int64_t strips,
                                int64_t bands, int64_t band_rows, Extents w, Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ double scratch[];
  const int n = blockDim.x;
  const int window_rows = w.top + w.bottom + 1;
  const int ring_rows = window_rows + kRowsPerStep;
  opmath_t* g_ring = reinterpret_cast<opmath_t*>(scratch + window_scratch_doubles(n, kRowsPerStep));
  opmath_t* p_ring = g_ring + ring_rows * n;
  const BlockPosition block = block_position(strips, bands);
  const int t = threadIdx.x;
  const int halo = w.left + w.right;  // G needs W's halo, the output M's: the same width
  const Column c(block, n, t, halo, halo, height, width, band_rows);
  const int64_t column = c.index;
  const bool in_image = c.in_image;
  const bool makes_g = in_image && t >= w.left && t < n - w.right;
  const bool writes = c.writes;
  const int64_t row_begin = c.row_begin;
  const int64_t row_end = c.row_end;
  const int64_t offset = block.plane * height * width;
  const scalar_t* x = input + offset;
  const scalar_t* dy = grad_output + offset;
  scalar_t* dx = grad_input + offset;
  // M reaches w.bottom rows up and w.top rows down; rows past the image have G = 0.
  const int64_t g_begin = max(int64_t{0}, row_begin - w.bottom);
  const int64_t g_end = row_end + w.top;

  for (int i = 0; i < ring_rows; ++i) {
    g_ring[i * n + t] = 0;
  }
  RunningSum<opmath_t> squares = window_above(x, g_begin, w, height, width, c);
  RunningSum<opmath_t> terms;
  for (int64_t r0 = g_begin; r0 < g_end; r0 += kRowsPerStep) {
    // T, P and G of rows r0 .. r0 + kRowsPerStep - 1.
    SlidingRows<opmath_t> rows;
    rows.load(x, r0, height, in_image, w.top, w.bottom, height, width, column);
    ColumnRows<scalar_t, opmath_t> x_rows, dy_rows;
    x_rows.load(x, r0, height, makes_g, width, column);
    dy_rows.load(dy, r0, height, makes_g, width, column);
    double sums[kRowsPerStep];
    bool finite = true;
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      rows.slide(squares, j);
      sums[j] = squares.value();
      finite &= squares.finite();
    }
    window_across_block(sums, !__syncthreads_or(!finite), w.left, w.right, scratch);
    opmath_t g[kRowsPerStep];
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      const int64_t r = r0 + j;
      g[j] = 0;
      if (makes_g && r < height) {
        const auto powers = negative_powers(k.delta + k.scale * static_cast<opmath_t>(sums[j]), k.neg_beta);
        p_ring[static_cast<int>(r % ring_rows) * n + t] = powers.power;
        g[j] = dy_rows.values[j] * x_rows.values[j] * powers.power_over_t;
      }
    }
    // Slide the mirrored window down over them, and finish the rows whose window is complete.
    // (The ring holds kh + kRowsPerStep rows: storing this step's rows first overwrites none that
    // is still to leave the window.)
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      g_ring[static_cast<int>((r0 + j) % ring_rows) * n + t] = g[j];
    }
    finite = true;
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      const int64_t r = r0 + j;
      if (r < g_end) {
        // Row r - kh leaves the window; its slot is (r - kh) mod ring_rows.
        terms.add(g_ring[static_cast<int>((r + kRowsPerStep) % ring_rows) * n + t], -1);
        terms.add(g[j], 1);
      }
      sums[j] = terms.value();
      finite &= terms.finite();
    }
    const int64_t out0 = r0 - w.top;
    const bool outputs = writes && out0 + kRowsPerStep > row_begin;
    x_rows.load(x, out0, row_end, outputs, width, column);
    dy_rows.load(dy, out0, row_end, outputs, width, column);
    window_across_block(sums, !__syncthreads_or(!finite), w.right, w.left, scratch);
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      const int64_t row = out0 + j;
      if (writes && row >= row_begin && row < row_end) {
        const opmath_t power = p_ring[static_cast<int>(row % ring_rows) * n + t];
        dx[row * width + column] = static_cast<scalar_t>(dy_rows.values[j] * power -
                                                         k.gradient_scale * x_rows.values[j] * static_cast<opmath_t>(sums[j]));
      }
    }
  }
}

// The warp kernels: each warp owns 32 columns (the window's halo included) of one band of rows
// and needs no barrier; horizontal sums are shuffles. For windows up to kMaxWarpKernelWidth wide.
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxWarpForwardWidth = 17;
constexpr int kMaxWarpBackwardWidth = 9;

WarpLaunch warp_plan(const PlaneShape& shape, int64_t halo, int64_t kernel_height, size_t ring_bytes_per_row) {
  WarpLaunch launch{};
  launch.strips = (shape.width + (32 - halo) - 1) / (32 - halo);
  launch.band_rows = band_rows_for(shape, kernel_height);
  launch.bands = (shape.height + launch.band_rows - 1) / launch.band_rows;
  launch.blocks = (shape.planes * launch.strips * launch.bands + kWarpsPerBlock - 1) / kWarpsPerBlock;
  launch.shared_bytes = ring_bytes_per_row * kernel_height * 32 * kWarpsPerBlock;
  return launch;
}

// Warp index -> (plane, band, strip), or false past the last one.
__device__ inline bool warp_position(int64_t strips, int64_t bands, int64_t planes, BlockPosition& position) {
  int64_t index = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;
  position.strip = index % strips;
  index /= strips;
  position.band = index % bands;
  position.plane = index / bands;
  return position.plane < planes;
}

template <typename scalar_t>
__global__ void forward_warp_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, int64_t planes,
                                    int64_t height, int64_t width, int64_t strips, int64_t bands, int64_t band_rows,
                                    Extents w, Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  BlockPosition at;
  if (!warp_position(strips, bands, planes, at)) {
    return;  // the whole warp: shuffles below stay among full warps
  }
  const Column c(at, 32, threadIdx.x & 31, w.left, w.right, height, width, band_rows);
  const int64_t column = c.index;
  const bool in_image = c.in_image;
  const bool writes = c.writes;
  const int64_t row_begin = c.row_begin;
  const int64_t row_end = c.row_end;
  const scalar_t* x = input + at.plane * height * width;
  scalar_t* y = output + at.plane * height * width;
  RunningSum<opmath_t> vertical = window_above(x, row_begin, w, height, width, c);
  // Walk pointers down the column rather than recomputing 64-bit offsets every row.
  const scalar_t* entering = x + (row_begin + w.bottom) * width + column;
  const scalar_t* leaving = x + (row_begin - w.top - 1) * width + column;
  const scalar_t* centre = x + row_begin * width + column;
  scalar_t* out = y + row_begin * width + column;
  for (int64_t row = row_begin; row < row_end; ++row) {
    if (in_image) {
      vertical.add(row + w.bottom < height ? squared(*entering) : opmath_t(0), 1);
      vertical.add(row - w.top - 1 >= 0 ? squared(*leaving) : opmath_t(0), -1);
    }
    const opmath_t sum = window_across_warp(vertical.value(), w.left, w.right);
    if (writes) {
      *out = static_cast<scalar_t>(static_cast<opmath_t>(*centre) * negative_powers(k.delta + k.scale * sum, k.neg_beta).power);
    }
    entering += width;
    leaving += width;
    centre += width;
    out += width;
  }
}

template <typename scalar_t>
__global__ void backward_warp_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                     scalar_t* __restrict__ grad_input, int64_t planes, int64_t height, int64_t width,
                                     int64_t strips, int64_t bands, int64_t band_rows, Extents w,
                                     Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ double scratch[];
  const int window_rows = w.top + w.bottom + 1;
  // This warp's rings of G and T^-beta, kh rows of 32 lanes; each lane uses its own column only.
  opmath_t* g_ring = reinterpret_cast<opmath_t*>(scratch) + (threadIdx.x / 32) * 2 * window_rows * 32;
  opmath_t* p_ring = g_ring + window_rows * 32;
  BlockPosition at;
  if (!warp_position(strips, bands, planes, at)) {
    return;
  }
  const int lane = threadIdx.x & 31;
  const int halo = w.left + w.right;
  const Column c(at, 32, lane, halo, halo, height, width, band_rows);
  const int64_t column = c.index;
  const bool in_image = c.in_image;
  const bool makes_g = in_image && lane >= w.left && lane < 32 - w.right;
  const bool writes = c.writes;
  const int64_t row_begin = c.row_begin;
  const int64_t row_end = c.row_end;
  const int64_t offset = at.plane * height * width;
  const scalar_t* x = input + offset;
  const scalar_t* dy = grad_output + offset;
  scalar_t* dx = grad_input + offset;
  const int64_t g_begin = max(int64_t{0}, row_begin - w.bottom);
  const int64_t g_end = row_end + w.top;

  for (int i = 0; i < window_rows; ++i) {
    g_ring[i * 32 + lane] = 0;
  }
  RunningSum<opmath_t> squares = window_above(x, g_begin, w, height, width, c);
  RunningSum<opmath_t> terms;
  for (int64_t r0 = g_begin; r0 < g_end; r0 += kRowsPerStep) {
    SlidingRows<opmath_t> rows;
    rows.load(x, r0, height, in_image, w.top, w.bottom, height, width, column);
    ColumnRows<scalar_t, opmath_t> x_rows, dy_rows, x_out, dy_out;
    x_rows.load(x, r0, height, makes_g, width, column);
    dy_rows.load(dy, r0, height, makes_g, width, column);
    const int64_t out0 = r0 - w.top;  // the output rows whose mirrored windows this step completes
    const bool outputs = writes && out0 + kRowsPerStep > row_begin;
    x_out.load(x, out0, row_end, outputs, width, column);
    dy_out.load(dy, out0, row_end, outputs, width, column);
#pragma unroll
    for (int j = 0; j < kRowsPerStep; ++j) {
      const int64_t r = r0 + j;
      if (r >= g_end) {
        break;
      }
      opmath_t g = 0;
      opmath_t power = 0;
      if (r < height) {
        rows.slide(squares, j);
        const opmath_t sum = window_across_warp(squares.value(), w.left, w.right);
        if (makes_g) {
          const auto powers = negative_powers(k.delta + k.scale * sum, k.neg_beta);
          power = powers.power;
          g = dy_rows.values[j] * x_rows.values[j] * powers.power_over_t;
        }
      }
      const int slot = static_cast<int>(r % window_rows) * 32 + lane;
      terms.add(g_ring[slot], -1);  // G of row r - kh leaves the window
      terms.add(g, 1);
      g_ring[slot] = g;
      p_ring[slot] = power;
      const int64_t row = out0 + j;
      if (row >= row_begin) {
        const opmath_t sum = window_across_warp(terms.value(), w.right, w.left);
        if (writes) {
          const opmath_t p = p_ring[static_cast<int>(row % window_rows) * 32 + lane];
          dx[row * width + column] = static_cast<scalar_t>(dy_out.values[j] * p - k.gradient_scale * x_out.values[j] * sum);
        }
      }
    }
  }
}

// The composite used where a window is too wide for a strip: window sums by zero padding and
// sum pooling, in the compute type.
at::Tensor window_sum(const at::Tensor& values, const Settings& s, bool mirrored) {
  WindowExtent cols = forward_extent(s.kernel_width);
  WindowExtent rows = forward_extent(s.kernel_height);
  if (mirrored) {
    cols = spatialnorm::mirrored(cols);
    rows = spatialnorm::mirrored(rows);
  }
  const at::Tensor padded = at::constant_pad_nd(values, {cols.before, cols.after, rows.before, rows.after}, 0);
  return at::avg_pool2d(padded, {s.kernel_height, s.kernel_width}, {1, 1}, {0, 0}, false, true, 1);
}

at::Tensor composite_denominator(const at::Tensor& x, const Settings& s) {
  return window_sum(x * x, s, false) * (s.alpha / s.window_size()) + s.delta;
}

at::Tensor composite_forward(const at::Tensor& input, const Settings& s) {
  const at::Tensor x = input.to(at::toOpMathType(input.scalar_type()));
  return (x * composite_denominator(x, s).pow(-s.beta)).to(input.scalar_type());
}

at::Tensor composite_backward(const at::Tensor& grad_output, const at::Tensor& input, const Settings& s) {
  const auto opmath = at::toOpMathType(input.scalar_type());
  const at::Tensor x = input.to(opmath);
  const at::Tensor dy = grad_output.to(opmath);
  const at::Tensor t = composite_denominator(x, s);
  const at::Tensor power = t.pow(-s.beta);
  const at::Tensor neighbours = window_sum(dy * x * power / t, s, true);
  const double gradient_scale = 2.0 * s.alpha * s.beta / s.window_size();
  return (dy * power - x * neighbours * gradient_scale).to(input.scalar_type());
}

template <typename opmath_t>
Coefficients<opmath_t> coefficients(const Settings& s) {
  return {static_cast<opmath_t>(s.alpha / s.window_size()), static_cast<opmath_t>(s.delta),
          static_cast<opmath_t>(-s.beta), static_cast<opmath_t>(2.0 * s.alpha * s.beta / s.window_size())};
}

Extents extents(const Settings& s) {
  const WindowExtent cols = forward_extent(s.kernel_width);
  const WindowExtent rows = forward_extent(s.kernel_height);
  return {static_cast<int>(cols.before), static_cast<int>(cols.after), static_cast<int>(rows.before),
          static_cast<int>(rows.after)};
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

at::Tensor forward(const at::Tensor& input, int64_t kernel_width, int64_t kernel_height, double alpha, double beta,
                   double delta) {
  const Settings settings = checked_forward_arguments(input, kernel_width, kernel_height, alpha, beta, delta);
  const c10::cuda::CUDAGuard guard(input.device());
  const PlaneShape shape = plane_shape(input);
  OutputBuffer output(input);
  if (input.numel() == 0) {
    return output.finish();
  }
  const at::Tensor x = input.contiguous();
  if (kernel_width <= kMaxWarpForwardWidth) {
    const WarpLaunch launch = warp_plan(shape, kernel_width - 1, kernel_height, 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_forward_cuda", [&] {
      forward_warp_kernel<scalar_t><<<launch.blocks, 32 * kWarpsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), output.contiguous().mutable_data_ptr<scalar_t>(), shape.planes, shape.height,
          shape.width, launch.strips, launch.bands, launch.band_rows, extents(settings),
          coefficients<at::opmath_type<scalar_t>>(settings));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return output.finish();
  }
  const Launch launch = plan(shape, kernel_width - 1, kernel_height, 0);
  if (launch.threads == 0) {
    output.contiguous().copy_(composite_forward(input, settings));
    return output.finish();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_forward_cuda", [&] {
    auto kernel = forward_kernel<scalar_t>;
    allow_shared_memory(kernel, launch.shared_bytes);
    kernel<<<launch.blocks(shape.planes), launch.threads, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), output.contiguous().mutable_data_ptr<scalar_t>(), shape.height, shape.width,
        launch.strips, launch.bands, launch.band_rows, extents(settings),
        coefficients<at::opmath_type<scalar_t>>(settings));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output.finish();
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_width,
                    int64_t kernel_height, double alpha, double beta, double delta) {
  const Settings settings =
      checked_backward_arguments(grad_output, input, kernel_width, kernel_height, alpha, beta, delta);
  const c10::cuda::CUDAGuard guard(input.device());
  const PlaneShape shape = plane_shape(input);
  OutputBuffer grad_input(input);
  if (input.numel() == 0) {
    return grad_input.finish();
  }
  const size_t ring_bytes = 2 * at::elementSize(at::toOpMathType(input.scalar_type()));
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  if (kernel_width <= kMaxWarpBackwardWidth) {
    const WarpLaunch launch = warp_plan(shape, 2 * (kernel_width - 1), kernel_height, ring_bytes);
    if (launch.shared_bytes <= 48 * 1024) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_backward_cuda", [&] {
        backward_warp_kernel<scalar_t>
            <<<launch.blocks, 32 * kWarpsPerBlock, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
                dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                grad_input.contiguous().mutable_data_ptr<scalar_t>(), shape.planes, shape.height, shape.width,
                launch.strips, launch.bands, launch.band_rows, extents(settings),
                coefficients<at::opmath_type<scalar_t>>(settings));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      return grad_input.finish();
    }
  }
  const Launch launch = plan(shape, 2 * (kernel_width - 1), kernel_height, ring_bytes);
  if (launch.threads == 0) {
    grad_input.contiguous().copy_(composite_backward(grad_output, input, settings));
    return grad_input.finish();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_backward_cuda", [&] {
    auto kernel = backward_kernel<scalar_t>;
    allow_shared_memory(kernel, launch.shared_bytes);
    kernel<<<launch.blocks(shape.planes), launch.threads, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_input.contiguous().mutable_data_ptr<scalar_t>(),
        shape.height, shape.width, launch.strips, launch.bands, launch.band_rows, extents(settings),
        coefficients<at::opmath_type<scalar_t>>(settings));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(spatialnorm, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}

}  // namespace spatialnorm::cuda
