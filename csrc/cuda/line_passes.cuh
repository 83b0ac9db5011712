// The CUDA path for wide windows: separable passes over whole lines of the planes (rows, then
// columns), one thread per line, through scratch in device memory (the row sums, in the
// compute type).
//
// Along a line the window sums go by blocks (van Herk / Gil-Werman): the line, padded with zeros,
// is cut into blocks as long as the window, so that a window is the suffix of one block plus a
// prefix of the next. About two terms are read per window whatever its size, and each sum is made
// of its own window's terms only. A tile of the tiled kernels pays for the window's halo in every
// tile; a whole line pays for it once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace spatialnorm::cuda {

// Window sums along one line by blocks. term(j) is term j of the line padded in front with as
// many zeros as the window reaches back (zero past its end too), so that window i covers terms
// [i, i + window). For each block, the suffix sums from its end back to each term are made first
// and kept with keep(j, sum), j < count; then each window i of the block gets kept(i) plus the
// prefix of the next block up to term i + window - 1 through emit(i, sum).
template <typename Sum, typename Index, typename Term, typename Keep, typename Kept, typename Emit>
__device__ inline void block_window_sums(Index count, Index window, Term term, Keep keep, Kept kept, Emit emit) {
  for (Index start = 0; start < count; start += window) {
    const Index end = start + window;
    Sum suffix = 0;
    for (Index j = end - 1; j >= start; --j) {
      suffix += term(j);
      if (j < count) {
        keep(j, suffix);
      }
    }
    Sum prefix = 0;
    for (Index i = start; i < end && i < count; ++i) {
      if (i > start) {
        prefix += term(i + window - 1);
      }
      emit(i, kept(i) + prefix);
    }
  }
}

// The window sums along the columns are taken in place in the row sums' scratch: each plane of
// it holds the height rows below `pad` rows (at least the window's reach up), which hold the
// suffix sums of the first windows. Terms are read before a suffix takes their place.
struct ScratchPlanes {
  int64_t planes;
  int64_t height;
  int64_t width;
  int64_t pad;

  __host__ __device__ int64_t rows() const { return planes * height; }       // of all the planes
  __host__ __device__ int64_t columns() const { return planes * width; }

  __host__ __device__ int64_t plane_size() const { return (pad + height) * width; }

  // Where row `row` of plane `plane` starts (negative rows lie in the pad).
  __device__ int64_t row_start(int64_t plane, int64_t row) const { return plane * plane_size() + (pad + row) * width; }
};

// Lines staged in shared memory: a block of kStagedThreads threads loads kBand whole lines with
// coalesced accesses, kBand of its threads sum along one line each, and the block stores the
// sums with coalesced accesses. Where kBand lines do not fit a block's shared memory, a thread
// walks its line in device memory instead (the kernels below), with the same sums.
constexpr int kBand = 32;
constexpr int kStagedThreads = 128;
constexpr int kLineThreads = 128;  // of the kernels that walk lines in device memory

// Shared memory of the staged kernels (the host asks for it where it passes 48 KiB).
template <typename Sum>
size_t staged_row_bytes(int64_t width) {
  return 2 * sizeof(Sum) * kBand * (width | 1);
}

template <typename Sum>
size_t staged_column_bytes(const ScratchPlanes& scratch) {
  return sizeof(Sum) * (scratch.pad + scratch.height) * (kBand + 1);
}

// Window sums of value(source) along the source's rows, the window reaching `before` columns
// back, into the rows of the scratch below its pad rows; kBand rows per block.
template <typename In, typename Sum, typename Value>
__global__ void __launch_bounds__(kStagedThreads)
    staged_row_window_sums(const In* __restrict__ source, Sum* __restrict__ sums, ScratchPlanes scratch,
                           int before, int window, Value value) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int width = static_cast<int>(scratch.width), pitch = width | 1;
  Sum* terms = reinterpret_cast<Sum*>(shared);
  Sum* out = terms + kBand * pitch;
  const int64_t first = int64_t{blockIdx.x} * kBand;
  const int lines = static_cast<int>(min(int64_t{kBand}, scratch.rows() - first));
  // The band's rows are consecutive in the source.
  const In* band = source + first * width;
#pragma unroll 4
  for (int e = threadIdx.x; e < lines * width; e += kStagedThreads) {
    terms[e / width * pitch + e % width] = value(band[e]);
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < lines) {
    const Sum* line = terms + threadIdx.x * pitch;
    Sum* sums_of_line = out + threadIdx.x * pitch;
    block_window_sums<Sum>(
        width, window, [&](int j) { return j >= before && j - before < width ? line[j - before] : Sum(0); },
        [&](int i, Sum suffix) { sums_of_line[i] = suffix; }, [&](int i) { return sums_of_line[i]; },
        [&](int i, Sum sum) { sums_of_line[i] = sum; });
  }
  __syncthreads();
  for (int e = threadIdx.x; e < lines * width; e += kStagedThreads) {
    const int64_t row = first + e / width;
    sums[scratch.row_start(row / scratch.height, row % scratch.height) + e % width] = out[e / width * pitch + e % width];
  }
}

// For each position (r, c) of each plane, emit(offset of (r, c) in the planes, sum) gets the sum
// of the scratch's row sums over rows [r - before, r - before + window) of column c: kBand columns
// of a plane per block, summed in place in shared memory below `before` rows that take the
// suffix sums of the first windows.
template <typename Sum, typename Emit>
__global__ void __launch_bounds__(kStagedThreads)
    staged_column_window_sums(const Sum* __restrict__ sums, ScratchPlanes scratch, int before, int window,
                              Emit emit) {
  extern __shared__ __align__(16) unsigned char shared[];
  Sum* slots = reinterpret_cast<Sum*>(shared);  // row j is term j of the padded columns
  const int height = static_cast<int>(scratch.height);
  const int64_t width = scratch.width;
  const int64_t strips = (width + kBand - 1) / kBand;
  const int64_t plane = blockIdx.x / strips, column0 = blockIdx.x % strips * kBand;
  const int columns = static_cast<int>(min(int64_t{kBand}, width - column0));
  const Sum* strip = sums + scratch.row_start(plane, 0) + column0;
#pragma unroll 4
  for (int e = threadIdx.x; e < height * kBand; e += kStagedThreads) {
    const int r = e / kBand, c = e % kBand;
    if (c < columns) {
      slots[(before + r) * (kBand + 1) + c] = strip[r * width + c];
    }
  }
  __syncthreads();
  const int c = threadIdx.x;
  if (c < columns) {
    Sum* column = slots + c;
    const int64_t offset = plane * height * width + column0 + c;
    block_window_sums<Sum>(
        height, window,
        [&](int j) { return j >= before && j - before < height ? column[j * (kBand + 1)] : Sum(0); },
        [&](int i, Sum suffix) { column[i * (kBand + 1)] = suffix; }, [&](int i) { return column[i * (kBand + 1)]; },
        [&](int i, Sum sum) { emit(offset + i * width, sum); });
  }
}

__device__ inline int64_t line_index() { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }

// The same, a thread walking its row in device memory.
template <typename In, typename Sum, typename Value>
__global__ void row_window_sums(const In* __restrict__ source, Sum* __restrict__ sums, ScratchPlanes scratch,
                                int64_t before, int64_t window, Value value) {
  const int64_t line = line_index();
  if (line >= scratch.rows()) {
    return;
  }
  const int64_t width = scratch.width;
  const In* terms = source + line * width;
  Sum* out = sums + scratch.row_start(line / scratch.height, line % scratch.height);
  block_window_sums<Sum>(
      width, window,
      [&](int64_t j) { return j >= before && j - before < width ? value(terms[j - before]) : Sum(0); },
      [&](int64_t i, Sum suffix) { out[i] = suffix; }, [&](int64_t i) { return out[i]; },
      [&](int64_t i, Sum sum) { out[i] = sum; });
}

// The same, a thread walking its column in device memory, summed in place in the scratch.
template <typename Sum, typename Emit>
__global__ void column_window_sums(Sum* __restrict__ sums, ScratchPlanes scratch, int64_t before, int64_t window,
                                   Emit emit) {
  const int64_t line = line_index();
  if (line >= scratch.columns()) {
    return;
  }
  const int64_t plane = line / scratch.width, column = line % scratch.width;
  const int64_t width = scratch.width, height = scratch.height;
  // Term j of the padded column is scratch row j - before.
  Sum* slots = sums + scratch.row_start(plane, -before) + column;
  block_window_sums<Sum>(
      height, window,
      [&](int64_t j) { return j >= before && j - before < height ? slots[j * width] : Sum(0); },
      [&](int64_t i, Sum suffix) { slots[i * width] = suffix; }, [&](int64_t i) { return slots[i * width]; },
      [&](int64_t i, Sum sum) { emit((plane * height + i) * width + column, sum); });
}

}  // namespace spatialnorm::cuda
