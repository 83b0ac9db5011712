// The forward for large windows, a block walking down a strip of a plane (strips.cuh): it loads
// a step's input rows with the windows' halo columns, squares them into shared memory, takes their
// window sums along the rows into a ring that keeps the row sums of the last kh - 1 + kChunkRows
// input rows, and then the window sums down the ring's columns of every output row whose window
// the ring now holds, writing those rows' output. Both passes sum the windows in chunks
// (window_sums), so that every sum is made of its own window's terms only, as everywhere in the
// package (docs/definition.md).
#include "strip_kernels.h"

#include "powers.cuh"
#include "shared_tile.cuh"
#include "strips.cuh"
#include "tiles.cuh"

#include <algorithm>
#include <cstdint>

namespace spatialnorm::cuda {
namespace {

// The windows that take strips, by their larger side. On an H200 (32x64x112x112, us, tiles /
// strips) float32 took 19x19 113.6 / 118.1, 25x25 119.5 / 124.3, 31x31 133.6 / 133.7, 33x33 135.6
// / 120.0, 47x47 184.8 / 158.5, 63x63 433.8 / 200.8, 101x101 1404 / 323; bfloat16 25x25 110.4 /
// 114.2, 31x31 122.2 / 123.2, 33x33 125.1 / 110.4, 63x63 436.7 / 188.8, 101x101 (line passes)
// 436.6 / 301.8.
constexpr int kStripsFrom = 32;

template <typename opmath_t>
struct StripArrays {
  SharedArray<opmath_t> squares;   // of a step's input rows, with the windows' halo columns, in groups
  SharedArray<opmath_t> row_sums;  // the ring

  __host__ __device__ StripArrays(SharedLayout& layout, const TileGrid& grid, Extents w, int group)
      : squares(layout.take<opmath_t>(kChunkRows, grouped_columns(grid.tile_columns + w.width() - 1, group))),
        row_sums(layout.take<opmath_t>(ring_rows(w, kChunkRows), grid.tile_columns)) {}
};

// The passes of a step, set up for the launch's widest strip.
struct StripPasses {
  RegionLoad x;     // loading the input rows' squares
  RowPass rows;     // window sums along them, into the ring
  Divider columns;  // threads side by side down the ring's columns

  StripPasses(const TileGrid& grid, Extents w, int group)
      : x(grid.tile_columns + w.width() - 1, group, kStripThreads),
        rows(kChunkRows, grid.tile_columns, kStripThreads),
        columns(static_cast<unsigned int>(grid.tile_columns)) {}
};

// Four blocks a multiprocessor (64 registers a thread) where the arrays are float32 (31x31 takes
// 48 KB); float64's take twice the shared memory, which holds two at most.
template <typename opmath_t>
constexpr int kMinBlocks = sizeof(opmath_t) == 8 ? 2 : 4;

template <typename scalar_t, int kGroup>
__global__ void __launch_bounds__(kStripThreads, kMinBlocks<at::opmath_type<scalar_t>>)
    strip_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, TileGrid grid,
                         StripPasses passes, Extents w, Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared[];
  SharedLayout layout(shared);
  const StripArrays<opmath_t> a(layout, grid, w, kGroup);
  const Tile band = grid.locate();
  const int64_t offset = band.plane * grid.height * int64_t{grid.width};
  const int lag = w.height() - 1;  // input rows between an output row's window's first and last
  const int ring = ring_rows(w, kChunkRows);
  const int inputs = band.rows + lag;
  Region region = in_groups(reach(band.region(), w), kGroup);  // of a step's input rows
  const int first_column = band.col0 - w.left - region.col0;   // of the first window
  const PlaneOffsets plane(offset, band.region(), grid.height, grid.width);
  const scalar_t* band_x = input + plane.first;
  scalar_t* band_y = output + plane.first;
  for (int i0 = 0; i0 < inputs; i0 += kChunkRows, region.row0 += kChunkRows) {
    region.rows = min(kChunkRows, inputs - i0);
    load_region<kGroup>(input + offset, grid.height, grid.width, region, passes.x,
                        [&](int r, int c, const Lanes<opmath_t, kGroup>& x) { store_squares(a.squares, r, c, x); });
    __syncthreads();
    // The ring's rows this step overwrites were last read by the previous step's outputs, before
    // the barrier above.
    const int slot = i0 % ring;
    slide_rows(passes.rows, a.squares, first_column, region.rows, band.columns, w.width(),
               [&](int r, int c, opmath_t sum) { a.row_sums(wrapped(slot + r, ring), c) = sum; });
    __syncthreads();
    // Output row o's window is input rows o .. o + lag: those whose last row came this step.
    const int out0 = max(0, i0 - lag);
    const int out_end = min(band.rows, i0 + region.rows - lag);
    if (out0 < out_end) {  // the same for the whole block
      const auto write_output = [&](auto powers) {
        slide_ring_columns(a.row_sums, ring, passes.columns, band.columns, out0 % ring, out_end - out0, w.height(),
                           [&](int c, int r, opmath_t sum) {
                             const int at = plane.at(out0 + r, c);
                             band_y[at] = static_cast<scalar_t>(
                                 powers(static_cast<opmath_t>(band_x[at]), denominator(k, sum), k.neg_beta));
                           });
        return powers.missed;
      };
      if (__syncthreads_or(write_output(FastPowers()))) {
        write_output(ExactPowers());
      }
    }
  }
}

template <typename scalar_t, int kGroup>
bool launch_strips(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, Extents w,
                   const Coefficients<at::opmath_type<scalar_t>>& k) {
  const auto kernel = strip_forward_kernel<scalar_t, kGroup>;
  const auto launch = plan_strips<StripArrays<at::opmath_type<scalar_t>>>(kernel, shape, w, kGroup, 1);
  if (!launch) {
    return false;
  }
  start_kernel(kernel, launch->grid.blocks(shape.planes), kStripThreads, launch->bytes, x.const_data_ptr<scalar_t>(),
               y.mutable_data_ptr<scalar_t>(), launch->grid, StripPasses(launch->grid, w, kGroup), w, k);
  return true;
}

}  // namespace

template <typename scalar_t>
bool forward_by_strips(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, const Settings& settings,
                       const Coefficients<at::opmath_type<scalar_t>>& k) {
  const Extents w = extents(settings, shape);
  if (std::max(w.width(), w.height()) < kStripsFrom) {
    return false;
  }
  return with_group_size<scalar_t>(shape, {&x, &y}, [&](auto group) {
    return launch_strips<scalar_t, decltype(group)::value>(x, y, shape, w, k);
  });
}

template bool forward_by_strips<float>(const at::Tensor&, const at::Tensor&, const PlaneShape&, const Settings&,
                                       const Coefficients<float>&);
template bool forward_by_strips<double>(const at::Tensor&, const at::Tensor&, const PlaneShape&, const Settings&,
                                        const Coefficients<double>&);
template bool forward_by_strips<c10::Half>(const at::Tensor&, const at::Tensor&, const PlaneShape&, const Settings&,
                                           const Coefficients<float>&);
template bool forward_by_strips<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const PlaneShape&,
                                               const Settings&, const Coefficients<float>&);

}  // namespace spatialnorm::cuda
