// The forward for the common windows (square, 2x2 to 5x5 in float32, to 6x6 in float16 and
// bfloat16) over planes whose rows are whole groups of four aligned values, with no shared memory
// and no barrier.
//
// A thread owns four consecutive columns of a plane and walks down a band of rows, one row per
// step. It loads the row's four values once (16 bytes of float32, 8 of a 16-bit type), squares
// them, takes their window sums along the row with the squares its neighbours lend it (warp
// shuffles: a window reaches at most three columns beyond a thread's own), and keeps the last kh
// rows of those sums in registers; their sum down the columns is the window sum of the row
// kh - 1 steps up, whose output it then writes from that row's values, also kept (reading them
// again, even from L1, left the warps waiting on the loads most of the time). Threads side
// by side along a row form a segment of a warp; its first and last lanes only lend their squares,
// so that every output has both neighbours. Each sum is made of its own window's terms only, as
// everywhere in the package (docs/definition.md, "Exactness").
#include "register_forward.h"

#include "lanes.cuh"
#include "powers.cuh"

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

namespace spatialnorm::cuda {
namespace {

using Divider = at::cuda::detail::IntDivider<unsigned int>;

constexpr int kColumns = 4;        // consecutive columns a thread owns
constexpr int kBlockThreads = 256;
// Four blocks per multiprocessor: 64 registers a thread. Without the bound the float32 5x5
// forward took 77 registers and 82 us instead of 74 (H200, 32x64x112x112): fewer warps left the
// loads' latency exposed. The registers hold the window's rows of sums, so they bound the window:
// past 5x5 in float32 and 6x6 in 16-bit types they spill or the shared-memory tiles are as fast
// (float32 6x6 82 us here against 79 in tiles; bfloat16 7x7 65 against 70 with 140 bytes
// spilled, 8x8 80 against 64). float64 keeps to the tiles.
constexpr int kMinBlocks = 4;
template <typename scalar_t>
constexpr int kLargestWindow = sizeof(scalar_t) == 2 ? 6 : std::is_same_v<scalar_t, float> ? 5 : 0;
constexpr int kBandRows = 32;      // the most output rows of a band
constexpr int kRowsAhead = 2;      // loads in flight per thread ahead of the row it sums
constexpr unsigned int kAllLanes = 0xffffffffu;

// How the planes are cut into segments: each takes a band of rows of a plane and a stretch of
// its columns, (lanes - 2) groups of kColumns wide.
struct Segments {
  int height;
  int width;
  int lanes_log2;  // lanes per segment: 4 to 32
  int band_rows;   // of every band but perhaps a plane's last
  int steps;       // rows a segment reads: band_rows + kh - 1
  Divider tiles_across;
  Divider bands_down;
  unsigned int count;

  __host__ __device__ int lanes() const { return 1 << lanes_log2; }
};

// Where a thread's segment and columns lie.
struct Place {
  int64_t plane_offset;  // of the thread's first column in the planes
  int row0;              // the band's first row
  int row_end;
  bool reads;            // its columns lie in the plane (lanes beyond it read zeros)
  bool writes;           // it also owns them (not the first or last lane of the segment)
};

__device__ inline Place locate(const Segments& s) {
  const unsigned int segment = (blockIdx.x * kBlockThreads + threadIdx.x) >> s.lanes_log2;
  const int lane = threadIdx.x & (s.lanes() - 1);
  const auto across = s.tiles_across.divmod(segment);
  const auto down = s.bands_down.divmod(across.div);
  const int column = (static_cast<int>(across.mod) * (s.lanes() - 2) + lane - 1) * kColumns;
  Place place;
  place.plane_offset = static_cast<int64_t>(down.div) * s.height * s.width + column;
  place.row0 = static_cast<int>(down.mod) * s.band_rows;
  place.row_end = min(place.row0 + s.band_rows, s.height);
  place.reads = segment < s.count && column >= 0 && column < s.width;
  place.writes = place.reads && lane > 0 && lane < s.lanes() - 1;
  return place;
}

// out[i] = terms[i] + ... + terms[i + kWindow - 1] for i < kCount, all indices known at compile
// time so that the terms stay in registers. Windows go in chunks of consecutive ones (as in
// shared_tile.cuh's chunk_window_sums): window i0 + t is the chunk's suffix from i0 + t plus the
// terms after the chunk that it reaches, a prefix the chunk's windows share and that grows by
// one term per window.
template <int kWindow, int kCount, typename T>
__device__ inline void sliding_sums(const T (&terms)[kCount + kWindow - 1], T (&out)[kCount]) {
  constexpr int kChunk = kWindow < kCount ? kWindow : kCount;
#pragma unroll
  for (int i0 = 0; i0 < kCount; i0 += kChunk) {
    T suffix[kChunk];
    suffix[kChunk - 1] = terms[i0 + kChunk - 1];
#pragma unroll
    for (int t = kChunk - 2; t >= 0; --t) {
      suffix[t] = terms[i0 + t] + suffix[t + 1];
    }
    T beyond = 0;  // terms i0 + kChunk .. i0 + t + kWindow - 1
#pragma unroll
    for (int j = i0 + kChunk; j < i0 + kWindow; ++j) {
      beyond = j == i0 + kChunk ? terms[j] : beyond + terms[j];
    }
#pragma unroll
    for (int t = 0; t < kChunk && i0 + t < kCount; ++t) {
      const int last = i0 + t + kWindow - 1;
      if (t > 0) {
        beyond = last == i0 + kChunk ? terms[last] : beyond + terms[last];
      }
      out[i0 + t] = last < i0 + kChunk ? suffix[t] : suffix[t] + beyond;
    }
  }
}

template <typename scalar_t, int kWidth, int kHeight>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocks)
    register_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, Segments s,
                            Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Group = Stored<scalar_t, kColumns>;
  using Values = Lanes<opmath_t, kColumns>;
  constexpr int kLeft = kWidth / 2, kRight = (kWidth - 1) / 2;  // forward_extent
  constexpr int kTop = kHeight / 2, kBottom = (kHeight - 1) / 2;
  static_assert(kLeft <= kColumns && kRight <= kColumns, "a window reaches the neighbouring lanes' columns only");
  const Place place = locate(s);
  const scalar_t* x = input + place.plane_offset;
  scalar_t* y = output + place.plane_offset;
  const int first_row = place.row0 - kTop;  // read at step 0
  const auto load = [&](int row, bool wanted) {
    return wanted && place.reads && row >= 0 && row < s.height ? *reinterpret_cast<const Group*>(x + int64_t{row} * s.width)
                                                               : Group(0);
  };

  Group ahead[kRowsAhead];
#pragma unroll
  for (int a = 0; a < kRowsAhead; ++a) {
    ahead[a] = load(first_row + a, a < s.steps);
  }
  // The last kHeight rows read, row j of the band's in slot j % kHeight: as loaded (a row is
  // written kBottom steps after it is read) and their window sums along the row.
  Group rows[kHeight] = {};
  Values row_sums[kHeight] = {};
  for (int base = 0; base < s.steps; base += kHeight) {
#pragma unroll
    for (int slot = 0; slot < kHeight; ++slot) {
      const int step = base + slot;
      if (step >= s.steps) {  // the same for every lane
        break;
      }
      const Group current = ahead[0];
#pragma unroll
      for (int a = 0; a + 1 < kRowsAhead; ++a) {
        ahead[a] = ahead[a + 1];
      }
      ahead[kRowsAhead - 1] = load(first_row + step + kRowsAhead, step + kRowsAhead < s.steps);
      rows[slot] = current;
      Values squares = widen<scalar_t, kColumns>(current);
#pragma unroll
      for (int e = 0; e < kColumns; ++e) {
        squares.v[e] *= squares.v[e];
      }
      opmath_t terms[kColumns + kWidth - 1];
#pragma unroll
      for (int j = 0; j < kLeft; ++j) {
        terms[j] = __shfl_up_sync(kAllLanes, squares.v[kColumns - kLeft + j], 1, s.lanes());
      }
#pragma unroll
      for (int j = 0; j < kColumns; ++j) {
        terms[kLeft + j] = squares.v[j];
      }
#pragma unroll
      for (int j = 0; j < kRight; ++j) {
        terms[kLeft + kColumns + j] = __shfl_down_sync(kAllLanes, squares.v[j], 1, s.lanes());
      }
      sliding_sums<kWidth, kColumns>(terms, row_sums[slot].v);

      const int out_row = place.row0 + step - (kHeight - 1);
      if (place.writes && step >= kHeight - 1 && out_row < place.row_end) {
        Values sums = row_sums[(slot + 1) % kHeight];  // down the window, top row first
#pragma unroll
        for (int i = 2; i <= kHeight; ++i) {
          sums += row_sums[(slot + i) % kHeight];
        }
        const Values values = widen<scalar_t, kColumns>(rows[(slot + kHeight - kBottom) % kHeight]);
        const auto outputs = [&](auto powers) {
          Lanes<scalar_t, kColumns> out;
#pragma unroll
          for (int e = 0; e < kColumns; ++e) {
            out.v[e] = static_cast<scalar_t>(powers(values.v[e], denominator(k, sums.v[e]), k.neg_beta));
          }
          return std::pair(out, powers.missed);
        };
        auto [out, missed] = outputs(FastPowers());
        if (missed) {
          out = outputs(ExactPowers()).first;
        }
        *reinterpret_cast<Lanes<scalar_t, kColumns>*>(y + int64_t{out_row} * s.width) = out;
      }
    }
  }
}

// Segments of 32, 16, 8 or 4 lanes, whichever has the fewest lanes in all for the plane's width
// (ties: the widest, whose edge lanes are fewer), and bands of about kBandRows rows evened out
// over the plane; nothing where the indices would not fit 32 bits.
std::optional<Segments> segments_for(const PlaneShape& shape, int kernel_height) {
  constexpr int64_t kLimit = std::numeric_limits<int>::max();
  if (shape.height + kBandRows + kernel_height > kLimit || shape.width + 2 * kColumns > kLimit) {
    return std::nullopt;
  }
  const int64_t groups = shape.width / kColumns;
  int lanes_log2 = 5;
  int64_t fewest = std::numeric_limits<int64_t>::max();
  for (int log2 = 5; log2 >= 2; --log2) {
    const int64_t lanes = (int64_t{1} << log2) * ((groups + (1 << log2) - 3) / ((1 << log2) - 2));
    if (lanes < fewest) {
      fewest = lanes;
      lanes_log2 = log2;
    }
  }
  const int64_t tiles = fewest >> lanes_log2;
  const int64_t bands = (shape.height + kBandRows - 1) / kBandRows;
  const int64_t band_rows = (shape.height + bands - 1) / bands;
  const int64_t count = shape.planes * bands * tiles;
  if (count * (int64_t{1} << lanes_log2) + kBlockThreads > std::numeric_limits<unsigned int>::max() ||
      shape.planes * bands > std::numeric_limits<unsigned int>::max()) {
    return std::nullopt;
  }
  return Segments{static_cast<int>(shape.height),
                  static_cast<int>(shape.width),
                  lanes_log2,
                  static_cast<int>(band_rows),
                  static_cast<int>(band_rows + kernel_height - 1),
                  Divider(static_cast<unsigned int>(tiles)),
                  Divider(static_cast<unsigned int>(bands)),
                  static_cast<unsigned int>(count)};
}

// Calls run(std::integral_constant<int, size>) if size is one of kSizes; whether it was.
template <int... kSizes, typename Run>
bool with_window_size(int64_t size, std::integer_sequence<int, kSizes...>, Run run) {
  return ((size == kSizes && (run(std::integral_constant<int, kSizes>()), true)) || ...);
}

}  // namespace

template <typename scalar_t>
bool forward_in_registers(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, const Settings& settings,
                          const Coefficients<at::opmath_type<scalar_t>>& k) {
  constexpr size_t kAlignment = alignof(Stored<scalar_t, kColumns>);
  if (settings.kernel_width != settings.kernel_height || settings.kernel_width > kLargestWindow<scalar_t> ||
      shape.width % kColumns != 0 ||
      reinterpret_cast<uintptr_t>(x.const_data_ptr()) % kAlignment != 0 ||
      reinterpret_cast<uintptr_t>(y.const_data_ptr()) % kAlignment != 0) {
    return false;
  }
  const std::optional<Segments> segments = segments_for(shape, static_cast<int>(settings.kernel_height));
  if (!segments) {
    return false;
  }
  const int64_t threads = int64_t{segments->count} << segments->lanes_log2;
  return with_window_size(settings.kernel_width, std::integer_sequence<int, 2, 3, 4, 5, 6>(), [&](auto size) {
    constexpr int kSize = decltype(size)::value;
    if constexpr (kSize <= kLargestWindow<scalar_t>) {
      register_forward_kernel<scalar_t, kSize, kSize>
          <<<(threads + kBlockThreads - 1) / kBlockThreads, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), *segments, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template bool forward_in_registers<float>(const at::Tensor&, const at::Tensor&, const PlaneShape&, const Settings&,
                                          const Coefficients<float>&);
template bool forward_in_registers<double>(const at::Tensor&, const at::Tensor&, const PlaneShape&, const Settings&,
                                           const Coefficients<double>&);
template bool forward_in_registers<c10::Half>(const at::Tensor&, const at::Tensor&, const PlaneShape&, const Settings&,
                                              const Coefficients<float>&);
template bool forward_in_registers<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const PlaneShape&,
                                                  const Settings&, const Coefficients<float>&);

}  // namespace spatialnorm::cuda
