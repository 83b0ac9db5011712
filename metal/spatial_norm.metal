// Metal kernels of torch_spatialnorm: MPSCNNSpatialNormalization and its gradient (docs/definition.md).
//
// Each direction runs as separable passes over (plane, row) and (plane, column) lines: one
// thread per line keeps a running window sum along it, so the work per element does not depend
// on the kernel size. Inputs and outputs are float, half or bfloat; all arithmetic is float32.
//
//   forward:  row_sums_of_squares  -> forward_from_row_sums
//   gradient: row_sums_of_squares  -> gradient_terms (T^-beta and G = dY*X*T^(-beta-1))
//             row_sums (of G, mirrored window) -> gradient_from_row_sums
//
// Every kernel parameter has [[buffer(i)]] equal to its position, the order in which
// torch.mps.compile_shader binds arguments. Python ints arrive as 64-bit (long), Python
// floats as 32-bit float.
#include <metal_stdlib>
using namespace metal;

// A window sum that slides along a line: values enter and leave it one at a time.
// Float32 running sums drift, so the sum is Kahan-compensated. NaN and infinities are counted
// rather than added: once added, an infinity would never leave the sum (inf - inf is NaN).
struct SlidingSum {
  float sum = 0.0f;
  float compensation = 0.0f;
  int nans = 0;
  int positive_infinities = 0;
  int negative_infinities = 0;

  void add(float value, int sign) {
    if (isnan(value)) {
      nans += sign;
    } else if (isinf(value)) {
      if (value > 0.0f) {
        positive_infinities += sign;
      } else {
        negative_infinities += sign;
      }
    } else {
      const float y = float(sign) * value - compensation;
      const float t = sum + y;
      compensation = (t - sum) - y;
      sum = t;
    }
  }

  float value() const {
    if (nans > 0 || (positive_infinities > 0 && negative_infinities > 0)) {
      return NAN;
    }
    if (positive_infinities > 0) {
      return INFINITY;
    }
    return negative_infinities > 0 ? -INFINITY : sum;
  }
};

// Window sums of f(line[i]) over [i - before, i + after] along a line of `length` elements
// `stride` apart, parts outside the line counting as zero. Call next(i) for i = 0, 1, 2, ...
// (MSL has no lambdas, so the walk is an object the caller steps.)
template <typename T, typename F>
struct LineWindow {
  device const T* line;
  long length;
  long stride;
  long before;
  long after;
  SlidingSum window;

  LineWindow(device const T* line_, long length_, long stride_, long before_, long after_)
      : line(line_), length(length_), stride(stride_), before(before_), after(after_) {
    for (long i = 0; i < min(after, length); ++i) {
      window.add(F()(line[i * stride]), 1);
    }
  }

  float next(long i) {
    const long entering = i + after;
    const long leaving = i - before - 1;
    if (entering < length) {
      window.add(F()(line[entering * stride]), 1);
    }
    if (leaving >= 0) {
      window.add(F()(line[leaving * stride]), -1);
    }
    return window.value();
  }
};

struct Square {
  template <typename T>
  float operator()(T v) const {
    const float x = static_cast<float>(v);
    return x * x;
  }
};

struct AsFloat {
  template <typename T>
  float operator()(T v) const {
    return static_cast<float>(v);
  }
};

// T^-beta. compile_shader builds with precise math, but a user may turn fast math on, whose pow
// is far less accurate for large exponents: precise::pow keeps T^-beta exact to float32 either way.
inline float negative_power(float t, float neg_beta) {
  return precise::pow(t, neg_beta);
}

// One thread per (plane, row): sums along the row over [x - before, x + after], f applied first.
template <typename T, typename F>
void row_sums_impl(device const T* input, device float* sums, long width, long lines, long before, long after,
                   uint index) {
  if (long(index) >= lines) {
    return;
  }
  const long start = long(index) * width;
  LineWindow<T, F> window(input + start, width, 1, before, after);
  for (long x = 0; x < width; ++x) {
    sums[start + x] = window.next(x);
  }
}

template <typename T>
kernel void row_sums_of_squares(device const T* input [[buffer(0)]], device float* sums [[buffer(1)]],
                                constant long& width [[buffer(2)]], constant long& lines [[buffer(3)]],
                                constant long& before [[buffer(4)]], constant long& after [[buffer(5)]],
                                uint index [[thread_position_in_grid]]) {
  row_sums_impl<T, Square>(input, sums, width, lines, before, after, index);
}

kernel void row_sums(device const float* input [[buffer(0)]], device float* sums [[buffer(1)]],
                     constant long& width [[buffer(2)]], constant long& lines [[buffer(3)]],
                     constant long& before [[buffer(4)]], constant long& after [[buffer(5)]],
                     uint index [[thread_position_in_grid]]) {
  row_sums_impl<float, AsFloat>(input, sums, width, lines, before, after, index);
}

// Where a (plane, column) thread starts: the offset of its column's first element.
inline long column_start(uint index, long width, long height) {
  const long plane = long(index) / width;
  return plane * height * width + long(index) % width;
}

// One thread per (plane, column): Y = X * (delta + scale * window sum)^-beta.
template <typename T>
kernel void forward_from_row_sums(device const T* input [[buffer(0)]], device const float* row_sums [[buffer(1)]],
                                  device T* output [[buffer(2)]], constant long& width [[buffer(3)]],
                                  constant long& height [[buffer(4)]], constant long& columns [[buffer(5)]],
                                  constant long& before [[buffer(6)]], constant long& after [[buffer(7)]],
                                  constant float& scale [[buffer(8)]], constant float& delta [[buffer(9)]],
                                  constant float& neg_beta [[buffer(10)]], uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  LineWindow<float, AsFloat> window(row_sums + start, height, width, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    const float t = delta + scale * window.next(y);
    output[i] = static_cast<T>(static_cast<float>(input[i]) * negative_power(t, neg_beta));
  }
}

// One thread per (plane, column): P = T^-beta and G = dY * X * T^(-beta-1).
template <typename T>
kernel void gradient_terms(device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],
                           device const float* row_sums [[buffer(2)]], device float* powers [[buffer(3)]],
                           device float* terms [[buffer(4)]], constant long& width [[buffer(5)]],
                           constant long& height [[buffer(6)]], constant long& columns [[buffer(7)]],
                           constant long& before [[buffer(8)]], constant long& after [[buffer(9)]],
                           constant float& scale [[buffer(10)]], constant float& delta [[buffer(11)]],
                           constant float& neg_beta [[buffer(12)]], uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  LineWindow<float, AsFloat> window(row_sums + start, height, width, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    const float t = delta + scale * window.next(y);
    const float power = negative_power(t, neg_beta);
    powers[i] = power;
    terms[i] = static_cast<float>(grad_output[i]) * static_cast<float>(input[i]) * (power / t);
  }
}

// One thread per (plane, column): dX = dY * P - gradient_scale * X * (mirrored window sum of G).
template <typename T>
kernel void gradient_from_row_sums(device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],
                                   device const float* powers [[buffer(2)]], device const float* term_row_sums [[buffer(3)]],
                                   device T* grad_input [[buffer(4)]], constant long& width [[buffer(5)]],
                                   constant long& height [[buffer(6)]], constant long& columns [[buffer(7)]],
                                   constant long& before [[buffer(8)]], constant long& after [[buffer(9)]],
                                   constant float& gradient_scale [[buffer(10)]],
                                   uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  LineWindow<float, AsFloat> window(term_row_sums + start, height, width, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    grad_input[i] = static_cast<T>(static_cast<float>(grad_output[i]) * powers[i] -
                                   gradient_scale * static_cast<float>(input[i]) * window.next(y));
  }
}

#define INSTANTIATE_FOR(T)                                                                                          \
  template [[host_name("row_sums_of_squares_" #T)]] kernel void row_sums_of_squares<T>(                             \
      device const T* input [[buffer(0)]], device float* sums [[buffer(1)]], constant long& width [[buffer(2)]],    \
      constant long& lines [[buffer(3)]], constant long& before [[buffer(4)]], constant long& after [[buffer(5)]], \
      uint index [[thread_position_in_grid]]);                                                                      \
  template [[host_name("forward_from_row_sums_" #T)]] kernel void forward_from_row_sums<T>(                         \
      device const T* input [[buffer(0)]], device const float* row_sums [[buffer(1)]], device T* output [[buffer(2)]], \
      constant long& width [[buffer(3)]], constant long& height [[buffer(4)]], constant long& columns [[buffer(5)]], \
      constant long& before [[buffer(6)]], constant long& after [[buffer(7)]], constant float& scale [[buffer(8)]], \
      constant float& delta [[buffer(9)]], constant float& neg_beta [[buffer(10)]],                                \
      uint index [[thread_position_in_grid]]);                                                                      \
  template [[host_name("gradient_terms_" #T)]] kernel void gradient_terms<T>(                                       \
      device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],                              \
      device const float* row_sums [[buffer(2)]], device float* powers [[buffer(3)]], device float* terms [[buffer(4)]], \
      constant long& width [[buffer(5)]], constant long& height [[buffer(6)]], constant long& columns [[buffer(7)]], \
      constant long& before [[buffer(8)]], constant long& after [[buffer(9)]], constant float& scale [[buffer(10)]], \
      constant float& delta [[buffer(11)]], constant float& neg_beta [[buffer(12)]],                               \
      uint index [[thread_position_in_grid]]);                                                                      \
  template [[host_name("gradient_from_row_sums_" #T)]] kernel void gradient_from_row_sums<T>(                       \
      device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],                              \
      device const float* powers [[buffer(2)]], device const float* term_row_sums [[buffer(3)]],                   \
      device T* grad_input [[buffer(4)]], constant long& width [[buffer(5)]], constant long& height [[buffer(6)]],  \
      constant long& columns [[buffer(7)]], constant long& before [[buffer(8)]], constant long& after [[buffer(9)]], \
      constant float& gradient_scale [[buffer(10)]], uint index [[thread_position_in_grid]]);

INSTANTIATE_FOR(float)
INSTANTIATE_FOR(half)
#if __METAL_VERSION__ >= 310  // bfloat arrived with MSL 3.1 (macOS 14)
INSTANTIATE_FOR(bfloat)
#endif
