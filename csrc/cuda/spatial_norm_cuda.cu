// CUDA kernels of spatialnorm::forward and spatialnorm::backward.
//
// A block owns a tile of one image plane. It loads the tile and the halo its windows reach in
// groups of 16 bytes (8 values of 16 bits, 4 of float), squares them once into shared memory in
// the compute type, takes window sums along the region's rows (sums that never subtract, about
// two terms read per output up to 9 wide), then down the tile's columns four columns (a group of
// float32) at a time; that pass evaluates T^-beta once per element and writes the tile's output,
// reading X again through the caches. Each kernel reads its inputs from memory and writes its
// output once, apart from the halos (mostly served by L2). The gradient is one kernel too: it
// makes G = dY*X*T^(-beta-1) over the tile and the mirrored window's halo, and P = dY*T^-beta over
// the tile, then sums G over the mirrored windows of the tile. Windows whose halo would not fit
// shared memory beside a tile, and the gradient's from 40 wide that no strip takes, take
// separable passes over whole lines instead (line_passes.cuh), whose cost does not grow with the
// window. The forward of square windows up to 17x17 and the gradient of those up to 9x9, over rows
// of whole, aligned groups of four values, keep each thread's sums to itself instead
// (register_forward.cu, register_backward.cu): a warp walks down a band of rows, with no barrier.
// The forward of windows from 32 rows or columns on, and their gradient from 31 (32 in 16-bit
// types) to 64, walk a block down a strip of a plane, reading each row once (strip_forward.cu,
// strip_backward.cu).
#include "../spatial_norm.h"
#include "coefficients.cuh"
#include "line_passes.cuh"
#include "powers.cuh"
#include "register_kernels.h"
#include "shared_tile.cuh"
#include "strip_kernels.h"
#include "tiles.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

namespace spatialnorm::cuda {
namespace {

// Threads per block: 256, or kMaxThreads where shared memory admits fewer than three blocks per
// multiprocessor (keeping 24 warps or more in flight to hide the loads' latency). The kernels'
// launch bounds cap registers at 64 per thread, so that registers admit 32 warps per
// multiprocessor.
constexpr int kThreads = 256;
constexpr int kMaxThreads = 512;

template <typename scalar_t>
struct Square {
  __device__ at::opmath_type<scalar_t> operator()(scalar_t v) const {
    const auto x = static_cast<at::opmath_type<scalar_t>>(v);
    return x * x;
  }
};

struct Identity {
  template <typename T>
  __device__ T operator()(T v) const {
    return v;
  }
};

template <int kSize, typename scalar_t>
__device__ inline void store_group(scalar_t* __restrict__ p, const Lanes<scalar_t, kSize>& group) {
  *reinterpret_cast<Lanes<scalar_t, kSize>*>(p) = group;
}

// The columns a thread carries through a pass down the columns: a group, at most four (16 bytes of
// float32 sums; a group of eight 16-bit values would take twice the registers and shares its
// passes out among half as many threads).
__host__ __device__ constexpr int unit_columns(int group) { return group < 4 ? group : 4; }

// The forward: the squares of the input region (the tile and W's halo, in groups) and their
// window sums along the rows.
template <typename opmath_t>
struct ForwardArrays {
  SharedArray<opmath_t> squares;
  SharedArray<opmath_t> row_sums;

  __host__ __device__ ForwardArrays(SharedLayout& layout, int rows, int columns, Extents w, int group)
      : squares(layout.take<opmath_t>(rows + w.height() - 1, grouped_columns(columns + w.width() - 1, group))),
        row_sums(layout.take<opmath_t>(rows + w.height() - 1, columns)) {}
};

// The forward's passes, set up for the launch's largest tile.
struct ForwardPasses {
  RegionLoad x;        // loading the input region's squares
  RowPass rows;        // window sums along the region's rows
  ColumnPass columns;  // then down the tile's columns, writing the output

  ForwardPasses(const TileGrid& grid, Extents w, int group, int threads)
      : x(grid.tile_columns + w.width() - 1, group, threads),
        rows(grid.tile_rows + w.height() - 1, grid.tile_columns, threads),
        columns(grid.tile_columns / unit_columns(group), grid.tile_rows, threads) {}
};

template <typename scalar_t, int kGroup>
__global__ void __launch_bounds__(kMaxThreads, 2)
    forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, TileGrid grid,
                   ForwardPasses passes, Extents w, Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnit = unit_columns(kGroup);
  extern __shared__ __align__(16) unsigned char shared[];
  SharedLayout layout(shared);
  const ForwardArrays<opmath_t> a(layout, grid.tile_rows, grid.tile_columns, w, kGroup);
  const Tile tile = grid.locate();
  const int64_t offset = tile.plane * grid.height * int64_t{grid.width};
  const Region region = in_groups(reach(tile.region(), w), kGroup);
  load_region<kGroup>(input + offset, grid.height, grid.width, region, passes.x,
                      [&](int r, int c, const Lanes<opmath_t, kGroup>& x) { store_squares(a.squares, r, c, x); });
  __syncthreads();

  const int first_column = tile.col0 - w.left - region.col0;  // of the first window
  slide_rows(passes.rows, a.squares, first_column, region.rows, tile.columns, w.width(),
             [&](int r, int c, opmath_t sum) { a.row_sums(r, c) = sum; });
  __syncthreads();
  const PlaneOffsets plane(offset, tile.region(), grid.height, grid.width);
  const scalar_t* tile_x = input + plane.first;
  scalar_t* tile_y = output + plane.first;
  const auto write_output = [&](auto powers) {
    slide_columns<kUnit>(passes.columns, a.row_sums, tile.columns / kUnit, tile.rows, w.height(),
                         [&](int unit, int r, const Lanes<opmath_t, kUnit>& sums) {
                           const int at = plane.at(r, unit * kUnit);
                           const auto x = load_widened<scalar_t, kUnit>(tile_x + at);
                           Lanes<scalar_t, kUnit> y;
#pragma unroll
                           for (int e = 0; e < kUnit; ++e) {
                             y.v[e] = static_cast<scalar_t>(powers(x.v[e], denominator(k, sums.v[e]), k.neg_beta));
                           }
                           store_group(tile_y + at, y);
                         });
    return powers.missed;
  };
  if (__syncthreads_or(write_output(FastPowers()))) {
    write_output(ExactPowers());
  }
}

// The gradient. Relative to the tile, G is needed over M's halo, and T there over W's halo beyond
// that: the input region reaches kh - 1 rows and kw - 1 columns out on each side.

// The most columns of G's region (M's halo around a tile, in groups).
inline __host__ __device__ int g_columns(int tile_columns, Extents w, int group) {
  return grouped_columns(tile_columns + w.width() - 1, group);
}

template <typename opmath_t>
struct BackwardArrays {
  SharedArray<opmath_t> squares;   // of the input region; then G over its region, 0 outside the plane
  SharedArray<opmath_t> row_sums;  // window sums along the rows: of X^2 over the input region, then of G
  SharedArray<opmath_t> p;         // dY * T^-beta over the tile

  __host__ __device__ BackwardArrays(SharedLayout& layout, int rows, int columns, Extents w, int group)
      : squares(layout.take<opmath_t>(rows + 2 * (w.height() - 1),
                                      grouped_columns(g_columns(columns, w, group) + w.width() - 1, group))),
        row_sums(layout.take<opmath_t>(rows + 2 * (w.height() - 1), g_columns(columns, w, group))),
        p(layout.take<opmath_t>(rows, columns)) {}

  __device__ SharedArray<opmath_t> g() const { return squares; }
};

// The gradient's passes, set up for the launch's largest tile.
struct BackwardPasses {
  RegionLoad x;            // loading X^2
  RowPass x_rows;          // window sums of X^2 along the rows
  ColumnPass t_columns;    // then down the columns, making T, P and G
  RowPass g_rows;          // window sums of G along the rows
  ColumnPass tile_columns;  // then down the tile's columns, writing dX

  BackwardPasses(const TileGrid& grid, Extents w, int group, int threads)
      : x(g_columns(grid.tile_columns, w, group) + w.width() - 1, group, threads),
        x_rows(grid.tile_rows + 2 * (w.height() - 1), g_columns(grid.tile_columns, w, group), threads),
        t_columns(g_columns(grid.tile_columns, w, group) / unit_columns(group), grid.tile_rows + w.height() - 1,
                  threads),
        g_rows(grid.tile_rows + w.height() - 1, grid.tile_columns, threads),
        tile_columns(grid.tile_columns / unit_columns(group), grid.tile_rows, threads) {}
};

// dX = dY*P - gradient_scale * X * (M-window sum of G), P = T^-beta, G = dY*X*T^(-beta-1).
template <typename scalar_t, int kGroup>
__global__ void __launch_bounds__(kMaxThreads, 2)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                    scalar_t* __restrict__ grad_input, TileGrid grid, BackwardPasses passes, Extents w,
                    Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnit = unit_columns(kGroup);
  using Unit = Lanes<opmath_t, kUnit>;
  extern __shared__ __align__(16) unsigned char shared[];
  SharedLayout layout(shared);
  const BackwardArrays<opmath_t> a(layout, grid.tile_rows, grid.tile_columns, w, kGroup);
  const Tile tile = grid.locate();
  const int64_t offset = tile.plane * grid.height * int64_t{grid.width};
  const Region g_region = in_groups(reach(tile.region(), w.mirrored()), kGroup);
  const Region x_region = in_groups(reach(g_region, w), kGroup);
  load_region<kGroup>(input + offset, grid.height, grid.width, x_region, passes.x,
                      [&](int r, int c, const Lanes<opmath_t, kGroup>& x) { store_squares(a.squares, r, c, x); });
  __syncthreads();

  slide_rows(passes.x_rows, a.squares, g_region.col0 - w.left - x_region.col0, x_region.rows,
             g_region.columns, w.width(), [&](int r, int c, opmath_t sum) { a.row_sums(r, c) = sum; });
  __syncthreads();
  // G exists in the plane only: beyond it the sum over M takes G as 0, whatever T is there.
  const PlaneOffsets g_plane(offset, g_region, grid.height, grid.width);
  const scalar_t* g_dy = grad_output + g_plane.first;
  const scalar_t* g_x = input + g_plane.first;
  const int tile_top = tile.row0 - g_region.row0;
  const int tile_left = tile.col0 - g_region.col0;
  const auto make_g = [&](auto powers) {
    slide_columns<kUnit>(
        passes.t_columns, a.row_sums, g_region.columns / kUnit, g_region.rows, w.height(),
        [&](int unit, int r, const Unit& sums) {
          const int c = unit * kUnit;
          Unit g = 0;
          if (g_plane.inside(r, c)) {
            const int at = g_plane.at(r, c);
            const auto dy = load_widened<scalar_t, kUnit>(g_dy + at);
            const auto x = load_widened<scalar_t, kUnit>(g_x + at);
            Unit p;
#pragma unroll
            for (int e = 0; e < kUnit; ++e) {
              const PowerBase<opmath_t> t = denominator(k, sums.v[e]);
              g.v[e] = powers(dy.v[e] * x.v[e], t, k.g_exponent);
              p.v[e] = powers(dy.v[e], t, k.neg_beta);
            }
            const int tr = r - tile_top, tc = c - tile_left;
            if (tr >= 0 && tr < tile.rows && tc >= 0 && tc < tile.columns) {
              a.p.template lanes<kUnit>(tr, tc) = p;
            }
          }
          a.g().template lanes<kUnit>(r, c) = g;
        });
    return powers.missed;
  };
  if (__syncthreads_or(make_g(FastPowers()))) {
    make_g(ExactPowers());
  }
  __syncthreads();

  slide_rows(passes.g_rows, a.g(), tile_left - w.right, g_region.rows, tile.columns, w.width(),
             [&](int r, int c, opmath_t sum) { a.row_sums(r, c) = sum; });
  __syncthreads();
  const PlaneOffsets plane(offset, tile.region(), grid.height, grid.width);
  const scalar_t* tile_x = input + plane.first;
  scalar_t* tile_dx = grad_input + plane.first;
  slide_columns<kUnit>(passes.tile_columns, a.row_sums, tile.columns / kUnit, tile.rows, w.height(),
                       [&](int unit, int r, const Unit& sums) {
                         const int c = unit * kUnit;
                         const int at = plane.at(r, c);
                         const auto x = load_widened<scalar_t, kUnit>(tile_x + at);
                         const Unit& p = a.p.template lanes<kUnit>(r, c);
                         Lanes<scalar_t, kUnit> dx;
#pragma unroll
                         for (int e = 0; e < kUnit; ++e) {
                           dx.v[e] = static_cast<scalar_t>(gradient_of_input(k, p.v[e], x.v[e], sums.v[e]));
                         }
                         store_group(tile_dx + at, dx);
                       });
}

// The line passes (line_passes.cuh), where a window is too wide for a tile or costs more there:
// what each element of a pass's output gets.

template <typename scalar_t>
struct ForwardOutput {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ y;
  Coefficients<opmath_t> k;

  __device__ void operator()(int64_t at, opmath_t sum) const {
    y[at] = static_cast<scalar_t>(times_power(static_cast<opmath_t>(x[at]), denominator(k, sum).t, k.neg_beta));
  }
};

// G = dY*X*T^(-beta-1) and P = dY*T^-beta.
template <typename scalar_t>
struct GradientTerms {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  opmath_t* __restrict__ g;
  opmath_t* __restrict__ p;
  Coefficients<opmath_t> k;

  __device__ void operator()(int64_t at, opmath_t sum) const {
    const opmath_t t = denominator(k, sum).t;
    const opmath_t d = static_cast<opmath_t>(dy[at]);
    g[at] = times_power(d * static_cast<opmath_t>(x[at]), t, k.g_exponent);
    p[at] = times_power(d, t, k.neg_beta);
  }
};

// dX from P and the M-window sum of G.
template <typename scalar_t>
struct GradientOutput {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const opmath_t* __restrict__ p;
  scalar_t* __restrict__ dx;
  Coefficients<opmath_t> k;

  __device__ void operator()(int64_t at, opmath_t sum) const {
    dx[at] = static_cast<scalar_t>(gradient_of_input(k, p[at], static_cast<opmath_t>(x[at]), sum));
  }
};

template <typename Passes>
struct Launch {
  TileGrid grid;
  Passes passes;
  size_t shared_bytes;
  int threads;
};

// The largest tile whose shared arrays (and the window's halo) let `preferred_blocks` blocks
// share a multiprocessor, else the largest that fits a block at all, or nothing. The forward
// prefers three blocks (bfloat16 at 31x31 on an H100: 185 us with 56x64 tiles, 205 us with two
// blocks of 56x128); the gradient takes the largest tile (at 31x31 its smaller tiles' halos cost
// more: 1.08 against 0.69 ms). Offsets within a tile's
// rows are 32-bit, as are block indices. Tiles are tall: the passes along the rows pay for the
// window's halo rows a second time in every tile, and its halo columns lie mostly outside the
// plane where planes are narrow. 16-bit values get tiles twice as wide, whose rows load as many
// bytes as float32's.
template <typename Arrays, typename Passes>
std::optional<Launch<Passes>> plan(const PlaneShape& shape, Extents w, int group, size_t preferred_blocks) {
  const SharedMemory& limits = shared_memory();
  const int wide = std::max(64, 16 * group);
  std::optional<Launch<Passes>> fitting;
  for (const auto& [rows, columns] : {std::pair{56, wide}, {56, 64}, {24, 64}, {16, 64}, {16, 32}}) {
    const int64_t blocks = shape.planes * ((shape.height + rows - 1) / rows) * ((shape.width + columns - 1) / columns);
    const int64_t region_rows = shape.height + rows + 2 * w.height();
    const int64_t region_columns = shape.width + columns + 2 * w.width() + 2 * group;
    constexpr int64_t kLimit = std::numeric_limits<int>::max();
    if (blocks > kLimit || region_rows > kLimit || region_columns > kLimit ||
        (rows + 2 * int64_t{w.height()}) * region_columns > kLimit) {
      continue;
    }
    const TileGrid grid = tile_grid(shape, rows, columns, group);
    SharedLayout layout(nullptr);
    Arrays(layout, grid.tile_rows, grid.tile_columns, w, group);
    if (layout.bytes() > static_cast<size_t>(limits.per_block)) {
      continue;
    }
    const size_t blocks_per_multiprocessor = limits.blocks_held(layout.bytes());
    const int threads = blocks_per_multiprocessor >= 3 ? kThreads : kMaxThreads;
    if (!fitting) {
      fitting = Launch<Passes>{grid, Passes(grid, w, group, threads), layout.bytes(), threads};
    }
    if (blocks_per_multiprocessor >= preferred_blocks) {
      return Launch<Passes>{grid, Passes(grid, w, group, threads), layout.bytes(), threads};
    }
  }
  return fitting;
}

template <typename Kernel, typename Passes, typename... Args>
void launch_kernel(Kernel kernel, const Launch<Passes>& planned, int64_t planes, Args... args) {
  launch(kernel, planned.grid.blocks(planes), planned.threads, planned.shared_bytes, args...);
}

template <typename opmath_t>
at::Tensor scratch_like(const at::Tensor& input, int64_t elements) {
  return at::empty({elements}, input.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
}

template <typename scalar_t, typename Value, typename Emit>
void window_sums_by_lines(const scalar_t* source, const at::Tensor& sums, const ScratchPlanes& scratch, Extents w,
                          Value value, Emit emit) {
  using opmath_t = at::opmath_type<scalar_t>;
  const size_t limit = shared_memory().per_block;
  const size_t row_bytes = staged_row_bytes<opmath_t>(scratch.width);
  if (row_bytes <= limit) {
    launch(staged_row_window_sums<scalar_t, opmath_t, Value>, (scratch.rows() + kBand - 1) / kBand, kStagedThreads,
           row_bytes, source, sums.mutable_data_ptr<opmath_t>(), scratch, w.left, w.width(), value);
  } else {
    launch(row_window_sums<scalar_t, opmath_t, Value>, (scratch.rows() + kLineThreads - 1) / kLineThreads,
           kLineThreads, 0, source, sums.mutable_data_ptr<opmath_t>(), scratch, int64_t{w.left}, int64_t{w.width()},
           value);
  }
  const size_t column_bytes = staged_column_bytes<opmath_t>(scratch);
  if (column_bytes <= limit) {
    launch(staged_column_window_sums<opmath_t, Emit>, scratch.planes * ((scratch.width + kBand - 1) / kBand),
           kStagedThreads, column_bytes, sums.const_data_ptr<opmath_t>(), scratch, w.top, w.height(), emit);
  } else {
    launch(column_window_sums<opmath_t, Emit>, (scratch.columns() + kLineThreads - 1) / kLineThreads, kLineThreads,
           0, sums.mutable_data_ptr<opmath_t>(), scratch, int64_t{w.top}, int64_t{w.height()}, emit);
  }
}

template <typename scalar_t>
void forward_by_lines(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, Extents w,
                      const Coefficients<at::opmath_type<scalar_t>>& k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ScratchPlanes scratch{shape.planes, shape.height, shape.width, w.top};
  const at::Tensor sums = scratch_like<opmath_t>(x, shape.planes * scratch.plane_size());
  window_sums_by_lines(x.const_data_ptr<scalar_t>(), sums, scratch, w, Square<scalar_t>(),
                       ForwardOutput<scalar_t>{x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), k});
}

template <typename scalar_t>
void backward_by_lines(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                       Extents w, const Coefficients<at::opmath_type<scalar_t>>& k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Extents m = w.mirrored();
  const ScratchPlanes scratch{shape.planes, shape.height, shape.width, std::max(w.top, m.top)};
  const at::Tensor sums = scratch_like<opmath_t>(x, shape.planes * scratch.plane_size());
  const at::Tensor g = scratch_like<opmath_t>(x, x.numel());
  const at::Tensor p = scratch_like<opmath_t>(x, x.numel());
  window_sums_by_lines(x.const_data_ptr<scalar_t>(), sums, scratch, w, Square<scalar_t>(),
                       GradientTerms<scalar_t>{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                               g.mutable_data_ptr<opmath_t>(), p.mutable_data_ptr<opmath_t>(), k});
  window_sums_by_lines(g.const_data_ptr<opmath_t>(), sums, scratch, m, Identity(),
                       GradientOutput<scalar_t>{x.const_data_ptr<scalar_t>(), p.const_data_ptr<opmath_t>(),
                                                dx.mutable_data_ptr<scalar_t>(), k});
}

// The gradient that the strips do not take (beyond 64, or where their arrays do not fit) takes
// the line passes from this window size on, where its tiles' halos cost more than the passes'
// scratch (on an H100 at 32x64x112x112 float32: tiles 0.67 ms at 31x31 and 1.70 ms at 47x47, line
// passes 1.37 and 1.45 ms, whatever the window). The forward's tiles stay ahead as long as a tile
// fits (0.71 against 0.79 ms at 101x101).
constexpr int kGradientByLinesFrom = 40;

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
  const Extents w = extents(settings, shape);
  const at::Tensor y = output.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto k = coefficients<opmath_t>(settings);
    if (forward_in_registers<scalar_t>(x, y, shape, settings, k) ||
        forward_by_strips<scalar_t>(x, y, shape, settings, k)) {
      return;
    }
    with_group_size<scalar_t>(shape, {&x, &y}, [&](auto group) {
      const auto launch = plan<ForwardArrays<opmath_t>, ForwardPasses>(shape, w, group, 3);
      if (!launch) {
        forward_by_lines<scalar_t>(x, y, shape, w, k);
        return;
      }
      launch_kernel(forward_kernel<scalar_t, decltype(group)::value>, *launch, shape.planes, x.const_data_ptr<scalar_t>(),
                    y.mutable_data_ptr<scalar_t>(), launch->grid, launch->passes, w, k);
    });
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
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const Extents w = extents(settings, shape);
  const at::Tensor dx = grad_input.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto k = coefficients<opmath_t>(settings);
    if (backward_in_registers<scalar_t>(dy, x, dx, shape, settings, k) ||
        backward_by_strips<scalar_t>(dy, x, dx, shape, settings, k)) {
      return;
    }
    with_group_size<scalar_t>(shape, {&x, &dy, &dx}, [&](auto group) {
      const auto launch = plan<BackwardArrays<opmath_t>, BackwardPasses>(shape, w, group, 1);
      if (!launch || std::max(w.width(), w.height()) >= kGradientByLinesFrom) {
        backward_by_lines<scalar_t>(dy, x, dx, shape, w, k);
        return;
      }
      launch_kernel(backward_kernel<scalar_t, decltype(group)::value>, *launch, shape.planes, dy.const_data_ptr<scalar_t>(),
                    x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), launch->grid, launch->passes, w,
                    k);
    });
  });
  return grad_input.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(spatialnorm, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}

}  // namespace spatialnorm::cuda
