// The gradient for square windows from 2x2 to 9x9 in float32, float16 and bfloat16 over planes
// whose rows are whole groups of four aligned values, with no barrier: the design of
// register_forward.cu, carried one sum further.
//
// dX = dY*P - c*X*M(G) with P = T^-beta and G = dY*X*T^(-beta-1) (docs/definition.md). A thread
// owns four consecutive columns (eight of a 16-bit type up to 5x5 where the rows are whole groups
// of eight: kLargestWide) and walks down a band of rows, one row of X per step. The row's
// squares give, by warp shuffles, their window sums along the row, and the last kh of those rows
// give T of the row kBottom steps up. That row's dY (loaded with a lag of kBottom rows) and X (kept
// since it was read) give its G and P; G's sums along the mirrored window, again by shuffles, and
// the last kh rows of them give M(G) of the row kTop steps further up, which is written with the P
// and X kept for it. X is read once (twice where the rings do not keep it: Rings::kKeepsX) and dY
// once; a thread keeps its rows of X, T's and M(G)'s row sums and P for as many steps as the
// windows reach: in registers for small windows, in its own slots of shared memory beyond (Rings,
// register_rows.cuh). G is taken as 0 outside the plane, whatever T is there; the lanes at a
// segment's ends only lend (see kReach).
#include "register_kernels.h"

#include "powers.cuh"
#include "register_rows.cuh"

#include <algorithm>
#include <numeric>
#include <type_traits>

namespace spatialnorm::cuda {
namespace {

// Up to 9x9 in float32, float16 and bfloat16; float64 keeps to the tiles.
template <typename scalar_t>
constexpr int kLargestWindow = std::is_same_v<at::opmath_type<scalar_t>, float> ? 9 : 0;
// Columns a thread owns: four, or kWideColumns of a 16-bit type up to kLargestWide where the rows
// are whole, aligned groups of eight: one 16-byte load of X and one of dY a row, and a step's fixed
// costs shared among twice the elements. Eight columns keep their rings in shared memory from 3x3
// (Rings), 112 KB a block at 5x5; from 6x6 a block would take more than half a multiprocessor's.
// On an H200 (32x64x112x112, us) four / eight columns took bfloat16 2x2 62.5 / 54.4, 3x3 71.5 /
// 65.4, 4x4 75.7 / 67.0, 5x5 89.6 / 75.7; float16 within 1.5 us of those.
constexpr int kLargestWide = 5;
// Loads of X and of dY in flight per thread ahead of the row it sums: two, one for eight columns
// from 4x4, whose rings leave the fewest registers. On an H200 (32x64x112x112, bfloat16, us), two
// / one: eight columns 2x2 49.0 / 52.2, 3x3 61.5 / 62.8, 4x4 64.1 / 62.4, 5x5 78.5 / 71.8 (the
// loops unrolled to whole turns of the queues, kUnrolled); four columns 6x6 86.1 / 88.1, 8x8
// 90.9 / 93.3. (Three: no faster than two, more registers.)
template <int kColumns, int kSize>
constexpr int kRowsAhead = kColumns == kWideColumns && kSize >= 4 ? 1 : 2;
// Rows a prefetch into L2 takes at once (RowQueue), of X and of dY: 4, and 2 for eight columns from
// 5x5 (1 KB a segment of 32 lanes). On an H200 (32x64x112x112) float32 2x2..5x5 took
// 92.6/109.8/112.0/123.2 us without prefetches, 91.4/90.8/93.4/118.1 with runs of 4 rows (runs of
// 2: 87.3/99.6/101.3/119.3); bfloat16 64.1/68.4/84.9/87.7 without, 61.8/71.7/76.7/89.7 with runs
// of 4 (of 2: 65.9/73.4/81.9/91.1); eight columns of bfloat16 with runs of 4 / 2: 54.4 / 60.0,
// 65.4 / 64.7, 67.0 / 69.6, 78.5 / 75.7; four columns from 6x6 with runs of 4 / 2, float32 6x6..9x9
// 101.3/112.3/110.6/143.1 / 111.1/120.0/123.8/141.1, bfloat16 93.2/108.0/104.2/119.5 /
// 92.7/107.4/109.6/123.1.
template <int kColumns, int kSize>
constexpr int kPrefetchRows = kColumns == kWideColumns && kSize >= 5 ? 2 : 4;
// Steps the loop unrolls: a turn of the rings (kSize steps), and up to 4x4 as many as make whole
// turns of the queues too (RowQueue). From 5x5 an odd window's loop of twice the length lost to the
// queues' copies in float32: on an H200 (32x64x112x112, us) float32 5x5 / 7x7 / 9x9 took 98.3 /
// 105.6 / 134.5 with a turn of the rings, 101.6 / 110.3 / 138.1 with two (bfloat16 7x7 / 9x9 96.4
// / 111.4 and 94.4 / 108.6); at 3x3 two won (89.7 / 86.9, bfloat16 63.2 / 61.5), as whole turns
// did at every even size (float32 2x2 88.8 / 83.5, 8x8 105.7 / 103.3).
template <int kColumns, int kSize>
constexpr int kUnrolled = kSize >= 5 ? kSize : std::lcm(kSize, kRowsAhead<kColumns, kSize>);
// M(G) at a lane's columns needs G up to kSize / 2 columns beyond them, and that G needs T, so
// the squares, as far again: the lanes that twice the reach takes at a segment's ends only lend.
template <int kSize>
constexpr int kReach = 2 * (kSize / 2);

// Blocks of the kernel below a multiprocessor's 228 KB of shared memory hold (kReservedPerBlock
// of it reserved a block) where each takes `bytes`: known when the kernel is compiled.
constexpr int blocks_held(size_t bytes) { return static_cast<int>(228 * 1024 / (bytes + kReservedPerBlock)); }

// A thread's rings: X of the rows read, until their outputs are written; P, until its row's M(G)
// is complete; the column sums of the squares' row sums (T) and of G's. A block of the kernel
// below takes shared_bytes() of shared memory.
template <typename scalar_t, int kColumns, int kSize>
class Rings {
  using Group = Stored<scalar_t, kColumns>;
  using Values = Lanes<at::opmath_type<scalar_t>, kColumns>;

 public:
  // In registers up to 4x4 in float32 and 5x5 in 16-bit types (2x2 for eight columns: 3x3
  // spilled 164 bytes at 128 registers), in shared memory beyond. On an H200 (32x64x112x112,
  // float32 / bfloat16, us), in registers: 4x4 94.1 / 76.9, 5x5 119.1 (84 bytes spilled) / 90.4;
  // in shared memory: 99.5 / 85.9 and 103.7 / 96.4.
  static constexpr int kLargestInRegisters = kColumns == kWideColumns ? 2 : sizeof(scalar_t) == 4 ? 4 : 5;
  static constexpr Storage kIn = kSize <= kLargestInRegisters ? Storage::kRegisters : Storage::kShared;

 private:
  template <int kDepth>
  using XHistory = History<Group, kSize, kDepth, kIn>;
  using PHistory = History<Values, kSize, kSize / 2, kIn>;
  using Sums = ColumnWindowSums<Values, kSize, kIn>;

  // The rings' shared memory a block takes where X is kept kDepth steps.
  template <int kDepth>
  static constexpr size_t bytes_keeping_x() {
    return XHistory<kDepth>::shared_bytes() + PHistory::shared_bytes() + 2 * Sums::shared_bytes();
  }

 public:
  // Whether X is kept until its row is written, or only until its row's T is complete and then
  // loaded again (from L1 or L2) for the output: where keeping it would leave room for one block
  // only. On an H200 float32 9x9 took 195.4 us kept (120 KB a block, one block), 146.9 loaded
  // again (104 KB, two blocks); 8x8 115.7 kept, 130.4 loaded again (two blocks either way).
  // Loading it again where that lets a third block fit lost too: bfloat16 7x7 107.0 -> 118.3 us
  // (80 -> 74 KB a block), float32 6x6 100.7 -> 152.0 (three blocks' 80 registers spilled 100 bytes).
  static constexpr bool kKeepsX = blocks_held(bytes_keeping_x<kSize - 1>()) >= 2;
  static constexpr int kXDepth = kKeepsX ? kSize - 1 : (kSize - 1) / 2;

  XHistory<kXDepth> x;
  PHistory p;
  Sums square_sums;
  Sums g_sums;

  __device__ explicit Rings(unsigned char*& free_shared)
      : x(free_shared), p(free_shared), square_sums(free_shared), g_sums(free_shared) {}

  static constexpr size_t shared_bytes() { return bytes_keeping_x<kXDepth>(); }

  // Blocks per multiprocessor the registers must admit: with the rings in registers three (80
  // registers a thread) where they fit without spilling (16-bit types at 2x2; float32 2x2 and
  // 16-bit 3x3 spilled 16-40 bytes once the rows' addresses were kept whole), else two (128); in
  // shared memory as many as it holds, at most three. Eight columns: two (three spilled 88 bytes
  // at 3x3, 296 at 2x2).
  static constexpr int min_blocks() {
    if constexpr (kColumns == kWideColumns) {
      return 2;
    } else if constexpr (kIn == Storage::kShared) {
      return std::min(blocks_held(shared_bytes()), 3);
    } else {
      return sizeof(scalar_t) == 2 && kSize <= 2 ? 3 : 2;
    }
  }
};

template <typename scalar_t, int kColumns, int kSize>
__global__ void __launch_bounds__(kSegmentBlockThreads, Rings<scalar_t, kColumns, kSize>::min_blocks())
    register_backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                             scalar_t* __restrict__ grad_input, Segments s, Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Group = Stored<scalar_t, kColumns>;
  using Values = Lanes<opmath_t, kColumns>;
  constexpr int kBefore = kSize / 2, kAfter = (kSize - 1) / 2;  // W's extent; M's is its mirror image
  constexpr int kLag = kSize - 1;                                 // steps from reading a row to writing it
  constexpr int kPrefetch = kPrefetchRows<kColumns, kSize>;
  constexpr int kAhead = kRowsAhead<kColumns, kSize>;
  constexpr int kSteps = kUnrolled<kColumns, kSize>;
  const Place place = locate<kColumns>(s);
  const scalar_t* x = input + place.plane_offset;
  const scalar_t* dy = grad_output + place.plane_offset;
  scalar_t* dx = grad_input + place.plane_offset;
  // The row of X read at step 0; T and G of row r are made at step r - first_row + kAfter.
  const int first_row = place.row0 - kLag;
  RowQueue<scalar_t, kColumns, kAhead, kPrefetch, kSteps> x_rows(x, s, place, first_row);
  // dY of the row whose T a step makes, from the first that makes one.
  RowQueue<scalar_t, kColumns, kAhead, kPrefetch, kSteps, kLag> dy_rows(dy, s, place, first_row - kAfter);
  using KernelRings = Rings<scalar_t, kColumns, kSize>;
  // X of the row a step writes, where the rings do not keep it (made by a lambda so that kernels
  // whose rings keep X build no queue: its prefetches, asm volatile, would stay).
  [[maybe_unused]] auto x_again = [&] {
    if constexpr (KernelRings::kKeepsX) {
      return 0;
    } else {
      return RowQueue<scalar_t, kColumns, kAhead, kPrefetch, kSteps, 2 * kLag>(x, s, place, first_row - kLag);
    }
  }();
  extern __shared__ __align__(16) unsigned char shared[];
  unsigned char* free_shared = shared;
  KernelRings rings(free_shared);
  for (int base = 0; base < s.steps; base += kSteps) {
#pragma unroll
    for (int unrolled = 0; unrolled < kSteps; ++unrolled) {
      const int step = base + unrolled;
      const int slot = unrolled % kSize;
      if (step >= s.steps) {  // the same for every lane
        break;
      }
      const Group current = x_rows.take(step);
      const Group current_dy = dy_rows.take(step);
      const Group t_group = rings.x.before(slot, kAfter, current);
      Group out_group;
      if constexpr (KernelRings::kKeepsX) {
        out_group = rings.x.before(slot, kLag, current);
      } else {
        out_group = x_again.take(step);
      }
      rings.x.push(slot, current);
      rings.square_sums.push(slot, square_row_sums<kBefore, kAfter, scalar_t, kColumns>(current));
      if (step < kLag) {  // the same for every lane: T's window is not complete yet
        continue;
      }
      const Values sums = rings.square_sums.window_sum(slot);
      const int t_row = first_row + step - kAfter;
      const Values values = widen<scalar_t, kColumns>(t_group);
      const Values dy_values = widen<scalar_t, kColumns>(current_dy);
      Values g, dy_p;
      const auto make_terms = [&](auto powers) {
#pragma unroll
        for (int e = 0; e < kColumns; ++e) {
          const PowerBase<opmath_t> t = denominator(k, sums.v[e]);
          g.v[e] = powers(dy_values.v[e] * values.v[e], t, k.g_exponent);
          dy_p.v[e] = powers(dy_values.v[e], t, k.neg_beta);
        }
        return powers.missed;
      };
      if (make_terms(FastPowers())) {
        make_terms(ExactPowers());
      }
      if (!place.reads || t_row < 0 || t_row >= s.height) {
        g = 0;
      }
      const Values out_p = rings.p.before(slot, kBefore, dy_p);
      rings.p.push(slot, dy_p);
      rings.g_sums.push(slot, row_window_sums<kAfter, kBefore>(g));

      const int out_row = place.row0 + step - 2 * kLag;
      if (place.writes && step >= 2 * kLag && out_row < place.row_end) {
        const Values g_sum = rings.g_sums.window_sum(slot);
        const Values out_values = widen<scalar_t, kColumns>(out_group);
        Lanes<scalar_t, kColumns> out;
#pragma unroll
        for (int e = 0; e < kColumns; ++e) {
          out.v[e] = static_cast<scalar_t>(gradient_of_input(k, out_p.v[e], out_values.v[e], g_sum.v[e]));
        }
        *reinterpret_cast<Lanes<scalar_t, kColumns>*>(plane_row(dx, s, out_row)) = out;
      }
    }
  }
}

// Launches the kernel for the window size with threads of kColumns columns, if it has one.
template <typename scalar_t, int kColumns>
bool launch_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                     int64_t size, const Coefficients<at::opmath_type<scalar_t>>& k) {
  constexpr int kLargest = kColumns == kWideColumns ? kLargestWide : kLargestWindow<scalar_t>;
  return with_window_size<kLargest>(size, [&](auto size) {
    constexpr int kSize = decltype(size)::value;
    return launch_over_segments(register_backward_kernel<scalar_t, kColumns, kSize>, shape, kColumns, kReach<kSize>,
                                2 * (kSize - 1), Rings<scalar_t, kColumns, kSize>::shared_bytes(), k,
                                dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                dx.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

template <typename scalar_t>
bool backward_in_registers(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                           const Settings& settings, const Coefficients<at::opmath_type<scalar_t>>& k) {
  if (settings.kernel_width != settings.kernel_height || settings.kernel_width > kLargestWindow<scalar_t>) {
    return false;
  }
  return launch_with_columns<scalar_t>(shape, {&dy, &x, &dx}, settings.kernel_width <= kLargestWide, [&](auto columns) {
    return launch_backward<scalar_t, decltype(columns)::value>(dy, x, dx, shape, settings.kernel_width, k);
  });
}

template bool backward_in_registers<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const PlaneShape&, const Settings&, const Coefficients<float>&);
template bool backward_in_registers<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const PlaneShape&, const Settings&, const Coefficients<double>&);
template bool backward_in_registers<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const PlaneShape&, const Settings&, const Coefficients<float>&);
template bool backward_in_registers<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const PlaneShape&, const Settings&, const Coefficients<float>&);

}  // namespace spatialnorm::cuda
