// The gradient for large windows, a block walking down a strip of a plane (strips.cuh) with two
// rings chained, each a window's height behind the one before. A step loads its input rows,
// squares them and sums them along the rows into the first ring; the window sums down that ring's
// columns are the W-window sums of X^2 for the rows of G whose windows it now holds, and make T and
// with it G = dY*X*T^(-beta-1) and P = dY*T^-beta there; G's rows, summed along the rows into the
// second ring, give the M-window sums of G down its columns, and with them
// dX = dY*P - gradient_scale * X * (that sum) for the output rows whose M windows it now holds.
// P waits in a third ring for those rows. All sums are window_sums' chunks (docs/definition.md).
//
// G is 0 outside the plane, so it is made over the plane's columns only; G's rows take the place
// of the squares of a step's input rows, column for column, so that where the strip's M windows
// reach beyond the plane they read the squares' zeros there.
#include "strip_kernels.h"

#include "powers.cuh"
#include "shared_tile.cuh"
#include "strips.cuh"
#include "tiles.cuh"

#include <algorithm>
#include <cstdint>

namespace spatialnorm::cuda {
namespace {

// The windows whose gradient takes strips, by their larger side. On an H200 (32x64x112x112, us,
// tiles / strips) float32 took 25x25 413 / 481, 28x28 448 / 509, 29x29 445 / 524, 31x31 695 / 540,
// 33x33 698 / 490; bfloat16 25x25 429 / 465, 31x31 490 / 530, 33x33 495 / 479 (its tiles are twice
// as wide).
template <typename scalar_t>
constexpr int kGradientStripsFrom = sizeof(scalar_t) == 2 ? 32 : 31;
// And up to this size, whose cost grows with the window where the line passes' does not: there
// float32 took (line passes / strips) 1422 / 982 at 47x47, 1421 / 878 at 63x63, and strips 1981 at
// 101x101, where the line passes took 1.63 ms on an H100 (not measured there on the H200).
constexpr int kGradientStripsTo = 64;
// Input rows a step takes: 16, so that float32's arrays let three blocks share a multiprocessor up
// to 33x33 (that H200, float32: 31x31 532 us, 551 with 32 rows and two blocks; 63x63 869 us with
// two blocks, 1128 with 32 rows and one).
constexpr int kStepRows = 16;

// Rows of the ring of P: an output row's P is made with G's row m.top rows below its top window
// row (G's rows count from there), and used when G's row kh - 1 below it is, kh - 1 - m.top =
// w.top rows of G later.
__host__ __device__ inline int p_rows(Extents w) { return w.top + kStepRows; }

// G's columns for a strip, in the plane: those its M windows reach.
__host__ __device__ inline int g_columns_in_plane(const TileGrid& grid, Extents w) {
  return min(grid.tile_columns + w.width() - 1, grid.width);
}

template <typename opmath_t>
struct GradientStripArrays {
  SharedArray<opmath_t> squares;  // of a step's input rows; then T's window sums and G, in place
  SharedArray<opmath_t> x_sums;   // ring: X^2's window sums along the rows, over G's columns
  SharedArray<opmath_t> g_sums;   // ring: G's (M) window sums along the rows, over the strip's columns
  SharedArray<opmath_t> p;        // ring: P over the strip's columns, by output row

  // The input rows reach W's halo around G's columns and M's around the strip's: at most
  // g_columns_in_plane + kw columns.
  __host__ __device__ GradientStripArrays(SharedLayout& layout, const TileGrid& grid, Extents w, int group)
      : squares(layout.take<opmath_t>(kStepRows, grouped_columns(g_columns_in_plane(grid, w) + w.width(), group))),
        x_sums(layout.take<opmath_t>(ring_rows(w, kStepRows), g_columns_in_plane(grid, w))),
        g_sums(layout.take<opmath_t>(ring_rows(w, kStepRows), grid.tile_columns)),
        p(layout.take<opmath_t>(p_rows(w), grid.tile_columns)) {}
};

// The passes of a step, set up for the launch's widest strip.
struct GradientStripPasses {
  RegionLoad x;       // loading the input rows' squares
  RowPass x_rows;     // window sums of X^2 along them, into the first ring
  Divider t_columns;  // threads side by side down its columns, making T's window sums
  RowPass g_rows;     // window sums of G along the rows, into the second ring
  Divider columns;    // threads side by side down its columns, writing dX

  GradientStripPasses(const TileGrid& grid, Extents w, int group)
      : x(g_columns_in_plane(grid, w) + w.width(), group, kStripThreads),
        x_rows(kStepRows, g_columns_in_plane(grid, w), kStripThreads),
        t_columns(static_cast<unsigned int>(g_columns_in_plane(grid, w))),
        g_rows(kStepRows, grid.tile_columns, kStripThreads),
        columns(static_cast<unsigned int>(grid.tile_columns)) {}
};

// Three blocks a multiprocessor where float32's arrays allow (31x31 over 112 columns takes 67 KB;
// from about 47x47 plan_strips narrows the strips to keep three, at 112 columns two strips of 56);
// float64's take twice the shared memory.
template <typename opmath_t>
constexpr int kGradientMinBlocks = sizeof(opmath_t) == 8 ? 1 : 3;

template <typename scalar_t, int kGroup>
__global__ void __launch_bounds__(kStripThreads, kGradientMinBlocks<at::opmath_type<scalar_t>>)
    strip_backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                          scalar_t* __restrict__ grad_input, TileGrid grid, GradientStripPasses passes, Extents w,
                          Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared[];
  SharedLayout layout(shared);
  const GradientStripArrays<opmath_t> a(layout, grid, w, kGroup);
  const Tile band = grid.locate();
  const int64_t offset = band.plane * grid.height * int64_t{grid.width};
  const Extents m = w.mirrored();
  const int lag = w.height() - 1;  // rows between a window's first and last
  const int ring = ring_rows(w, kStepRows);
  const int p_ring = p_rows(w);
  // G's rows, from the top M window's top row, over the plane's columns the strip's M windows reach.
  const int g_col0 = max(0, band.col0 - m.left);
  const Region g_region{band.row0 - m.top, g_col0, band.rows + lag,
                        min(grid.width, band.col0 + band.columns + m.right) - g_col0};
  const PlaneOffsets g_plane(offset, g_region, grid.height, grid.width);
  const int g_first = g_plane.inside.first_row, g_last = g_plane.inside.last_row;  // in the plane
  // A step's input rows, from the top W window of G's top row.
  const int col0 = min(g_col0 - w.left, band.col0 - m.left);
  const int col_end = max(g_col0 + g_region.columns + w.right, band.col0 + band.columns + m.right);
  Region region = in_groups({g_region.row0 - w.top, col0, kStepRows, col_end - col0}, kGroup);
  const int g_left = g_col0 - region.col0;  // G's first column in the squares' place
  const int inputs = g_region.rows + lag;
  const PlaneOffsets plane(offset, band.region(), grid.height, grid.width);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i0 = 0; i0 < inputs; i0 += kStepRows, region.row0 += kStepRows) {
    region.rows = min(kStepRows, inputs - i0);
    load_region<kGroup>(input + offset, grid.height, grid.width, region, passes.x,
                        [&](int r, int c, const Lanes<opmath_t, kGroup>& x) { store_squares(a.squares, r, c, x); });
    __syncthreads();
    // Every ring row a step overwrites was last read before the barrier above.
    const int slot = i0 % ring;
    slide_rows(passes.x_rows, a.squares, g_left - w.left, region.rows, g_region.columns, w.width(),
               [&](int r, int c, opmath_t sum) { a.x_sums(wrapped(slot + r, ring), c) = sum; });
    __syncthreads();
    // G's row j takes T over input rows j .. j + lag: the rows whose last input row came this step.
    const int g0 = max(0, i0 - lag);
    const int g_end = i0 + region.rows - lag;
    if (g0 >= g_end) {  // the same for the whole block
      continue;
    }
    const int t0 = max(g0, g_first), t_end = min(g_end, g_last);
    if (t0 < t_end) {
      slide_ring_columns(a.x_sums, ring, passes.t_columns, g_region.columns, t0 % ring, t_end - t0, w.height(),
                         [&](int c, int r, opmath_t sum) { a.squares(t0 - g0 + r, g_left + c) = sum; });
    }
    __syncthreads();
    // A warp a row: G in place of T's sums (0 outside the plane), and P where the strip's output is.
    const int p_slot = ((g0 - m.top) % p_ring + p_ring) % p_ring;
    for (int r = warp; r < g_end - g0; r += kStripThreads / 32) {
      const int j = g0 + r, o = j - m.top;
      for (int c = lane; c < g_region.columns; c += 32) {
        opmath_t& cell = a.squares(r, g_left + c);
        if (j < g_first || j >= g_last) {
          cell = 0;
          continue;
        }
        const int at = g_plane.at(j, c);
        const auto dy = static_cast<opmath_t>(grad_output[g_plane.first + at]);
        const auto x = static_cast<opmath_t>(input[g_plane.first + at]);
        // The fast powers, and the exact ones where those missed (an element at a time: no pass to repeat).
        const PowerBase<opmath_t> t = denominator(k, cell);
        FastPowers fast;
        opmath_t g = fast(dy * x, t, k.g_exponent);
        opmath_t p = fast(dy, t, k.neg_beta);
        if (fast.missed) {
          g = times_power(dy * x, t.t, k.g_exponent);
          p = times_power(dy, t.t, k.neg_beta);
        }
        cell = g;
        const int bc = g_col0 + c - band.col0;
        if (o >= 0 && o < band.rows && bc >= 0 && bc < band.columns) {
          a.p(wrapped(p_slot + r, p_ring), bc) = p;
        }
      }
    }
    __syncthreads();
    const int g_slot = g0 % ring;
    slide_rows(passes.g_rows, a.squares, band.col0 - m.left - region.col0, g_end - g0, band.columns, w.width(),
               [&](int r, int c, opmath_t sum) { a.g_sums(wrapped(g_slot + r, ring), c) = sum; });
    __syncthreads();
    // Output row o's M window is G's rows o .. o + lag.
    const int out0 = max(0, g0 - lag);
    const int out_end = min(band.rows, g_end - lag);
    if (out0 < out_end) {
      const int out_slot = out0 % p_ring;
      slide_ring_columns(a.g_sums, ring, passes.columns, band.columns, out0 % ring, out_end - out0, w.height(),
                         [&](int c, int r, opmath_t sum) {
                           const int at = plane.at(out0 + r, c);
                           grad_input[plane.first + at] = static_cast<scalar_t>(
                               gradient_of_input(k, a.p(wrapped(out_slot + r, p_ring), c),
                                                 static_cast<opmath_t>(input[plane.first + at]), sum));
                         });
    }
  }
}

template <typename scalar_t, int kGroup>
bool launch_gradient_strips(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                            Extents w, const Coefficients<at::opmath_type<scalar_t>>& k) {
  const auto kernel = strip_backward_kernel<scalar_t, kGroup>;
  const auto launch = plan_strips<GradientStripArrays<at::opmath_type<scalar_t>>>(
      kernel, shape, w, kGroup, kGradientMinBlocks<at::opmath_type<scalar_t>>);
  if (!launch) {
    return false;
  }
  start_kernel(kernel, launch->grid.blocks(shape.planes), kStripThreads, launch->bytes, dy.const_data_ptr<scalar_t>(),
               x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), launch->grid,
               GradientStripPasses(launch->grid, w, kGroup), w, k);
  return true;
}

}  // namespace

template <typename scalar_t>
bool backward_by_strips(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                        const Settings& settings, const Coefficients<at::opmath_type<scalar_t>>& k) {
  const Extents w = extents(settings, shape);
  const int size = std::max(w.width(), w.height());
  if (size < kGradientStripsFrom<scalar_t> || size > kGradientStripsTo) {
    return false;
  }
  return with_group_size<scalar_t>(shape, {&x, &dy, &dx}, [&](auto group) {
    return launch_gradient_strips<scalar_t, decltype(group)::value>(dy, x, dx, shape, w, k);
  });
}

template bool backward_by_strips<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const PlaneShape&,
                                        const Settings&, const Coefficients<float>&);
template bool backward_by_strips<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const PlaneShape&,
                                         const Settings&, const Coefficients<double>&);
template bool backward_by_strips<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const PlaneShape&, const Settings&, const Coefficients<float>&);
template bool backward_by_strips<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const PlaneShape&, const Settings&, const Coefficients<float>&);

}  // namespace spatialnorm::cuda
