// Metal kernels of torch_spatialnorm: MPSCNNSpatialNormalization and its gradient (docs/definition.md).
//
// Each direction runs as separable passes over (plane, row) and (plane, column) lines: one
// thread per line walks the windows along it with sums that never subtract (LineWindow).
// Inputs and outputs are float, half or bfloat; all arithmetic is float32.
//
//   forward:  row_sums_of_squares  -> forward_from_row_sums
//   gradient: row_sums_of_squares  -> gradient_terms (dY*T^-beta and G = dY*X*T^(-beta-1))
//             row_sums (of G, mirrored window) -> gradient_from_row_sums
//
// Every kernel parameter has [[buffer(i)]] equal to its position, the order in which
// torch.mps.compile_shader binds arguments. Python ints arrive as 64-bit (long), Python
// floats as 32-bit float.
#include <metal_stdlib>
using namespace metal;

// Consecutive windows of a line that share a chunk: the size of LineWindow's suffix array.
enum : int { kMaxChunk = 8 };

// Window sums of f(line[i]) over [i - before, i + after] along a line of `length` elements
// `stride` apart, parts outside the line counting as zero; next() returns window 0, 1, 2, ...
// (MSL has no lambdas, so the walk is an object the caller steps.)
//
// The sums never subtract: a running sum that drops the leaving value keeps the rounding error
// of a large value long after the value left the window, and an infinity would never leave it.
// Windows go in chunks of `chunk` = min(window, kMaxChunk) consecutive ones: window i0 + t is
// the chunk's suffix from its term t (kept in `suffix`) plus the terms from `chunk` to
// t + window - 1, which every later window of the chunk shares and which grow by one term per
// window. Each sum is made of its own window's terms only, about (window + chunk) / chunk terms
// read per window.
template <typename T, typename F>
struct LineWindow {
  device const T* line;
  long length;
  long stride;
  long window;
  int chunk;
  int position;  // of the next window in its chunk
  long first;    // line index of the current chunk's first term
  float suffix[kMaxChunk];
  float beyond;

  LineWindow(device const T* line_, long length_, long stride_, long before, long after)
      : line(line_), length(length_), stride(stride_), window(before + after + 1),
        chunk(int(min(before + after + 1, long(kMaxChunk)))), position(0), first(-before), beyond(0.0f) {
    start_chunk();
  }

  float term(long i) const {
    return i >= 0 && i < length ? F()(line[i * stride]) : 0.0f;
  }

  void start_chunk() {
    float sum = 0.0f;
    for (int t = chunk - 1; t >= 0; --t) {
      sum = term(first + t) + sum;
      suffix[t] = sum;
    }
    beyond = 0.0f;
    for (long j = chunk; j < window; ++j) {
      beyond += term(first + j);
    }
  }

  float next() {
    if (position == chunk) {
      first += chunk;
      position = 0;
      start_chunk();
    } else if (position > 0) {
      beyond += term(first + position + window - 1);
    }
    return suffix[position++] + beyond;
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

// T = delta + scale * (window sum of X^2); just delta when alpha (so scale) is 0, whatever the
// window holds (also infinities or NaN).
inline float denominator(float window_sum, float scale, float delta) {
  return scale == 0.0f ? delta : delta + scale * window_sum;
}

// a * t^e, exact wherever the product is a finite float (docs/definition.md): NaN where t <= 0;
// a where e = 0 (pow(t, 0) is 1 even for an infinite or NaN t); and where t is subnormal or t^e
// alone leaves float's normal range (t = 1e-8, e = -5: 1e40), the product of a's fraction and
// 2^r, |r| <= 1/2, scaled by a's exponent plus the rest of e * log2(t), so that 0 * t^e is 0 and
// 1e-20 * 1e40 is 1e20. compile_shader builds with precise math, but a user may turn fast math
// on, whose pow is far less accurate for large exponents: precise:: keeps float32 accuracy.
inline float times_power(float a, float t, float e) {
  if (!(t > 0.0f) && !isnan(t)) {
    return NAN;
  }
  if (e == 0.0f) {
    return a;
  }
  const bool subnormal = t < FLT_MIN;
  if (!subnormal) {
    const float power = precise::pow(t, e);
    if (isnormal(power) || !isfinite(t)) {
      return a * power;
    }
  }
  const float log2_t = subnormal ? precise::log2(t * 16777216.0f) - 24.0f : precise::log2(t);
  const float l = clamp(e * log2_t, -400.0f, 400.0f);  // beyond, a * 2^l is 0 or infinite for any float a
  const float whole = rint(l);
  int exponent = 0;
  const float fraction = frexp(a, exponent);
  return ldexp(fraction * precise::exp2(l - whole), exponent + int(whole));
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
    sums[start + x] = window.next();
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
    const float t = denominator(window.next(), scale, delta);
    output[i] = static_cast<T>(times_power(static_cast<float>(input[i]), t, neg_beta));
  }
}

// One thread per (plane, column): dY * T^-beta and G = dY * X * T^(-beta-1), each taken as one
// product with its power (T^-beta alone can overflow where dY * T^-beta is finite).
template <typename T>
kernel void gradient_terms(device const T* grad_output [[buffer(0)]], device const T* input [[buffer(1)]],
                           device const float* row_sums [[buffer(2)]], device float* scaled_gradient [[buffer(3)]],
                           device float* terms [[buffer(4)]], constant long& width [[buffer(5)]],
                           constant long& height [[buffer(6)]], constant long& columns [[buffer(7)]],
                           constant long& before [[buffer(8)]], constant long& after [[buffer(9)]],
                           constant float& scale [[buffer(10)]], constant float& delta [[buffer(11)]],
                           constant float& neg_beta [[buffer(12)]], constant float& g_exponent [[buffer(13)]],
                           uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  LineWindow<float, AsFloat> window(row_sums + start, height, width, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    const float t = denominator(window.next(), scale, delta);
    const float dy = static_cast<float>(grad_output[i]);
    scaled_gradient[i] = times_power(dy, t, neg_beta);
    terms[i] = times_power(dy * static_cast<float>(input[i]), t, g_exponent);
  }
}

// One thread per (plane, column): dX = dY * T^-beta - gradient_scale * X * (mirrored window sum
// of G); with alpha or beta 0 (gradient_scale 0) the second term is absent, whatever G holds.
template <typename T>
kernel void gradient_from_row_sums(device const T* input [[buffer(0)]], device const float* scaled_gradient [[buffer(1)]],
                                   device const float* term_row_sums [[buffer(2)]], device T* grad_input [[buffer(3)]],
                                   constant long& width [[buffer(4)]], constant long& height [[buffer(5)]],
                                   constant long& columns [[buffer(6)]], constant long& before [[buffer(7)]],
                                   constant long& after [[buffer(8)]], constant float& gradient_scale [[buffer(9)]],
                                   uint index [[thread_position_in_grid]]) {
  if (long(index) >= columns) {
    return;
  }
  const long start = column_start(index, width, height);
  LineWindow<float, AsFloat> window(term_row_sums + start, height, width, before, after);
  for (long y = 0; y < height; ++y) {
    const long i = start + y * width;
    const float neighbours = window.next();
    grad_input[i] = static_cast<T>(gradient_scale == 0.0f ? scaled_gradient[i]
                                                          : scaled_gradient[i] - gradient_scale *
                                                                static_cast<float>(input[i]) * neighbours);
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
      device const float* row_sums [[buffer(2)]], device float* scaled_gradient [[buffer(3)]],                     \
      device float* terms [[buffer(4)]], constant long& width [[buffer(5)]], constant long& height [[buffer(6)]],  \
      constant long& columns [[buffer(7)]], constant long& before [[buffer(8)]], constant long& after [[buffer(9)]], \
      constant float& scale [[buffer(10)]], constant float& delta [[buffer(11)]], constant float& neg_beta [[buffer(12)]], \
      constant float& g_exponent [[buffer(13)]], uint index [[thread_position_in_grid]]);                          \
  template [[host_name("gradient_from_row_sums_" #T)]] kernel void gradient_from_row_sums<T>(                       \
      device const T* input [[buffer(0)]], device const float* scaled_gradient [[buffer(1)]],                      \
      device const float* term_row_sums [[buffer(2)]], device T* grad_input [[buffer(3)]],                         \
      constant long& width [[buffer(4)]], constant long& height [[buffer(5)]], constant long& columns [[buffer(6)]], \
      constant long& before [[buffer(7)]], constant long& after [[buffer(8)]],                                     \
      constant float& gradient_scale [[buffer(9)]], uint index [[thread_position_in_grid]]);

INSTANTIATE_FOR(float)
INSTANTIATE_FOR(half)
#if __METAL_VERSION__ >= 310  // bfloat arrived with MSL 3.1 (macOS 14)
INSTANTIATE_FOR(bfloat)
#endif
