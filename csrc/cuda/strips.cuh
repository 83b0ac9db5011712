// What the kernels that walk a block down a strip of a plane share (strip_forward.cu,
// strip_backward.cu). A block owns a strip of a plane's columns (the whole width up to
// kStripColumns) and walks down a band of its rows (a whole plane where there are planes enough to
// fill the GPU), a few input rows a step, keeping the window sums along the rows of the last rows
// it read in rings, so that it reads each row once. A tile (spatial_norm_cuda.cu) loads its
// window's halo rows again for every tile down a plane, which grows with the window.
#pragma once

#include "../spatial_norm.h"
#include "divider.cuh"
#include "shared_tile.cuh"
#include "tiles.cuh"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>

namespace spatialnorm::cuda {

constexpr int kStripThreads = 256;
constexpr int kStripColumns = 128;
// Input rows a step of the forward takes (and the fewest rows a band has). On an H200
// (32x64x112x112) the float32 forward at 31x31 took 148 us with 32 rows (four blocks a
// multiprocessor), 178 with 16 (more steps, each paying for its loads' latency and two barriers),
// 184 with 64 (two blocks).
constexpr int kChunkRows = 32;
// Output rows a thread sums down a ring's column at once (window_sums' chunks): 16 rows read
// about (kh + 15) / 16 terms an output instead of (kh + 7) / 8 (that forward: 148 -> 133 us).
constexpr int kColumnStretch = 16;

// Rows of a ring of window sums along the rows, for steps of step_rows rows: row i of its array
// (counted from the band's first window's top row) lies at i % rows, and a step's new rows
// overwrite those whose windows are done.
__host__ __device__ inline int ring_rows(Extents w, int step_rows) { return w.height() - 1 + step_rows; }

// A row index past the end of a ring of `rows` rows, taken around, for indices below 2 * rows.
__device__ inline int wrapped(int row, int rows) { return row < rows ? row : row - rows; }

// For each of the first `columns` columns and each r < count, emit(column, r, sum) gets the sum of
// the ring's rows from first_row + r (wrapping around) down `window` rows. Consecutive threads
// take consecutive columns, each kColumnStretch output rows of one.
template <typename T, typename Emit>
__device__ inline void slide_ring_columns(const SharedArray<T>& ring, int rows, const Divider& across, int columns,
                                          int first_row, int count, int window, Emit emit) {
  const unsigned int items = across.divisor * ((count + kColumnStretch - 1) / kColumnStretch);
  for (unsigned int item = threadIdx.x; item < items; item += blockDim.x) {
    const auto at = across.divmod(item);
    const int column = at.mod;
    const int begin = static_cast<int>(at.div) * kColumnStretch;
    if (column < columns) {
      // Row first + j lies j rows below `top` up to the ring's end, and `rows` rows above that after it.
      const int first = wrapped(first_row + begin, rows);
      const int top = first * ring.pitch + column;
      const int wrapped_top = top - rows * ring.pitch;
      const int end = rows - first;
      window_sums<kColumnStretch>([&](int j) { return ring.data[(j < end ? top : wrapped_top) + j * ring.pitch]; },
                                  min(kColumnStretch, count - begin), kColumnStretch, window,
                                  [&](int i, T sum) { emit(column, begin + i, sum); });
    }
  }
}

// A launch's strips and the shared memory a block of them takes.
struct StripLaunch {
  TileGrid grid;
  size_t bytes;
};

// Strips as wide as kStripColumns, or narrower where that lets `preferred_blocks` blocks share a
// multiprocessor, in bands as tall as the planes, or more of them where the planes are too few
// for two waves of blocks, each at least twice the window tall (then its halo rows are at most
// as many again as its own). Nothing where no strip's arrays (Arrays(layout, grid, w, group))
// fit a block's shared memory, or offsets within a band and its halo would not fit 32 bits.
// Asks for the kernel's shared memory.
template <typename Arrays, typename Kernel>
std::optional<StripLaunch> plan_strips(Kernel kernel, const PlaneShape& shape, Extents w, int group,
                                       int preferred_blocks) {
  constexpr int64_t kLimit = std::numeric_limits<int>::max();
  const int64_t reach_rows = 2 * int64_t{w.height()};  // a band's halo rows, the gradient's on both sides
  if (shape.height + 2 * reach_rows + kChunkRows > kLimit || shape.width + 4 * int64_t{w.width()} + 4 * group > kLimit) {
    return std::nullopt;
  }
  const SharedMemory& limits = shared_memory();
  std::optional<StripLaunch> fitting;
  for (const int columns : {kStripColumns, 96, 64}) {
    const TileGrid full = tile_grid(shape, static_cast<int>(shape.height), columns, group);
    SharedLayout layout(nullptr);
    Arrays(layout, full, w, group);
    const size_t bytes = layout.bytes();
    if (bytes > static_cast<size_t>(limits.per_block)) {
      continue;
    }
    const bool preferred = limits.blocks_held(bytes) >= static_cast<size_t>(preferred_blocks);
    if (!fitting || preferred) {
      fitting = StripLaunch{full, bytes};
    }
    if (preferred) {
      break;
    }
  }
  if (!fitting) {
    return std::nullopt;
  }
  ask_for_shared_memory(kernel, fitting->bytes);
  const int64_t resident = resident_blocks(kernel, kStripThreads, fitting->bytes);
  const int64_t strips = shape.planes * fitting->grid.tiles_across.divisor;
  const int64_t most_bands = std::max<int64_t>(1, shape.height / std::max<int64_t>(kChunkRows, reach_rows));
  const int64_t bands = std::min(most_bands, std::max<int64_t>(1, (2 * resident + strips - 1) / strips));
  const TileGrid grid = tile_grid(shape, static_cast<int>((shape.height + bands - 1) / bands),
                                  fitting->grid.tile_columns, group);
  if (grid.blocks(shape.planes) > kLimit || (grid.tile_rows + 2 * reach_rows) * shape.width > kLimit) {
    return std::nullopt;
  }
  return StripLaunch{grid, fitting->bytes};
}

}  // namespace spatialnorm::cuda
