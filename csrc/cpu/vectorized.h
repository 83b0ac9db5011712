// The CPU kernels' inner loops are plain arithmetic that the compiler vectorizes; on x86-64 Linux
// GCC builds them for AVX-512 and AVX2+FMA as well as the baseline, picked at load time.
// `flatten` inlines every helper into each clone, so that the helpers' loops get the clone's
// target too.
#pragma once

#include <ATen/Version.h>

#include <algorithm>
#include <string>
#include <type_traits>

// GCC only: clang's target_clones takes neither flatten nor noinline. GCC 11 dispatches on single
// features, not on the x86-64-v4 and v3 levels (GCC 12).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define SPATIALNORM_X86_CLONES 1
#if __GNUC__ >= 12
#define SPATIALNORM_TARGETS "arch=x86-64-v4", "arch=x86-64-v3", "default"
#else
#define SPATIALNORM_TARGETS "avx512f", "avx2", "default"
#endif
#define SPATIALNORM_VECTORIZED __attribute__((flatten, target_clones(SPATIALNORM_TARGETS)))
// For the helpers a kernel calls once per band of rows: compiled once per target rather than
// inlined into each kernel's clones (the window sums alone took the build 5 minutes instead of 1).
#define SPATIALNORM_VECTORIZED_APART __attribute__((noinline, flatten, target_clones(SPATIALNORM_TARGETS)))
#else
#define SPATIALNORM_X86_CLONES 0
#define SPATIALNORM_VECTORIZED
#define SPATIALNORM_VECTORIZED_APART
#endif

namespace spatialnorm::cpu {

// The width in bytes of the vector registers of the clone the CPU runs, at most the width that
// PyTorch's ATEN_CPU_CAPABILITY allows ("avx2": 32, "default": 16), as for ATen's own kernels.
inline int vector_bytes() {
#if SPATIALNORM_X86_CLONES
  static const int bytes = [] {
    // The features of x86-64-v4 and v3 that matter here (GCC 11 knows no level names).
    const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int supported = v4 ? 64 : v3 ? 32 : 16;
    const std::string allowed = at::get_cpu_capability();
    return std::min(supported, allowed == "AVX512" ? 64 : allowed == "AVX2" ? 32 : 16);
  }();
  return bytes;
#else
  return 16;  // NEON on arm64
#endif
}

// Returns fn(std::integral_constant<int, vector_bytes()>()): code written with explicit vectors of
// that width (transpose.h) compiles to whole registers, where wider ones would be split by the
// compiler, slowly.
template <typename Fn>
decltype(auto) with_vector_bytes(const Fn& fn) {
#if SPATIALNORM_X86_CLONES
  switch (vector_bytes()) {
    case 64: return fn(std::integral_constant<int, 64>());
    case 32: return fn(std::integral_constant<int, 32>());
    default: break;
  }
#endif
  return fn(std::integral_constant<int, 16>());
}

}  // namespace spatialnorm::cpu
