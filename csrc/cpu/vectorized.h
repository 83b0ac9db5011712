// The CPU kernels' inner loops are plain arithmetic that the compiler vectorizes; on x86-64 Linux
// they are built for AVX-512 and AVX2+FMA as well as the baseline, and picked at load time.
// `flatten` inlines every helper into each clone, so that the helpers' loops get the clone's
// target too.
#pragma once

#include <type_traits>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define SPATIALNORM_X86_CLONES 1
#define SPATIALNORM_VECTORIZED __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// For the helpers a kernel calls once per band of rows: compiled once per target rather than
// inlined into each kernel's clones (the window sums alone took the build 5 minutes instead of 1).
#define SPATIALNORM_VECTORIZED_APART \
  __attribute__((noinline, flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPATIALNORM_X86_CLONES 0
#define SPATIALNORM_VECTORIZED
#define SPATIALNORM_VECTORIZED_APART
#endif

namespace spatialnorm::cpu {

// Returns fn(std::integral_constant<int, bytes>()) for the width in bytes of the vector registers
// of the clone the CPU runs: code written with explicit vectors of that width (transpose.h)
// compiles to whole registers, where wider ones would be split by the compiler, slowly.
template <typename Fn>
decltype(auto) with_vector_bytes(const Fn& fn) {
#if SPATIALNORM_X86_CLONES
  if (__builtin_cpu_supports("x86-64-v4")) {
    return fn(std::integral_constant<int, 64>());
  }
  if (__builtin_cpu_supports("x86-64-v3")) {
    return fn(std::integral_constant<int, 32>());
  }
#endif
  return fn(std::integral_constant<int, 16>());  // SSE2, and NEON on arm64
}

}  // namespace spatialnorm::cpu
