// CPU kernels of spatialnorm::forward and spatialnorm::backward.
//
// Work is split into bands of rows of the (N*C) image planes, processed in parallel; each band
// streams its window sums row by row (sliding_window_sums.h), so the cost per element does not
// depend on the kernel size. 16-bit types compute in float32, window sums in float64.
#include "../spatial_norm.h"
#include "positive_pow.h"
#include "sliding_window_sums.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

// The inner loops are plain arithmetic that the compiler vectorizes; build them for AVX2+FMA
// and AVX-512 as well as the baseline, and pick at load time where the toolchain supports it. `flatten`
// inlines every helper into each clone, so that the helpers' loops get the clone's target too.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define SPATIALNORM_VECTORIZED __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPATIALNORM_VECTORIZED
#endif

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
// windows reach, so bands stay several windows tall.
class Bands {
 public:
  Bands(PlaneShape shape, int64_t kernel_height) : shape_(shape) {
    const int64_t threads = at::get_num_threads();
    const int64_t wanted = shape.planes >= threads ? 1 : (threads + shape.planes - 1) / shape.planes;
    const int64_t tallest_useful = std::max<int64_t>(1, shape.height / std::max<int64_t>(4 * kernel_height, 16));
    per_plane_ = std::min(wanted, tallest_useful);
  }

  int64_t count() const { return shape_.planes * per_plane_; }

  Band operator[](int64_t index) const {
    const int64_t plane = index / per_plane_;
    const int64_t part = index % per_plane_;
    return {plane, shape_.height * part / per_plane_, shape_.height * (part + 1) / per_plane_};
  }

 private:
  PlaneShape shape_;
  int64_t per_plane_;
};

// Runs fn(begin, end) over [0, count) in batches that the threads claim from a shared counter:
// a thread the machine slows down takes fewer batches instead of holding the others up.
template <typename Fn>
void parallel_batches(int64_t count, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t batch = std::max<int64_t>(1, count / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(batch); begin < count; begin = next.fetch_add(batch)) {
      fn(begin, std::min(count, begin + batch));
    }
  });
}

// The settings turned into the constants the loops use, in the compute type.
template <typename opmath_t>
struct Coefficients {
  explicit Coefficients(const Settings& s)
      : delta(s.delta),
        scale(s.alpha / static_cast<double>(s.window_size())),
        neg_beta(-s.beta),
        gradient_scale(2.0 * s.alpha * s.beta / static_cast<double>(s.window_size())) {}

  // T = delta + alpha / (kw * kh) * (window sum of X^2), in a loop of its own: mixing double and
  // float lanes in one loop keeps GCC from vectorizing it.
  void denominators(const double* __restrict sums, opmath_t* __restrict t, int64_t width) const {
    for (int64_t c = 0; c < width; ++c) {
      t[c] = static_cast<opmath_t>(delta + scale * sums[c]);
    }
  }

  double delta;
  double scale;  // alpha / (kw * kh)
  opmath_t neg_beta;
  opmath_t gradient_scale;  // 2 * alpha * beta / (kw * kh)
};

// What the windows sum: the squared input in the forward pass, G in the gradient's second pass.
struct Squared {
  template <typename scalar_t>
  double operator()(scalar_t v) const {
    const double d = static_cast<double>(v);
    return d * d;
  }
};

struct AsIs {
  template <typename opmath_t>
  double operator()(opmath_t v) const {
    return static_cast<double>(v);
  }
};

template <typename scalar_t>
SPATIALNORM_VECTORIZED void forward_bands(const scalar_t* input, scalar_t* output, PlaneShape shape,
                                          const Settings& settings, const Bands& bands, int64_t begin,
                                          int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Coefficients<opmath_t> k(settings);
  const int64_t width = shape.width;
  SlidingWindowSums window(width, forward_extent(settings.kernel_height), forward_extent(settings.kernel_width));
  const Power<opmath_t> power(k.neg_beta);
  std::vector<opmath_t> denominators;
  for (int64_t i = begin; i < end; ++i) {
    const Band band = bands[i];
    const int64_t offset = band.plane * shape.height * width + band.row_begin * width;
    denominators.resize(static_cast<size_t>((band.row_end - band.row_begin) * width));
    window.run(input + band.plane * shape.height * width, shape.height, band.row_begin, band.row_end, Squared{},
               [&](int64_t row, const double* sums) {
                 k.denominators(sums, denominators.data() + (row - band.row_begin) * width, width);
               });
    // The powers in one loop over the whole band: rows are short, and a loop per row would
    // leave too few independent vectors in flight to hide the polynomials' latency.
    const scalar_t* __restrict x = input + offset;
    scalar_t* __restrict y = output + offset;
    const opmath_t* __restrict t = denominators.data();
    const int64_t count = static_cast<int64_t>(denominators.size());
    for (int64_t c = 0; c < count; ++c) {
      y[c] = static_cast<scalar_t>(static_cast<opmath_t>(x[c]) * power(t[c]));
    }
  }
}

// dX = dY * T^-beta - gradient_scale * X * (sum over the mirrored window of dY * X * T^(-beta-1)).
// Pass one streams the forward window to get T and stores G = dY * X * T^(-beta-1) for every row
// the band's mirrored windows reach, and T^-beta for the band's rows; pass two streams the
// mirrored window over G.
template <typename scalar_t>
SPATIALNORM_VECTORIZED void backward_bands(const scalar_t* grad_output, const scalar_t* input, scalar_t* grad_input,
                                           PlaneShape shape, const Settings& settings, const Bands& bands,
                                           int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Coefficients<opmath_t> k(settings);
  const int64_t width = shape.width;
  const WindowExtent rows = forward_extent(settings.kernel_height);
  const WindowExtent cols = forward_extent(settings.kernel_width);
  SlidingWindowSums window(width, rows, cols);
  SlidingWindowSums mirrored_window(width, mirrored(rows), mirrored(cols));
  const Power<opmath_t> power(k.neg_beta);
  std::vector<opmath_t> denominators;  // then G
  std::vector<opmath_t> powers;
  for (int64_t i = begin; i < end; ++i) {
    const Band band = bands[i];
    const int64_t g_begin = std::max<int64_t>(0, band.row_begin - mirrored(rows).before);
    const int64_t g_end = std::min(shape.height, band.row_end + mirrored(rows).after);
    const int64_t count = (g_end - g_begin) * width;
    denominators.resize(static_cast<size_t>(count));
    powers.resize(static_cast<size_t>(count));
    const int64_t offset = band.plane * shape.height * width;
    const scalar_t* x_plane = input + offset;
    const scalar_t* dy_plane = grad_output + offset;
    scalar_t* dx_plane = grad_input + offset;

    window.run(x_plane, shape.height, g_begin, g_end, Squared{}, [&](int64_t row, const double* sums) {
      k.denominators(sums, denominators.data() + (row - g_begin) * width, width);
    });
    // One loop over all rows, as in the forward pass; G replaces T in place.
    {
      const scalar_t* __restrict x = x_plane + g_begin * width;
      const scalar_t* __restrict dy = dy_plane + g_begin * width;
      opmath_t* __restrict t_then_g = denominators.data();
      opmath_t* __restrict p = powers.data();
      for (int64_t c = 0; c < count; ++c) {
        const opmath_t t = t_then_g[c];
        p[c] = power(t);
        t_then_g[c] = static_cast<opmath_t>(dy[c]) * static_cast<opmath_t>(x[c]) * (p[c] / t);
      }
    }
    const opmath_t* g_rows = denominators.data();

    mirrored_window.run(g_rows, g_end - g_begin, band.row_begin - g_begin, band.row_end - g_begin, AsIs{},
                        [&](int64_t local_row, const double* sums) {
                          const int64_t row = local_row + g_begin;
                          const scalar_t* __restrict x = x_plane + row * width;
                          const scalar_t* __restrict dy = dy_plane + row * width;
                          const opmath_t* __restrict p = powers.data() + local_row * width;
                          scalar_t* __restrict dx = dx_plane + row * width;
                          for (int64_t c = 0; c < width; ++c) {
                            dx[c] = static_cast<scalar_t>(static_cast<opmath_t>(dy[c]) * p[c] -
                                                          k.gradient_scale * static_cast<opmath_t>(x[c]) *
                                                              static_cast<opmath_t>(sums[c]));
                          }
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
    parallel_batches(bands.count(), [&](int64_t begin, int64_t end) {
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
    parallel_batches(bands.count(), [&](int64_t begin, int64_t end) {
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
