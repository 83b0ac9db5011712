// The interface between Metal source compiled for the CPU emulator and its runtime
// (tests/metal_emulator/runtime.cpp): where a lane learns its position, and the calls that stand
// in for what a GPU does in hardware (barriers, SIMD-group exchanges, threadgroup memory).
#pragma once

#include <cstdint>

extern "C" {

// One lane's position, as Metal's kernel attributes give it.
struct metal_emulator_lane {
  unsigned int thread_position_in_grid[3];
  unsigned int thread_position_in_threadgroup[3];
  unsigned int threadgroup_position_in_grid[3];
  unsigned int threads_per_threadgroup[3];
  unsigned int threadgroups_per_grid[3];
  unsigned int thread_index_in_threadgroup;
  unsigned int thread_index_in_simdgroup;
  unsigned int simdgroup_index_in_threadgroup;
  unsigned int threads_per_simdgroup;
};

typedef void (*metal_emulator_lane_function)(void** arguments, const metal_emulator_lane* lane);

// A threadgroup array a lane has reached the declaration of (the emulator turns each
// `threadgroup T name[...];` into a static array and this call).
void metal_emulator_threadgroup_memory(void* address, unsigned long bytes, const char* name);
void metal_emulator_barrier(void);

enum metal_emulator_simd_op {
  METAL_EMULATOR_SIMD_SUM,
  METAL_EMULATOR_SIMD_PREFIX_INCLUSIVE_SUM,
  METAL_EMULATOR_SIMD_PREFIX_EXCLUSIVE_SUM,
  METAL_EMULATOR_SIMD_MAX,
  METAL_EMULATOR_SIMD_MIN,
  METAL_EMULATOR_SIMD_SHUFFLE,
  METAL_EMULATOR_SIMD_SHUFFLE_DOWN,
  METAL_EMULATOR_SIMD_SHUFFLE_UP,
  METAL_EMULATOR_SIMD_SHUFFLE_XOR,
};
float metal_emulator_simd_float(int op, float value, unsigned int argument);
int64_t metal_emulator_simd_int(int op, int64_t value, unsigned int argument);
}
