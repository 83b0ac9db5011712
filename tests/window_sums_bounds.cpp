// Runs csrc/cpu/window_sums.h over every plane width from 1 to 70 and windows from 1 to 40 wide,
// in float and double, of the values and of their squares, bands of several heights, against
// direct sums. Built with AddressSanitizer by test_cpu_kernels.py: the window sums load and
// transpose whole tiles of vectors, and a read past a buffer's end only faults where the buffer
// ends a page (it did, in a worker thread's arena), so the sanitizer is what checks every buffer.
#include "../csrc/cpu/window_sums.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using spatialnorm::WindowExtent;
using spatialnorm::cpu::RowRange;
using spatialnorm::cpu::WindowSums;

template <typename T>
int check(int64_t height, int64_t width, WindowExtent rows, WindowExtent cols, int64_t row_begin, int64_t row_end,
          bool squares, std::mt19937& random) {
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  std::vector<T> plane(static_cast<size_t>(height * width));
  for (T& v : plane) {
    v = static_cast<T>(uniform(random));
  }
  WindowSums<T> sums(width, rows, cols);
  const RowRange reached = sums.rows_reached(row_begin, row_end, height);
  // Exactly the rows the sums may read: a vector reaching past them is what the sanitizer sees.
  const std::vector<T> values(plane.begin() + reached.first * width, plane.begin() + reached.last * width);
  std::vector<T> out(static_cast<size_t>((row_end - row_begin) * width));
  sums.run({values.data(), squares}, height, row_begin, row_end, out.data());
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t x = 0; x < width; ++x) {
      double expected = 0.0, magnitude = 0.0;
      for (int64_t i = std::max<int64_t>(0, r - rows.before); i <= std::min(height - 1, r + rows.after); ++i) {
        for (int64_t j = std::max<int64_t>(0, x - cols.before); j <= std::min(width - 1, x + cols.after); ++j) {
          const double value = plane[static_cast<size_t>(i * width + j)];
          expected += squares ? value * value : value;
          magnitude += squares ? value * value : std::fabs(value);
        }
      }
      const double got = out[static_cast<size_t>((r - row_begin) * width + x)];
      const double tolerance = (sizeof(T) == 4 ? 1e-6 : 1e-14) * (magnitude + 1.0);
      if (!(std::fabs(got - expected) <= tolerance)) {
        std::printf("%zu-byte sums, plane %lldx%lld, window rows -%lld..+%lld columns -%lld..+%lld, rows [%lld, %lld): "
                    "(%lld, %lld) = %g, expected %g\n",
                    sizeof(T), static_cast<long long>(height), static_cast<long long>(width),
                    static_cast<long long>(rows.before), static_cast<long long>(rows.after),
                    static_cast<long long>(cols.before), static_cast<long long>(cols.after),
                    static_cast<long long>(row_begin), static_cast<long long>(row_end), static_cast<long long>(r),
                    static_cast<long long>(x), got, expected);
        return 1;
      }
    }
  }
  return 0;
}

template <typename T>
int check_all(std::mt19937& random) {
  int failures = 0;
  for (int64_t width = 1; width <= 70; ++width) {
    for (int64_t window : {1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 31, 40}) {
      const WindowExtent extent = spatialnorm::forward_extent(window);
      const WindowExtent mirrored = spatialnorm::mirrored(extent);
      // A whole plane of 19 rows, and a band in the middle of a taller one, of values and squares.
      for (const bool squares : {false, true}) {
        failures += check<T>(19, width, mirrored, extent, 0, 19, squares, random);
        failures += check<T>(45, width, extent, mirrored, 13, 30, squares, random);
      }
    }
  }
  return failures;
}

}  // namespace

int main() {
  std::mt19937 random(20261202);
  const int failures = check_all<float>(random) + check_all<double>(random);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
