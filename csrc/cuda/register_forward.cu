// The forward for square windows from 2x2 to 17x17 in float32, float16 and bfloat16 over planes
// whose rows are whole groups of four aligned values, with no barrier.
//
// A thread owns four consecutive columns of a plane (eight of a 16-bit type up to 11x11 where the
// rows are whole groups of eight: kLargestWide) and walks down a band of rows, one row per step.
// It loads the row's values once (16 bytes; 8 for four columns of a 16-bit type), squares them
// and keeps their window sums down the columns over the last kh rows (ColumnWindowSums); those
// sums' window sums along the row, with the ones its neighbours lend it (warp shuffles: a window
// reaches at most eight columns, one or two lanes, beyond a thread's own), are the window sums of
// the row kh - 1 steps up, whose output it then writes from that row's values, also kept (reading
// them again, even from L1, left the warps waiting on the loads most of the time). Small windows
// keep these rings in registers (kRingsIn), taller ones in the thread's own slots of shared
// memory, whose column sums go by blocks (register_rows.cuh). Threads side by side along a row
// form a segment of a warp; the lanes at its ends that a window reaches past (one on each side,
// two beyond 9x9 for four columns) only lend their sums, so that every output has all its
// neighbours. Each sum is made of its own window's terms only, as everywhere in the package
// (docs/definition.md, "Exactness").
#include "register_kernels.h"

#include "powers.cuh"
#include "register_rows.cuh"

#include <type_traits>
#include <utility>

namespace spatialnorm::cuda {
namespace {

// Up to 17x17 in float32, float16 and bfloat16; float64 keeps to the tiles.
template <typename scalar_t>
constexpr int kLargestWindow = std::is_same_v<at::opmath_type<scalar_t>, float> ? 17 : 0;
// Columns a thread owns: four, or kWideColumns of a 16-bit type up to kLargestWide where the rows are
// whole, aligned groups of eight. Eight make one 16-byte load a row, as float32's four do, and
// share every cost a step bears (the loop, the row's address and tests, the shuffles, the
// store) among twice the elements. On an H200 (32x64x112x112, bfloat16, us) four / eight columns
// took 3x3 38.8 / 34.6, 5x5 42.5 / 37.5, 7x7 45.9 / 41.3, 9x9 50.4 / 46.1, 11x11 56.8 / 50.5,
// 12x12 60.2 / 69.0: past 11x11 a block's rings of eight columns take more than half a
// multiprocessor's shared memory (11x11 108 KB, 12x12 116 KB), which then holds one block.
constexpr int kLargestWide = 11;
// Blocks per multiprocessor the registers must admit: four (64 registers a thread), three (80)
// for eight columns from 6x6 on. Without a bound the float32 5x5 forward took 77 registers and 82
// us instead of 74 (H200, 32x64x112x112): fewer warps left the loads' latency exposed. With the
// rings of tall windows in shared memory nothing spills up to 17x17 (float32 9x9 takes 52 KB a
// block, 17x17 100 KB: two blocks). On an H200 (32x64x112x112, float32 / bfloat16) the tiles
// took 78.0 / 66.6 us at 9x9 and 108.2 / 96.2 at 17x17, this kernel 62.5 / 53.6 and 98.9 /
// 79.4; eight columns of bfloat16 with four / three blocks 7x7 43.0 / 41.8, 9x9 51.0 / 50.0 (runs
// of two rows' prefetches).
template <int kColumns, int kHeight>
constexpr int kMinBlocks = kColumns == kWideColumns && kHeight >= 6 ? 3 : 4;
// Loads in flight per thread ahead of the row it sums: one, the next row's. With the rows
// prefetched into L2 a step's work covers the load, and a second load in flight took four to eight
// registers, which the larger windows missed: on an H200 (32x64x112x112, float32 / bfloat16, us)
// two / one took 3x3 59.9 / 59.4 and 34.2 / 33.3, 5x5 60.9 / 60.1 and 37.2 / 36.1, 9x9 63.2 / 62.0
// and 44.3 / 43.5, 13x13 86.1 / 75.1 and 60.2 / 58.7, 17x17 94.3 / 83.6 and 75.4 / 73.2 (three,
// for eight columns of bfloat16, had been 1-6 us slower than two from 3x3 to 9x9).
constexpr int kRowsAhead = 1;
// Rows a prefetch into L2 takes at once (RowQueue): about 1 KB a segment of 32 lanes, 2 KB for
// eight columns from 6x6 on. On an H200 (32x64x112x112, 3x3) float32 took 67.5 us without
// prefetches, 60.8 with runs of 2 rows, 65.6 of 4, 76.7 of 8; bfloat16 45.5 without, 41.4 with
// runs of 2, 38.8 of 4, 43.2 of 8. Eight columns of bfloat16, runs of 2 / 4: 3x3 34.3 / 36.7,
// 5x5 37.8 / 38.3, 6x6 40.9 / 39.5, 8x8 48.4 / 43.5, 9x9 50.6 / 47.4.
template <typename scalar_t, int kColumns, int kHeight>
constexpr int kPrefetchRows =
    (kColumns == kWideColumns && kHeight >= 6 ? 2048 : 1024) / (32 * sizeof(scalar_t) * kColumns);
// Columns a window reaches beyond a thread's own on either side (kLeft, at least kRight): the lanes
// they take at a segment's ends only lend their column sums to the sums along the row.
template <int kWidth>
constexpr int kReach = kWidth / 2;

// Where a thread's rings lie: in registers where the column sums' ring takes fewer than 20 (four
// columns up to 4x4, eight at 2x2; float32 5x5 in registers spilled 40 bytes, 63.1 us against
// 60.8 in shared memory). On an H200 (32x64x112x112, float32 / bfloat16, us) the rings
// of 6x6 in registers took 75.3 / 45.1 with two blocks a multiprocessor and none spilled, 7x7 76.7
// / 52.0; in shared memory, four blocks: 60.9 / 44.2 and 61.5 / 46.2. At 3x3 shared memory lost
// (62.5 / 41.5 against 60.6 / 39.9), but won for eight columns of bfloat16 (35.0 against 37.3 in
// registers with three blocks).
template <int kHeight, int kColumns>
constexpr Storage kRingsIn = kHeight * kColumns < 20 ? Storage::kRegisters : Storage::kShared;

// A thread's rings; a block of the kernel below takes shared_bytes() of shared memory.
template <typename scalar_t, int kColumns, int kHeight>
struct Rings {
  static constexpr Storage kIn = kRingsIn<kHeight, kColumns>;
  ColumnWindowSums<Lanes<at::opmath_type<scalar_t>, kColumns>, kHeight, kIn> column_sums;  // of the squares
  // Read rows, written kBottom steps later.
  History<Stored<scalar_t, kColumns>, kHeight, (kHeight - 1) / 2, kIn> rows;

  __device__ explicit Rings(unsigned char*& free_shared) : column_sums(free_shared), rows(free_shared) {}

  static constexpr size_t shared_bytes() {
    return decltype(column_sums)::shared_bytes() + decltype(rows)::shared_bytes();
  }
};

template <typename scalar_t, int kColumns, int kWidth, int kHeight>
__global__ void __launch_bounds__(kSegmentBlockThreads, kMinBlocks<kColumns, kHeight>)
    register_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, Segments s,
                            Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Group = Stored<scalar_t, kColumns>;
  using Values = Lanes<opmath_t, kColumns>;
  constexpr int kLeft = kWidth / 2, kRight = (kWidth - 1) / 2;  // forward_extent
  constexpr int kTop = kHeight / 2, kBottom = (kHeight - 1) / 2;
  constexpr int kLag = kHeight - 1;  // steps from reading a row to writing the one kBottom rows up
  const Place place = locate<kColumns>(s);
  const scalar_t* x = input + place.plane_offset;
  scalar_t* y = output + place.plane_offset;
  RowQueue<scalar_t, kColumns, kRowsAhead, kPrefetchRows<scalar_t, kColumns, kHeight>, kHeight> queue(
      x, s, place, place.row0 - kTop);
  extern __shared__ __align__(16) unsigned char shared[];
  unsigned char* free_shared = shared;
  Rings<scalar_t, kColumns, kHeight> rings(free_shared);
  for (int base = 0; base < s.steps; base += kHeight) {
#pragma unroll
    for (int slot = 0; slot < kHeight; ++slot) {
      const int step = base + slot;
      if (step >= s.steps) {  // the same for every lane
        break;
      }
      const Group current = queue.take(step);
      const Group out_group = rings.rows.before(slot, kBottom, current);
      rings.rows.push(slot, current);
      rings.column_sums.push(slot, squares_of<scalar_t, kColumns>(current));
      if (step < kLag) {  // the same for every lane
        continue;
      }
      const Values sums = row_window_sums<kLeft, kRight>(rings.column_sums.window_sum(slot));
      const int out_row = place.row0 + step - kLag;
      if (place.writes && out_row < place.row_end) {
        const Values values = widen<scalar_t, kColumns>(out_group);
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
        *reinterpret_cast<Lanes<scalar_t, kColumns>*>(plane_row(y, s, out_row)) = out;
      }
    }
  }
}

// Launches the kernel for the window size with threads of kColumns columns, if it has one.
template <typename scalar_t, int kColumns>
bool launch_forward(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, int64_t size,
                    const Coefficients<at::opmath_type<scalar_t>>& k) {
  constexpr int kLargest = kColumns == kWideColumns ? kLargestWide : kLargestWindow<scalar_t>;
  return with_window_size<kLargest>(size, [&](auto size) {
    constexpr int kSize = decltype(size)::value;
    return launch_over_segments(register_forward_kernel<scalar_t, kColumns, kSize, kSize>, shape, kColumns,
                                kReach<kSize>, kSize - 1, Rings<scalar_t, kColumns, kSize>::shared_bytes(), k,
                                x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

template <typename scalar_t>
bool forward_in_registers(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, const Settings& settings,
                          const Coefficients<at::opmath_type<scalar_t>>& k) {
  if (settings.kernel_width != settings.kernel_height || settings.kernel_width > kLargestWindow<scalar_t>) {
    return false;
  }
  return launch_with_columns<scalar_t>(shape, {&x, &y}, settings.kernel_width <= kLargestWide, [&](auto columns) {
    return launch_forward<scalar_t, decltype(columns)::value>(x, y, shape, settings.kernel_width, k);
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
