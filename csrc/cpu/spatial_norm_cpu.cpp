// CPU kernels of spatialnorm::forward and spatialnorm::backward.
//
// Work is split into bands of rows of the (N*C) image planes, processed in parallel; each band
// takes its window sums whole (window_sums.h), at a cost per element about the same for every
// window past 10 columns and 8 rows. 16-bit types and float32 raise powers in float32 precision. Their
// window sums, T and products are float32 first, and a band where any of them left float's
// normal range is computed again with window sums, T and products in double (power.h), so that
// nothing overflows or underflows where the exact result does not; float64 is double throughout.
#include "../spatial_norm.h"
#include "power.h"
#include "vectorized.h"
#include "window_sums.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

namespace spatialnorm::cpu {
namespace {

// Rows [row_begin, row_end) of one image plane.
struct Band {
  int64_t plane;
  int64_t row_begin;
  int64_t row_end;
};

// Splits the planes into bands of rows: whole planes when there are enough of them to keep
// every thread busy, otherwise each plane in a few bands. A band re-reads the rows its first
// windows reach, so bands stay several windows tall; and a band holds a few doubles per element
// while it runs, so large planes are cut into bands of at most about kElementsPerBand elements.
class Bands {
 public:
  Bands(PlaneShape shape, int64_t kernel_height) : shape_(shape) {
    const int64_t threads = at::get_num_threads();
    const int64_t wanted = shape.planes >= threads ? 1 : (threads + shape.planes - 1) / shape.planes;
    const int64_t window_rows = std::min(kernel_height, shape.height);
    const int64_t shortest = std::max<int64_t>(4 * window_rows, 16);
    const int64_t tallest_useful = std::max<int64_t>(1, shape.height / shortest);
    const int64_t rows_in_budget = std::max(shortest, kElementsPerBand / shape.width);
    per_plane_ = std::max(std::min(wanted, tallest_useful), (shape.height + rows_in_budget - 1) / rows_in_budget);
  }

  int64_t count() const { return shape_.planes * per_plane_; }

  Band operator[](int64_t index) const {
    const int64_t plane = index / per_plane_;
    const int64_t part = index % per_plane_;
    return {plane, shape_.height * part / per_plane_, shape_.height * (part + 1) / per_plane_};
  }

 private:
  static constexpr int64_t kElementsPerBand = int64_t{1} << 18;

  PlaneShape shape_;
  int64_t per_plane_;
};

// Images smaller than this run on the calling thread: waking the others costs more than the work
// (microseconds when idle, milliseconds on a loaded machine). An element costs several times what
// one of ATen's elementwise ops does, hence a grain a few times smaller than at::internal::GRAIN_SIZE.
constexpr int64_t kGrainElements = 8192;

// Runs fn(begin, end) over [0, count) in batches that the threads claim from a shared counter:
// a thread the machine slows down takes fewer batches instead of holding the others up. Images of
// fewer than kGrainElements run inline.
template <typename Fn>
void parallel_batches(int64_t count, int64_t elements, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  if (elements < kGrainElements) {
    fn(0, count);
    return;
  }
  const int64_t batch = std::max<int64_t>(1, count / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(batch); begin < count; begin = next.fetch_add(batch)) {
      fn(begin, std::min(count, begin + batch));
    }
  });
}

// T from a window sum of X^2 (delta alone when alpha is 0, whatever the window holds).
template <typename T>
struct Denominator {
  explicit Denominator(const Settings& s)
      : delta(static_cast<T>(s.delta)), scale(static_cast<T>(s.alpha / s.window_size())) {}

  T operator()(T sum) const { return scale == 0 ? delta : delta + scale * sum; }

  T delta;
  T scale;  // alpha / (kw * kh)
};

// dX = dY * T^-beta - gradient_scale * X * (mirrored window sum of G), from double sums.
template <typename scalar_t>
SPATIALNORM_VECTORIZED_APART
bool gradient_output(double gradient_scale, const scalar_t* __restrict x, const double* __restrict first,
                     const double* __restrict g_sums, scalar_t* __restrict dx, int64_t count) {
  // Vectorized, but for bfloat16 on aarch64, where clang's cost model keeps the conversion scalar.
  for (int64_t c = 0; c < count; ++c) {
    // With alpha = 0 the second term is 0, even where G overflowed.
    const double second = gradient_scale == 0.0 ? 0.0 : gradient_scale * static_cast<double>(x[c]) * g_sums[c];
    dx[c] = static_cast<scalar_t>(first[c] - second);
  }
  return true;
}

// Likewise from float32 sums, in float32; false where a product may have left float's normal
// range (but for exact zeros), by the ranges of its factors.
template <typename scalar_t>
SPATIALNORM_VECTORIZED_APART
bool gradient_output(float gradient_scale, const scalar_t* __restrict x, const float* __restrict first,
                     const float* __restrict g_sums, scalar_t* __restrict dx, int64_t count) {
  MagnitudeRange x_range, g_range;
  for (int64_t c = 0; c < count; ++c) {  // vectorizes
    const float xf = static_cast<float>(x[c]);
    x_range.add(xf);
    g_range.add(g_sums[c]);
    // With alpha = 0 the second term is 0, even where G overflowed.
    dx[c] = static_cast<scalar_t>(first[c] - (gradient_scale == 0.0f ? 0.0f : gradient_scale * (xf * g_sums[c])));
  }
  MagnitudeRange scale_range;
  scale_range.add(gradient_scale);
  return gradient_scale == 0.0f || (products_fit({x_range, g_range}) && products_fit({x_range, g_range, scale_range}));
}

// The per-element arithmetic of both kernels for one compute type, over spans of elements, from
// the window sums of X^2: T = delta + alpha / (kw * kh) * (window sum), then
//   forward:  Y = X * T^-beta
//   gradient: dY * T^-beta (the first term of dX), and G = dY * X * T^(-beta-1) for the window
//             sums of the second, dX = dY * T^-beta - gradient_scale * X * (mirrored sum of G).
// Each is exact where the exact value is finite (power.h). Each returns false where the span must be
// computed again from double sums.
template <typename opmath_t>
class Arithmetic;

// float32 precision powers, vectorized. From double sums, a span is computed in float32 first, with
// the fast power for the exponent (QuarterPower or RootPower where they apply, LogExpPower
// otherwise); where any element's T or power left float's normal range (by the range of T the loop
// saw, after it), the span is computed again with double-range powers. From float32 sums
// everything is float32, and a span where anything left float's normal range returns false.
template <>
class Arithmetic<float> {
 public:
  explicit Arithmetic(const Settings& s)
      : denominator_(s),
        float_denominator_(s),
        float_power_(QuarterPower<false>::applies(-s.beta)  ? FloatPower::kWhole
                     : RootPower::applies(-s.beta)          ? FloatPower::kRoot
                     : QuarterPower<true>::applies(-s.beta) ? FloatPower::kQuarter
                                                            : FloatPower::kLogExp),
        whole_power_(-s.beta),
        root_power_(-s.beta),
        quarter_power_(-s.beta),
        log_exp_power_(-s.beta),
        wide_power_(-s.beta),
        wide_power_over_t_(-s.beta - 1.0),
        exponent_(-s.beta),
        float_sums_apply_(float_sums_suffice(s)) {}

  // Whether the settings let a band go in float32 first (FloatFirst).
  bool float_sums_apply() const { return float_sums_apply_; }

  template <typename scalar_t>
  SPATIALNORM_VECTORIZED_APART
  bool forward(const scalar_t* __restrict x, const double* __restrict sums, scalar_t* __restrict y,
               int64_t count) const {
    const bool fits = with_float_power([&](const auto& power) { return forward_in_float(power, x, sums, y, count); });
    if (!fits) {
      for (int64_t c = 0; c < count; ++c) {  // vectorizes
        y[c] = static_cast<scalar_t>(static_cast<double>(x[c]) * wide_power_(denominator_(sums[c])));
      }
    }
    return true;
  }

  template <typename scalar_t>
  SPATIALNORM_VECTORIZED_APART
  bool forward(const scalar_t* __restrict x, const float* __restrict sums, scalar_t* __restrict y,
               int64_t count) const {
    return with_float_power([&](const auto& power) {
      BaseRange t_range;
      for (int64_t c = 0; c < count; ++c) {  // vectorizes
        const float t = float_denominator_(sums[c]);
        t_range.add(t);
        y[c] = static_cast<scalar_t>(static_cast<float>(x[c]) * power(t));
      }
      return power.fits(t_range, false);
    });
  }

  template <typename scalar_t>
  SPATIALNORM_VECTORIZED_APART
  bool gradient_terms(const scalar_t* __restrict dy, const scalar_t* __restrict x, const double* __restrict sums,
                      double* __restrict first, double* __restrict g, int64_t count) const {
    const bool fits = with_float_power(
        [&](const auto& power) { return gradient_terms_in_float(power, dy, x, sums, first, g, count); });
    if (!fits) {
      for (int64_t c = 0; c < count; ++c) {  // vectorizes
        const double dyd = static_cast<double>(dy[c]);
        const double t = denominator_(sums[c]);
        first[c] = dyd * wide_power_(t);
        g[c] = dyd * static_cast<double>(x[c]) * wide_power_over_t_(t);
      }
    }
    return true;
  }

  // Also checks that no dY * T^-beta overflowed and that no product in G left float's normal range
  // but for exact zeros: by the ranges of the factors, a bound on every product.
  template <typename scalar_t>
  SPATIALNORM_VECTORIZED_APART
  bool gradient_terms(const scalar_t* __restrict dy, const scalar_t* __restrict x, const float* __restrict sums,
                      float* __restrict first, float* __restrict g, int64_t count) const {
    return with_float_power([&](const auto& power) {
      BaseRange t_range;
      MagnitudeRange dy_range, x_range;
      for (int64_t c = 0; c < count; ++c) {  // vectorizes
        const float t = float_denominator_(sums[c]);
        t_range.add(t);
        float p_over_t;
        const float p = power(t, p_over_t);
        const float dyf = static_cast<float>(dy[c]);
        const float xf = static_cast<float>(x[c]);
        dy_range.add(dyf);
        x_range.add(xf);
        first[c] = dyf * p;
        g[c] = dyf * xf * p_over_t;
      }
      if (!power.fits(t_range, true)) {
        return false;
      }
      const PowerRange p_range(t_range, exponent_);
      const PowerRange over_t_range(t_range, exponent_ - 1.0);
      return dy_range.greatest() * p_range.magnitudes.greatest() <= std::numeric_limits<float>::max() &&
             products_fit({dy_range, x_range}) && products_fit({dy_range, x_range, over_t_range.magnitudes});
    });
  }

 private:
  template <typename Power, typename scalar_t>
  bool forward_in_float(const Power& power, const scalar_t* __restrict x, const double* __restrict sums,
                        scalar_t* __restrict y, int64_t count) const {
    BaseRange t_range;
    for (int64_t c = 0; c < count; ++c) {  // vectorizes
      const float t = static_cast<float>(denominator_(sums[c]));
      t_range.add(t);
      y[c] = static_cast<scalar_t>(static_cast<float>(x[c]) * power(t));
    }
    return power.fits(t_range, false);
  }

  template <typename Power, typename scalar_t>
  bool gradient_terms_in_float(const Power& power, const scalar_t* __restrict dy, const scalar_t* __restrict x,
                               const double* __restrict sums, double* __restrict first, double* __restrict g,
                               int64_t count) const {
    BaseRange t_range;
    for (int64_t c = 0; c < count; ++c) {  // vectorizes
      const float t = static_cast<float>(denominator_(sums[c]));
      t_range.add(t);
      float p_over_t;
      const float p = power(t, p_over_t);
      const double dyd = static_cast<double>(dy[c]);
      first[c] = dyd * static_cast<double>(p);
      g[c] = dyd * static_cast<double>(x[c]) * static_cast<double>(p_over_t);
    }
    return power.fits(t_range, true);
  }

  // Whether float32 window sums of float32 squares give T to float accuracy whatever the data, once
  // the band's sums are finite: squares below float's normal range lose at most 2^-150 each, which
  // T = delta + alpha / (kw * kh) * (sum) scales to alpha * 2^-150, negligible against delta from
  // alpha * 2^-110; delta and the scales must be normal floats themselves.
  static bool float_sums_suffice(const Settings& s) {
    const auto normal_or_zero = [](double v) {
      const double magnitude = std::fabs(static_cast<double>(static_cast<float>(v)));
      return v == 0.0 || (magnitude >= std::numeric_limits<float>::min() && magnitude <= std::numeric_limits<float>::max());
    };
    return s.delta > 0.0 && normal_or_zero(s.delta) && s.delta >= s.alpha * 0x1p-110 &&
           normal_or_zero(s.alpha / s.window_size()) && normal_or_zero(2.0 * s.alpha * s.beta / s.window_size());
  }

  // fn(power) with the fastest float32 power that applies to the exponent.
  template <typename Fn>
  bool with_float_power(const Fn& fn) const {
    switch (float_power_) {
      case FloatPower::kWhole: return fn(whole_power_);
      case FloatPower::kRoot: return fn(root_power_);
      case FloatPower::kQuarter: return fn(quarter_power_);
      default: return fn(log_exp_power_);
    }
  }

  enum class FloatPower { kWhole, kRoot, kQuarter, kLogExp };

  Denominator<double> denominator_;
  Denominator<float> float_denominator_;
  FloatPower float_power_;  // chosen once per call
  QuarterPower<false> whole_power_;  // T^-beta, for a whole beta
  RootPower root_power_;              // T^-beta, for beta 0.25, 0.5 or 0.75
  QuarterPower<true> quarter_power_;  // T^-beta, for other betas of whole quarters
  LogExpPower log_exp_power_;        // T^-beta, for any other beta
  WidePower wide_power_;         // T^-beta
  WidePower wide_power_over_t_;  // T^(-beta-1)
  double exponent_;              // -beta
  bool float_sums_apply_;
};

// float64: std::pow, and the log domain where a power alone leaves the double range.
template <>
class Arithmetic<double> {
 public:
  explicit Arithmetic(const Settings& s) : denominator_(s), beta_(s.beta) {}

  bool float_sums_apply() const { return false; }

  bool forward(const double* x, const double* sums, double* y, int64_t count) const {
    for (int64_t c = 0; c < count; ++c) {
      y[c] = times_power(x[c], denominator_(sums[c]), -beta_);
    }
    return true;
  }

  bool gradient_terms(const double* dy, const double* x, const double* sums, double* first, double* g,
                      int64_t count) const {
    for (int64_t c = 0; c < count; ++c) {
      const double t = denominator_(sums[c]);
      first[c] = times_power(dy[c], t, -beta_);
      g[c] = times_power(dy[c], x[c], t, -beta_ - 1.0);
    }
    return true;
  }

 private:
  Denominator<double> denominator_;
  double beta_;
};

// X^2 in sum_t, what the forward windows sum, for the rows [first, last) of a plane.
template <typename sum_t, typename scalar_t>
SPATIALNORM_VECTORIZED_APART
void squares(const scalar_t* plane, RowRange rows, int64_t width, std::vector<sum_t>& out) {
  const int64_t count = (rows.last - rows.first) * width;
  out.resize(static_cast<size_t>(count));
  const scalar_t* __restrict x = plane + rows.first * width;
  sum_t* __restrict squared = out.data();
  for (int64_t c = 0; c < count; ++c) {  // vectorizes
    const sum_t v = static_cast<sum_t>(x[c]);
    squared[c] = v * v;
  }
}

// The terms of the forward windows over the rows [first, last) of a plane: X itself, squared as
// it is summed, where it is already sum_t; else its squares in sum_t, made into `buffer`.
template <typename sum_t, typename scalar_t>
WindowTerms<sum_t> squares_of(const scalar_t* plane, RowRange rows, int64_t width, std::vector<sum_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, sum_t>) {
    return {plane + rows.first * width, true};
  } else {
    squares(plane, rows, width, buffer);
    return {buffer.data(), false};
  }
}

// One thread's window sums and buffers for its bands, with sums in sum_t.
template <typename sum_t>
struct BandScratch {
  BandScratch(int64_t width, const Settings& settings)
      : window(width, forward_extent(settings.kernel_height), forward_extent(settings.kernel_width)),
        mirrored_window(width, mirrored(forward_extent(settings.kernel_height)),
                        mirrored(forward_extent(settings.kernel_width))),
        gradient_scale(static_cast<sum_t>(2.0 * settings.alpha * settings.beta / settings.window_size())) {}

  WindowSums<sum_t> window;
  WindowSums<sum_t> mirrored_window;
  sum_t gradient_scale;  // 2 * alpha * beta / (kw * kh)
  std::vector<sum_t> squared;  // X^2, where X is not sum_t already (squares_of)
  std::vector<sum_t> sums;
  std::vector<sum_t> g_rows;
  std::vector<sum_t> first_terms;
};

// Runs band(scratch) with float32 sums where the arithmetic allows them and the band's values fit,
// else with double sums.
template <typename opmath_t>
class FloatFirst {
 public:
  FloatFirst(const Arithmetic<opmath_t>& arithmetic, int64_t width, const Settings& settings)
      : in_float_(width, settings), in_double_(width, settings), float_first_(arithmetic.float_sums_apply()) {}

  template <typename Fn>
  void run(const Fn& band) {
    // Only float32 arithmetic takes float32 sums: float64's never gets to instantiate them.
    if constexpr (std::is_same_v<opmath_t, float>) {
      if (float_first_ && band(in_float_)) {
        return;
      }
    }
    band(in_double_);
  }

 private:
  BandScratch<float> in_float_;
  BandScratch<double> in_double_;
  bool float_first_;
};

template <typename scalar_t>
SPATIALNORM_VECTORIZED void forward_bands(const scalar_t* input, scalar_t* output, PlaneShape shape,
                                          const Settings& settings, const Bands& bands, int64_t begin,
                                          int64_t end) {
  const Arithmetic<at::opmath_type<scalar_t>> arithmetic(settings);
  const int64_t width = shape.width;
  FloatFirst<at::opmath_type<scalar_t>> scratch(arithmetic, width, settings);
  for (int64_t i = begin; i < end; ++i) {
    const Band band = bands[i];
    const int64_t offset = band.plane * shape.height * width + band.row_begin * width;
    scratch.run([&](auto& s) {
      const auto terms = squares_of(input + band.plane * shape.height * width,
                                    s.window.rows_reached(band.row_begin, band.row_end, shape.height), width, s.squared);
      s.sums.resize(static_cast<size_t>((band.row_end - band.row_begin) * width));
      s.window.run(terms, shape.height, band.row_begin, band.row_end, s.sums.data());
      // The powers in one loop over the whole band: rows are short, and a loop per row would
      // leave too few independent vectors in flight to hide the polynomials' latency.
      return arithmetic.forward(input + offset, s.sums.data(), output + offset, static_cast<int64_t>(s.sums.size()));
    });
  }
}

// Pass one sums the forward window to get T, then G and dY * T^-beta for every row the band's
// mirrored windows reach; pass two sums the mirrored window over G.
template <typename scalar_t>
SPATIALNORM_VECTORIZED void backward_bands(const scalar_t* grad_output, const scalar_t* input, scalar_t* grad_input,
                                           PlaneShape shape, const Settings& settings, const Bands& bands,
                                           int64_t begin, int64_t end) {
  const Arithmetic<at::opmath_type<scalar_t>> arithmetic(settings);
  const int64_t width = shape.width;
  FloatFirst<at::opmath_type<scalar_t>> scratch(arithmetic, width, settings);
  for (int64_t i = begin; i < end; ++i) {
    const Band band = bands[i];
    const int64_t offset = band.plane * shape.height * width;
    const scalar_t* x_plane = input + offset;
    const scalar_t* dy_plane = grad_output + offset;
    scratch.run([&](auto& s) {
      const RowRange g_range = s.mirrored_window.rows_reached(band.row_begin, band.row_end, shape.height);
      const int64_t count = (g_range.last - g_range.first) * width;
      s.sums.resize(static_cast<size_t>(count));
      s.g_rows.resize(static_cast<size_t>(count));
      s.first_terms.resize(static_cast<size_t>(count));
      const auto terms = squares_of(x_plane, s.window.rows_reached(g_range.first, g_range.last, shape.height), width,
                                    s.squared);
      s.window.run(terms, shape.height, g_range.first, g_range.last, s.sums.data());
      // One loop over all rows, as in the forward pass.
      const int64_t g_offset = g_range.first * width;
      if (!arithmetic.gradient_terms(dy_plane + g_offset, x_plane + g_offset, s.sums.data(), s.first_terms.data(),
                                     s.g_rows.data(), count)) {
        return false;
      }
      s.mirrored_window.run({s.g_rows.data(), false}, shape.height, band.row_begin, band.row_end, s.sums.data());
      const int64_t band_offset = band.row_begin * width;
      return gradient_output(s.gradient_scale, x_plane + band_offset,
                             s.first_terms.data() + (band.row_begin - g_range.first) * width, s.sums.data(),
                             grad_input + offset + band_offset, (band.row_end - band.row_begin) * width);
    });
  }
}

at::Tensor forward(const at::Tensor& input, int64_t kernel_width, int64_t kernel_height, double alpha, double beta,
                   double delta) {
  const Settings settings = checked_forward_arguments(input, kernel_width, kernel_height, alpha, beta, delta);
  OutputBuffer output(input);
  const PlaneShape shape = plane_shape(input);
  if (input.numel() == 0) {
    return output.finish();
  }
  const at::Tensor x = input.contiguous();
  const Bands bands(shape, kernel_height);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_forward_cpu", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = output.contiguous().mutable_data_ptr<scalar_t>();
    parallel_batches(bands.count(), input.numel(), [&](int64_t begin, int64_t end) {
      forward_bands(x_data, y_data, shape, settings, bands, begin, end);
    });
  });
  return output.finish();
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_width,
                    int64_t kernel_height, double alpha, double beta, double delta) {
  const Settings settings =
      checked_backward_arguments(grad_output, input, kernel_width, kernel_height, alpha, beta, delta);
  OutputBuffer grad_input(input);
  const PlaneShape shape = plane_shape(input);
  if (input.numel() == 0) {
    return grad_input.finish();
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const Bands bands(shape, kernel_height);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_backward_cpu", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_data = grad_input.contiguous().mutable_data_ptr<scalar_t>();
    parallel_batches(bands.count(), input.numel(), [&](int64_t begin, int64_t end) {
      backward_bands(dy_data, x_data, dx_data, shape, settings, bands, begin, end);
    });
  });
  return grad_input.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(spatialnorm, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}

}  // namespace spatialnorm::cpu
