// What the kernels that give each block a tile of a plane share (spatial_norm_cuda.cu,
// strip_forward.cu): the window's extents, the grid of tiles, where a tile's elements lie, and on
// the host the device's shared memory, the 16-byte groups the rows allow and the launch.
#pragma once

#include "../spatial_norm.h"
#include "divider.cuh"
#include "lanes.cuh"
#include "shared_tile.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace spatialnorm::cuda {

// Extents of the forward window W; the gradient's M is its mirror image.
struct Extents {
  int left, right, top, bottom;

  __host__ __device__ int width() const { return left + right + 1; }
  __host__ __device__ int height() const { return top + bottom + 1; }
  __host__ __device__ Extents mirrored() const { return {right, left, bottom, top}; }  // M, W turned about its centre
};

// The region the windows of `window` over every position of `positions` reach.
__device__ inline Region reach(const Region& positions, Extents window) {
  return {positions.row0 - window.top, positions.col0 - window.left, positions.rows + window.height() - 1,
          positions.columns + window.width() - 1};
}

// The forward window's extents, clipped to the plane.
inline Extents extents(const Settings& s, const PlaneShape& shape) {
  const WindowExtent cols = clipped(forward_extent(s.kernel_width), shape.width);
  const WindowExtent rows = clipped(forward_extent(s.kernel_height), shape.height);
  return {static_cast<int>(cols.before), static_cast<int>(cols.after), static_cast<int>(rows.before),
          static_cast<int>(rows.after)};
}

// Stores the squares of a group of values at (row, column) of `squares`.
template <typename opmath_t, int kSize>
__device__ inline void store_squares(const SharedArray<opmath_t>& squares, int row, int column,
                                     const Lanes<opmath_t, kSize>& values) {
  Lanes<opmath_t, kSize> result;
#pragma unroll
  for (int e = 0; e < kSize; ++e) {
    result.v[e] = values.v[e] * values.v[e];
  }
  squares.template lanes<kSize>(row, column) = result;
}

// One block's tile: rows [row0, row0 + rows) x columns [col0, col0 + columns) of a plane.
struct Tile {
  int64_t plane;
  int row0;
  int col0;
  int rows;
  int columns;

  __device__ Region region() const { return {row0, col0, rows, columns}; }
};

// How the planes are cut into tiles of at most tile_rows x tile_columns, one block each. Blocks
// run in the order of their index, tile after tile of a plane, so that the halo rows a tile shares
// with the one below are still in L2 when that one runs.
struct TileGrid {
  int height;
  int width;
  int tile_rows;
  int tile_columns;
  Divider tiles_down;
  Divider tiles_across;

  int64_t blocks(int64_t planes) const { return planes * tiles_down.divisor * tiles_across.divisor; }

  __device__ Tile locate() const {
    const auto across = tiles_across.divmod(blockIdx.x);
    const auto down = tiles_down.divmod(across.div);
    Tile tile{down.div, static_cast<int>(down.mod) * tile_rows, static_cast<int>(across.mod) * tile_columns, 0, 0};
    tile.rows = min(tile_rows, height - tile.row0);
    tile.columns = min(tile_columns, width - tile.col0);
    return tile;
  }
};

// Tiles of at most max_rows x max_columns, evened out over the plane, their widths a multiple of
// `group` (then so is every tile's first column, and its last one's width where the plane's is).
inline TileGrid tile_grid(const PlaneShape& shape, int max_rows, int max_columns, int group) {
  const int64_t down = (shape.height + max_rows - 1) / max_rows;
  const int64_t across = (shape.width + max_columns - 1) / max_columns;
  const int64_t columns = ((shape.width + across - 1) / across + group - 1) / group * group;
  return TileGrid{static_cast<int>(shape.height),
                  static_cast<int>(shape.width),
                  static_cast<int>((shape.height + down - 1) / down),
                  static_cast<int>(columns),
                  Divider(static_cast<unsigned int>(down)),
                  Divider(static_cast<unsigned int>((shape.width + columns - 1) / columns))};
}

// Where the elements of a region lie in its plane: 32-bit offsets from the region's first element
// (the host keeps rows * width below 2^31), and whether they are in the plane.
struct PlaneOffsets {
  Inside inside;
  int64_t first;  // of the region's first element, in the planes
  int stride;

  __device__ PlaneOffsets(int64_t plane_offset, const Region& region, int height, int width)
      : inside(region, height, width), first(plane_offset + int64_t{region.row0} * width + region.col0), stride(width) {}

  __device__ int at(int row, int column) const { return row * stride + column; }
};

// Shared memory the system keeps for each block, beside what the block asks for.
constexpr size_t kReservedPerBlock = 1024;

// Shared memory the current device offers a block (when asked) and a multiprocessor.
struct SharedMemory {
  int per_block;
  int per_multiprocessor;

  // Blocks of `bytes` each that a multiprocessor's shared memory holds.
  size_t blocks_held(size_t bytes) const { return per_multiprocessor / (bytes + kReservedPerBlock); }
};

inline const SharedMemory& shared_memory() {
  constexpr int kMaxDevices = 64;
  static SharedMemory cached[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices, "spatialnorm: device index ", device, " out of range");
  SharedMemory& limits = cached[device];
  if (limits.per_block == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.per_multiprocessor, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  }
  return limits;
}

// run(std::integral_constant<int, n>)'s result, n the elements the tile kernels take at once: a
// group of 16 bytes where every row of every plane of every tensor starts 16-byte aligned, else 1.
template <typename scalar_t, typename Run>
auto with_group_size(const PlaneShape& shape, std::initializer_list<const at::Tensor*> tensors, Run run) {
  constexpr int kGroup = 16 / sizeof(scalar_t);
  if (rows_of_aligned_groups(shape.width, kGroup, 16, tensors)) {
    return run(std::integral_constant<int, kGroup>());
  }
  return run(std::integral_constant<int, 1>());
}

// Lets `kernel` take shared_bytes of dynamic shared memory a block: beyond the default 48 KB a
// kernel must ask for it, before its occupancy is queried or it is launched.
template <typename Kernel>
void ask_for_shared_memory(Kernel kernel, size_t shared_bytes) {
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
  }
}

// Blocks of `threads` threads and shared_bytes of shared memory each (asked for) that the current
// device holds at once.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, size_t shared_bytes) {
  int blocks = 0, multiprocessors = 0, device = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared_bytes));
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return int64_t{blocks} * multiprocessors;
}

// Launches kernel<<<blocks, threads, shared_bytes>>>(args...) on the current stream, the shared
// memory asked for.
template <typename Kernel, typename... Args>
void start_kernel(Kernel kernel, int64_t blocks, int threads, size_t shared_bytes, Args... args) {
  kernel<<<blocks, threads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The same, asking for the shared memory first.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, int threads, size_t shared_bytes, Args... args) {
  ask_for_shared_memory(kernel, shared_bytes);
  start_kernel(kernel, blocks, threads, shared_bytes, args...);
}

}  // namespace spatialnorm::cuda
