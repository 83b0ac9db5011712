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
#include "register_kernels.h"

#include "powers.cuh"
#include "register_rows.cuh"

#include <type_traits>
#include <utility>

namespace spatialnorm::cuda {
namespace {

// Four blocks per multiprocessor: 64 registers a thread. Without the bound the float32 5x5
// forward took 77 registers and 82 us instead of 74 (H200, 32x64x112x112): fewer warps left the
// loads' latency exposed. The registers hold the window's rows of sums, so they bound the window:
// past 5x5 in float32 and 6x6 in 16-bit types they spill or the shared-memory tiles are as fast
// (float32 6x6 82 us here against 79 in tiles; bfloat16 7x7 65 against 70 with 140 bytes
// spilled, 8x8 80 against 64). float64 keeps to the tiles.
constexpr int kMinBlocks = 4;
template <typename scalar_t>
constexpr int kLargestWindow = sizeof(scalar_t) == 2 ? 6 : std::is_same_v<scalar_t, float> ? 5 : 0;
constexpr int kRowsAhead = 2;      // loads in flight per thread ahead of the row it sums
// Rows a prefetch into L2 takes at once (RowQueue): about 1 KB a segment of 32 lanes. On an H200
// (32x64x112x112, 3x3) float32 took 67.5 us without prefetches, 60.8 with runs of 2 rows, 65.6 of
// 4, 76.7 of 8; bfloat16 45.5 without, 41.4 with runs of 2, 38.8 of 4, 43.2 of 8.
template <typename scalar_t>
constexpr int kPrefetchRows = 8 / sizeof(scalar_t);
constexpr int kHaloLanes = 1;      // the row sums of X^2 need a lane's neighbours only

template <typename scalar_t, int kWidth, int kHeight>
__global__ void __launch_bounds__(kSegmentBlockThreads, kMinBlocks)
    register_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, Segments s,
                            Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Group = Stored<scalar_t, kColumns>;
  using Values = Lanes<opmath_t, kColumns>;
  constexpr int kLeft = kWidth / 2, kRight = (kWidth - 1) / 2;  // forward_extent
  constexpr int kTop = kHeight / 2, kBottom = (kHeight - 1) / 2;
  const Place place = locate(s);
  const scalar_t* x = input + place.plane_offset;
  scalar_t* y = output + place.plane_offset;
  const int first_row = place.row0 - kTop;  // read at step 0
  RowQueue<scalar_t, kRowsAhead, kPrefetchRows<scalar_t>> queue(x, s, place, first_row);
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
      const Group current = queue.take(step);
      rows[slot] = current;
      row_sums[slot] = square_row_sums<kLeft, kRight, scalar_t>(current);

      const int out_row = place.row0 + step - (kHeight - 1);
      if (place.writes && step >= kHeight - 1 && out_row < place.row_end) {
        const Values sums = column_window_sum(row_sums, slot);
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
        *reinterpret_cast<Lanes<scalar_t, kColumns>*>(y + out_row * s.width) = out;
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
bool forward_in_registers(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, const Settings& settings,
                          const Coefficients<at::opmath_type<scalar_t>>& k) {
  if (settings.kernel_width != settings.kernel_height || settings.kernel_width > kLargestWindow<scalar_t> ||
      !rows_of_groups<scalar_t>(shape, {&x, &y})) {
    return false;
  }
  bool launched = false;
  with_window_size(settings.kernel_width, std::integer_sequence<int, 2, 3, 4, 5, 6>(), [&](auto size) {
    constexpr int kSize = decltype(size)::value;
    if constexpr (kSize <= kLargestWindow<scalar_t>) {
      launched = launch_over_segments(register_forward_kernel<scalar_t, kSize, kSize>, shape, kHaloLanes, kSize - 1, k,
                                      x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>());
    }
  });
  return launched;
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
