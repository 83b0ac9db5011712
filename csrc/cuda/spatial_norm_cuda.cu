// CUDA kernels of spatialnorm::forward and spatialnorm::backward.
//
// A block owns a strip of image columns (one thread per column, the window's halo included) over
// a band of rows, and streams down the band: each thread keeps the running vertical window sum
// of its column, and every row's horizontal window sums come from a prefix sum across the block.
// Both are O(1) per element whatever the kernel size, and each pass reads its inputs and writes
// its output once, apart from the halos. The gradient is one fused kernel: G = dY*X*T^(-beta-1)
// and T^-beta of the rows still inside the mirrored window wait in shared-memory rings.
// Kernels too large for a strip run a composite of ATen ops instead.
#include "../spatial_norm.h"
#include "block_window.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/constant_pad_nd.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace spatialnorm::cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMinBandRows = 32;

// How a call is cut into blocks: strips of columns times bands of rows times planes.
struct Launch {
  int threads;        // one per column of a strip, halo included; a multiple of 32
  int halo;           // columns of a strip that only feed other columns' windows
  int64_t strips;
  int64_t bands;
  int64_t band_rows;
  size_t shared_bytes;

  int64_t blocks(int64_t planes) const { return planes * strips * bands; }
};

// Strips of `halo` extra columns each; threads == 0 where the halo or the rings don't fit a block.
Launch plan(const PlaneShape& shape, int64_t halo, int64_t kernel_height, size_t ring_bytes_per_row) {
  Launch launch{};
  if (halo > kMaxThreads / 2) {
    return launch;
  }
  const int64_t columns = std::min<int64_t>(shape.width, kMaxThreads - halo);
  launch.threads = static_cast<int>((columns + halo + 31) / 32 * 32);
  launch.halo = static_cast<int>(halo);
  launch.strips = (shape.width + (launch.threads - halo) - 1) / (launch.threads - halo);
  launch.band_rows = std::min<int64_t>(shape.height, std::max<int64_t>(kMinBandRows, 4 * kernel_height));
  launch.bands = (shape.height + launch.band_rows - 1) / launch.band_rows;
  launch.shared_bytes =
      window_scratch_doubles(launch.threads) * sizeof(double) + ring_bytes_per_row * kernel_height * launch.threads;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (launch.shared_bytes > static_cast<size_t>(max_shared)) {
    launch.threads = 0;
  }
  return launch;
}

// Block index -> (plane, band, strip).
struct BlockPosition {
  int64_t plane;
  int64_t band;
  int64_t strip;
};

__device__ inline BlockPosition block_position(int64_t strips, int64_t bands) {
  int64_t index = blockIdx.x;
  const int64_t strip = index % strips;
  index /= strips;
  return {index / bands, index % bands, strip};
}

template <typename opmath_t>
struct Coefficients {
  opmath_t scale;          // alpha / (kw * kh)
  opmath_t delta;
  opmath_t neg_beta;
  opmath_t gradient_scale;  // 2 * alpha * beta / (kw * kh)
};

// Extents of the forward window W; the gradient's M is its mirror image.
struct Extents {
  int left, right, top, bottom;
};

template <typename scalar_t>
__device__ inline double squared(scalar_t v) {
  const double d = static_cast<double>(v);
  return d * d;
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output, int64_t height,
                               int64_t width, int64_t strips, int64_t bands, int64_t band_rows, Extents w,
                               Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ double scratch[];
  const BlockPosition block = block_position(strips, bands);
  const int t = threadIdx.x;
  const int64_t column = block.strip * (blockDim.x - w.left - w.right) - w.left + t;
  const bool in_image = column >= 0 && column < width;
  const bool writes = in_image && t >= w.left && t < static_cast<int>(blockDim.x) - w.right;
  const scalar_t* x = input + block.plane * height * width;
  scalar_t* y = output + block.plane * height * width;
  const int64_t row_begin = block.band * band_rows;
  const int64_t row_end = min(height, row_begin + band_rows);

  // The window of row_begin - 1, so that every row below adds one row and drops one.
  RunningSum vertical;
  if (in_image) {
    for (int64_t r = max(int64_t{0}, row_begin - w.top - 1); r <= min(height - 1, row_begin + w.bottom - 1); ++r) {
      vertical.add(squared(x[r * width + column]), 1);
    }
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    if (in_image) {
      const int64_t entering = row + w.bottom;
      const int64_t leaving = row - w.top - 1;
      if (entering < height) {
        vertical.add(squared(x[entering * width + column]), 1);
      }
      if (leaving >= 0) {
        vertical.add(squared(x[leaving * width + column]), -1);
      }
    }
    const bool all_finite = !__syncthreads_or(!vertical.finite());
    const double sum = window_across_block(vertical.value(), all_finite, w.left, w.right, scratch);
    if (writes) {
      const int64_t i = row * width + column;
      const opmath_t denominator = k.delta + k.scale * static_cast<opmath_t>(sum);
      y[i] = static_cast<scalar_t>(static_cast<opmath_t>(x[i]) * ::pow(denominator, k.neg_beta));
    }
  }
}

// dX = dY*P - gradient_scale * X * (M-window sum of G), P = T^-beta, G = dY*X*P/T.
// Row r of G is made once its T is known, and the output row r - (top extent of W) once the
// mirrored window around it is complete; G and P wait in rings of kh rows, each thread
// touching only its own column of them.
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                scalar_t* __restrict__ grad_input, int64_t height, int64_t width, int64_t strips,
                                int64_t bands, int64_t band_rows, Extents w, Coefficients<at::opmath_type<scalar_t>> k) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ double scratch[];
  const int n = blockDim.x;
  const int ring_rows = w.top + w.bottom + 1;
  opmath_t* g_ring = reinterpret_cast<opmath_t*>(scratch + window_scratch_doubles(n));
  opmath_t* p_ring = g_ring + ring_rows * n;
  const BlockPosition block = block_position(strips, bands);
  const int t = threadIdx.x;
  const int halo = w.left + w.right;  // G needs W's halo, the output M's: the same width
  const int64_t column = block.strip * (n - 2 * halo) - halo + t;
  const bool in_image = column >= 0 && column < width;
  const bool makes_g = in_image && t >= w.left && t < n - w.right;
  const bool writes = in_image && t >= halo && t < n - halo;
  const int64_t offset = block.plane * height * width;
  const scalar_t* x = input + offset;
  const scalar_t* dy = grad_output + offset;
  scalar_t* dx = grad_input + offset;
  const int64_t row_begin = block.band * band_rows;
  const int64_t row_end = min(height, row_begin + band_rows);
  // M reaches w.bottom rows up and w.top rows down.
  const int64_t g_begin = max(int64_t{0}, row_begin - w.bottom);
  const int64_t g_end = row_end + w.top;  // rows past the image have G = 0

  for (int i = 0; i < ring_rows; ++i) {
    g_ring[i * n + t] = 0;
  }
  RunningSum squares;
  if (in_image) {
    for (int64_t r = max(int64_t{0}, g_begin - w.top - 1); r <= min(height - 1, g_begin + w.bottom - 1); ++r) {
      squares.add(squared(x[r * width + column]), 1);
    }
  }
  RunningSum terms;
  for (int64_t r = g_begin; r < g_end; ++r) {
    const int slot = static_cast<int>(r % ring_rows);
    opmath_t g = 0;
    if (r < height) {
      if (in_image) {
        if (r + w.bottom < height) {
          squares.add(squared(x[(r + w.bottom) * width + column]), 1);
        }
        if (r - w.top - 1 >= 0) {
          squares.add(squared(x[(r - w.top - 1) * width + column]), -1);
        }
      }
      const bool all_finite = !__syncthreads_or(!squares.finite());
      const double sum = window_across_block(squares.value(), all_finite, w.left, w.right, scratch);
      if (makes_g) {
        const int64_t i = r * width + column;
        const opmath_t denominator = k.delta + k.scale * static_cast<opmath_t>(sum);
        const opmath_t power = ::pow(denominator, k.neg_beta);
        p_ring[slot * n + t] = power;
        g = static_cast<opmath_t>(dy[i]) * static_cast<opmath_t>(x[i]) * (power / denominator);
      }
    }
    terms.add(static_cast<double>(g_ring[slot * n + t]), -1);  // G of row r - kh leaves the window
    terms.add(static_cast<double>(g), 1);
    g_ring[slot * n + t] = g;
    const int64_t row = r - w.top;
    if (row >= row_begin) {
      const bool all_finite = !__syncthreads_or(!terms.finite());
      const double sum = window_across_block(terms.value(), all_finite, w.right, w.left, scratch);
      if (writes) {
        const int64_t i = row * width + column;
        const opmath_t power = p_ring[static_cast<int>(row % ring_rows) * n + t];
        dx[i] = static_cast<scalar_t>(static_cast<opmath_t>(dy[i]) * power -
                                      k.gradient_scale * static_cast<opmath_t>(x[i]) * static_cast<opmath_t>(sum));
      }
    }
  }
}

// The composite used where a window is too wide for a strip: window sums by zero padding and
// sum pooling, in the compute type.
at::Tensor window_sum(const at::Tensor& values, const Settings& s, bool mirrored) {
  WindowExtent cols = forward_extent(s.kernel_width);
  WindowExtent rows = forward_extent(s.kernel_height);
  if (mirrored) {
    cols = spatialnorm::mirrored(cols);
    rows = spatialnorm::mirrored(rows);
  }
  const at::Tensor padded = at::constant_pad_nd(values, {cols.before, cols.after, rows.before, rows.after}, 0);
  return at::avg_pool2d(padded, {s.kernel_height, s.kernel_width}, {1, 1}, {0, 0}, false, true, 1);
}

at::Tensor composite_denominator(const at::Tensor& x, const Settings& s) {
  return window_sum(x * x, s, false) * (s.alpha / s.window_size()) + s.delta;
}

at::Tensor composite_forward(const at::Tensor& input, const Settings& s) {
  const at::Tensor x = input.to(at::toOpMathType(input.scalar_type()));
  return (x * composite_denominator(x, s).pow(-s.beta)).to(input.scalar_type());
}

at::Tensor composite_backward(const at::Tensor& grad_output, const at::Tensor& input, const Settings& s) {
  const auto opmath = at::toOpMathType(input.scalar_type());
  const at::Tensor x = input.to(opmath);
  const at::Tensor dy = grad_output.to(opmath);
  const at::Tensor t = composite_denominator(x, s);
  const at::Tensor power = t.pow(-s.beta);
  const at::Tensor neighbours = window_sum(dy * x * power / t, s, true);
  const double gradient_scale = 2.0 * s.alpha * s.beta / s.window_size();
  return (dy * power - x * neighbours * gradient_scale).to(input.scalar_type());
}

template <typename opmath_t>
Coefficients<opmath_t> coefficients(const Settings& s) {
  return {static_cast<opmath_t>(s.alpha / s.window_size()), static_cast<opmath_t>(s.delta),
          static_cast<opmath_t>(-s.beta), static_cast<opmath_t>(2.0 * s.alpha * s.beta / s.window_size())};
}

Extents extents(const Settings& s) {
  const WindowExtent cols = forward_extent(s.kernel_width);
  const WindowExtent rows = forward_extent(s.kernel_height);
  return {static_cast<int>(cols.before), static_cast<int>(cols.after), static_cast<int>(rows.before),
          static_cast<int>(rows.after)};
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

at::Tensor forward(const at::Tensor& input, int64_t kernel_width, int64_t kernel_height, double alpha, double beta,
                   double delta) {
  const Settings settings{kernel_width, kernel_height, alpha, beta, delta};
  check_settings(settings);
  check_image(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  const PlaneShape shape = plane_shape(input);
  OutputBuffer output(input);
  if (input.numel() == 0) {
    return output.finish();
  }
  const Launch launch = plan(shape, kernel_width - 1, kernel_height, 0);
  if (launch.threads == 0) {
    output.contiguous().copy_(composite_forward(input, settings));
    return output.finish();
  }
  const at::Tensor x = input.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_forward_cuda", [&] {
    auto kernel = forward_kernel<scalar_t>;
    allow_shared_memory(kernel, launch.shared_bytes);
    kernel<<<launch.blocks(shape.planes), launch.threads, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), output.contiguous().mutable_data_ptr<scalar_t>(), shape.height, shape.width,
        launch.strips, launch.bands, launch.band_rows, extents(settings),
        coefficients<at::opmath_type<scalar_t>>(settings));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output.finish();
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_width,
                    int64_t kernel_height, double alpha, double beta, double delta) {
  const Settings settings{kernel_width, kernel_height, alpha, beta, delta};
  check_settings(settings);
  check_image(grad_output, "grad_output");
  check_image(input, "input");
  check_same_layout(grad_output, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const PlaneShape shape = plane_shape(input);
  OutputBuffer grad_input(input);
  if (input.numel() == 0) {
    return grad_input.finish();
  }
  const size_t ring_bytes = 2 * at::elementSize(at::toOpMathType(input.scalar_type()));
  const Launch launch = plan(shape, 2 * (kernel_width - 1), kernel_height, ring_bytes);
  if (launch.threads == 0) {
    grad_input.contiguous().copy_(composite_backward(grad_output, input, settings));
    return grad_input.finish();
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "spatialnorm_backward_cuda", [&] {
    auto kernel = backward_kernel<scalar_t>;
    allow_shared_memory(kernel, launch.shared_bytes);
    kernel<<<launch.blocks(shape.planes), launch.threads, launch.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_input.contiguous().mutable_data_ptr<scalar_t>(),
        shape.height, shape.width, launch.strips, launch.bands, launch.band_rows, extents(settings),
        coefficients<at::opmath_type<scalar_t>>(settings));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(spatialnorm, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}

}  // namespace spatialnorm::cuda
