// The gradient for the common windows (square, small: kLargestWindow) over planes whose rows are
// whole groups of four aligned values, with no shared memory and no barrier: the design of
// register_forward.cu, carried one sum further.
//
// dX = dY*P - c*X*M(G) with P = T^-beta and G = dY*X*T^(-beta-1) (docs/definition.md). A thread
// owns four consecutive columns and walks down a band of rows, one row of X per step. The row's
// squares give, by warp shuffles, their window sums along the row, and the last kh of those rows
// give T of the row kBottom steps up. That row's dY (loaded with a lag of kBottom rows) and X (kept
// since it was read) give its G and P; G's sums along the mirrored window, again by shuffles, and
// the last kh rows of them give M(G) of the row kTop steps further up, which is written with the P
// and X kept for it. X is read once and dY once; a thread's rows of X, T's and M(G)'s row sums
// and P stay in registers for as many steps as the windows reach. G is taken as 0 outside the
// plane, whatever T is there; a segment's first and last lanes only lend (see kHaloLanes).
#include "register_kernels.h"

#include "powers.cuh"
#include "register_rows.cuh"

#include <type_traits>
#include <utility>

namespace spatialnorm::cuda {
namespace {

// Blocks per multiprocessor the registers must admit: three (80 registers a thread) where the
// rings fit them without spilling, else two (128).
template <typename scalar_t, int kSize>
constexpr int kMinBlocks = (sizeof(scalar_t) == 2 ? kSize <= 3 : kSize <= 2) ? 3 : 2;
// Up to 5x5 in float32, float16 and bfloat16 (past that a lane's T and G need more than one
// neighbour; at 5x5 float32 spills 96 bytes and still takes 123 us against the tiles' 179 on an
// H200, 32x64x112x112); float64 keeps to the tiles.
template <typename scalar_t>
constexpr int kLargestWindow = std::is_same_v<at::opmath_type<scalar_t>, float> ? 5 : 0;
// Loads of X and of dY in flight per thread ahead of the row it sums (three: no faster, more
// registers).
constexpr int kRowsAhead = 2;
// Rows a prefetch into L2 takes at once (RowQueue), of X and of dY. On an H200 (32x64x112x112)
// float32 2x2..5x5 took 92.6/109.8/112.0/123.2 us without prefetches, 91.4/90.8/93.4/118.1 with
// runs of 4 rows (runs of 2: 87.3/99.6/101.3/119.3); bfloat16 64.1/68.4/84.9/87.7 without,
// 61.8/71.7/76.7/89.7 with runs of 4 (of 2: 65.9/73.4/81.9/91.1).
constexpr int kPrefetchRows = 4;
// M(G) needs the G of a lane's neighbours, but only at their kAfter (left) or kBefore (right)
// columns nearest to it, whose T needs no squares beyond that neighbour's and the lane's own while
// the window spans at most kColumns + 1 columns: one halo lane on each side is enough.
constexpr int kHaloLanes = 1;

template <typename scalar_t, int kSize>
__global__ void __launch_bounds__(kSegmentBlockThreads, kMinBlocks<scalar_t, kSize>)
    register_backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                             scalar_t* __restrict__ grad_input, Segments s, Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Group = Stored<scalar_t, kColumns>;
  using Values = Lanes<opmath_t, kColumns>;
  constexpr int kBefore = kSize / 2, kAfter = (kSize - 1) / 2;  // W's extent; M's is its mirror image
  constexpr int kLag = kSize - 1;                                 // steps from reading a row to writing it
  static_assert(kSize <= kColumns + 1, "one halo lane on each side (kHaloLanes)");
  const Place place = locate(s);
  const scalar_t* x = input + place.plane_offset;
  const scalar_t* dy = grad_output + place.plane_offset;
  scalar_t* dx = grad_input + place.plane_offset;
  const int first_row = place.row0 - kLag;  // of X, read at step 0; T and G of row r are made at step r - first_row + kAfter
  RowQueue<scalar_t, kRowsAhead, kPrefetchRows> x_rows(x, s, place, first_row);
  // dY of the row whose T a step makes, from the first that makes one.
  RowQueue<scalar_t, kRowsAhead, kPrefetchRows, kLag> dy_rows(dy, s, place, first_row - kAfter);
  // Rings: row j of the band's X, read at step j, in slot j % kSize as loaded, and its squares'
  // window sums along the row; the P of the row whose T step j makes, and its G's sums along the
  // mirrored window.
  static_assert(!kRingsInShared<kSize>, "launched without shared memory: the rings are in registers");
  unsigned char* unused_shared = nullptr;  // taken by rings in shared memory only
  Group rows[kSize] = {};
  Values p[kSize] = {};
  ColumnWindowSums<Values, kSize> square_sums(unused_shared);
  ColumnWindowSums<Values, kSize> g_sums(unused_shared);
  for (int base = 0; base < s.steps; base += kSize) {
#pragma unroll
    for (int slot = 0; slot < kSize; ++slot) {
      const int step = base + slot;
      if (step >= s.steps) {  // the same for every lane
        break;
      }
      const Group current = x_rows.take(step);
      const Group current_dy = dy_rows.take(step);
      rows[slot] = current;
      square_sums.push(slot, square_row_sums<kBefore, kAfter, scalar_t>(current));
      if (step < kLag) {  // the same for every lane: T's window is not complete yet
        continue;
      }
      const Values sums = square_sums.window_sum(slot);
      const int t_row = first_row + step - kAfter;
      const Values values = widen<scalar_t, kColumns>(rows[(slot + kSize - kAfter) % kSize]);
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
      p[slot] = dy_p;
      g_sums.push(slot, row_window_sums<kAfter, kBefore>(g));

      const int out_row = place.row0 + step - 2 * kLag;
      if (place.writes && step >= 2 * kLag && out_row < place.row_end) {
        const Values g_sum = g_sums.window_sum(slot);
        const Values out_values = widen<scalar_t, kColumns>(rows[(slot + 1) % kSize]);
        const Values& out_p = p[(slot + kSize - kBefore) % kSize];
        Lanes<scalar_t, kColumns> out;
#pragma unroll
        for (int e = 0; e < kColumns; ++e) {
          out.v[e] = static_cast<scalar_t>(gradient_of_input(k, out_p.v[e], out_values.v[e], g_sum.v[e]));
        }
        *reinterpret_cast<Lanes<scalar_t, kColumns>*>(dx + out_row * s.width) = out;
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
bool backward_in_registers(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                           const Settings& settings, const Coefficients<at::opmath_type<scalar_t>>& k) {
  if (settings.kernel_width != settings.kernel_height || settings.kernel_width > kLargestWindow<scalar_t> ||
      !rows_of_groups<scalar_t>(shape, {&dy, &x, &dx})) {
    return false;
  }
  bool launched = false;
  with_window_size(settings.kernel_width, std::integer_sequence<int, 2, 3, 4, 5, 6>(), [&](auto size) {
    constexpr int kSize = decltype(size)::value;
    if constexpr (kSize <= kLargestWindow<scalar_t>) {
      launched = launch_over_segments(register_backward_kernel<scalar_t, kSize>, shape, kHaloLanes, 2 * (kSize - 1), 0, k,
                                      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                      dx.mutable_data_ptr<scalar_t>());
    }
  });
  return launched;
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
