// The runtime of the Metal emulator: runs the lanes of each threadgroup as fibers with Metal's
// barrier semantics, and watches every memory access of the kernel code.
//
// The kernel code is compiled with GCC's -fsanitize=thread, which makes the compiler call
// __tsan_read4(address), __tsan_write2(address), ... before each load and store. The sanitizer's
// own runtime is not linked: this file defines those functions, so each access of a lane reaches
// `observe` with the lane that made it. That is how the emulator finds, without changing the
// kernels: races on threadgroup memory (two lanes touch one byte between two barriers, one
// writing), reads of threadgroup memory never written, two lanes writing one device byte in a
// dispatch, accesses outside a buffer, and the memory traffic of each SIMD-group instruction.
// This file itself is compiled without instrumentation.
#include "metal_emulator_runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr unsigned kSimdWidth = 32;
constexpr unsigned long kMaxThreadgroupBytes = 32 * 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr uint64_t kSegmentBytes = 64;

enum class State { Ready, AtBarrier, AtSimd, Done };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  State state = State::Done;
  metal_emulator_lane lane{};
  unsigned global_index = 0;  // the lane's index in the whole dispatch
  uintptr_t waiting_at = 0;   // the call site of the barrier or SIMD function it waits in
  int simd_op = 0;
  unsigned simd_argument = 0;
  bool simd_is_float = true;
  double simd_value = 0, simd_result = 0;
  std::unordered_map<uintptr_t, uint32_t> executions;  // per access site, for the traffic model
};

struct Buffer {
  uintptr_t begin, end;
  bool writable;
  std::string name;
  std::vector<int32_t> writer;  // per byte: 1 + the global index of the lane that wrote it
  bool read_prior = false;      // whether the dispatch read a byte it had not written (in place)
};

struct ThreadgroupArray {
  uintptr_t begin, end;
  std::string name;
};

// Per byte of threadgroup memory: who touched it since the last barrier.
struct Shadow {
  uint64_t epoch = 0;       // barrier interval of the fields below
  uint64_t written_in = 0;  // threadgroup (serial number) in which the byte was last written
  int32_t writer = -1, reader = -1;
};
constexpr int32_t kManyReaders = -2;

// One SIMD-group instruction: the accesses of its lanes to one buffer.
struct Instruction {
  std::vector<std::pair<uintptr_t, unsigned>> accesses;  // (offset in the buffer, bytes)
};

struct InstructionKey {
  uintptr_t site;
  uint32_t simdgroup, execution, buffer;
  bool write;
  bool operator==(const InstructionKey& o) const {
    return site == o.site && simdgroup == o.simdgroup && execution == o.execution && buffer == o.buffer && write == o.write;
  }
};

struct InstructionHash {
  size_t operator()(const InstructionKey& k) const {
    return std::hash<uintptr_t>()(k.site) ^ (size_t(k.simdgroup) << 40) ^ (size_t(k.execution) << 8) ^ (size_t(k.buffer) << 2) ^ k.write;
  }
};

struct Traffic {
  uint64_t bytes_read = 0, bytes_written = 0;
  uint64_t useful_bytes = 0, segment_bytes = 0, instructions = 0;
};

struct Dispatch {
  metal_emulator_lane_function function = nullptr;
  void** arguments = nullptr;
  unsigned grid[3]{}, group[3]{}, groups[3]{};
  unsigned lanes_per_group = 0;
  unsigned order = 0;
};

Dispatch dispatch;
std::vector<Buffer> buffers;
std::vector<ThreadgroupArray> threadgroup_arrays;
std::vector<Shadow> threadgroup_shadow;  // parallel to threadgroup_arrays, concatenated
std::vector<size_t> shadow_start;
unsigned long threadgroup_bytes = 0;
std::vector<Fiber> fibers;
Fiber* current = nullptr;
ucontext_t scheduler;
uint64_t epoch = 1, group_serial = 0;
std::string error;
bool failed = false;
Traffic traffic;
std::unordered_map<InstructionKey, Instruction, InstructionHash> instructions;

unsigned current_group[3];

std::string group_name() {
  char text[64];
  std::snprintf(text, sizeof text, "threadgroup (%u, %u, %u)", current_group[0], current_group[1], current_group[2]);
  return text;
}

// Ends the dispatch with an error (the first one stands). Called from a lane, the lane never
// resumes; called from the scheduler, the scheduler stops at its next check.
void fail(const std::string& message) {
  if (!failed) {
    failed = true;
    error = message;
  }
  if (current != nullptr) {
    swapcontext(&current->context, &scheduler);
  }
}

void observe_threadgroup(size_t array, uintptr_t address, unsigned size, bool write) {
  const ThreadgroupArray& a = threadgroup_arrays[array];
  const int32_t lane = static_cast<int32_t>(current->lane.thread_index_in_threadgroup);
  for (unsigned i = 0; i < size; ++i) {
    const uintptr_t offset = address + i - a.begin;
    Shadow& s = threadgroup_shadow[shadow_start[array] + offset];
    if (s.epoch != epoch) {
      s.epoch = epoch;
      s.writer = s.reader = -1;
    }
    auto race = [&](int32_t other, const char* what) {
      fail("data race on threadgroup memory: lanes " + std::to_string(other) + " and " + std::to_string(lane) +
           " of " + group_name() + " both access byte " + std::to_string(offset) + " of `" + a.name +
           "` between two barriers (" + what + ")");
    };
    if (write) {
      if (s.writer >= 0 && s.writer != lane) race(s.writer, "both write");
      if (s.reader == kManyReaders || (s.reader >= 0 && s.reader != lane)) race(s.reader, "one reads, one writes");
      s.writer = lane;
      s.written_in = group_serial;
    } else {
      if (s.written_in != group_serial) {
        fail("lane " + std::to_string(lane) + " of " + group_name() + " reads byte " + std::to_string(offset) +
             " of threadgroup memory `" + a.name + "`, which no lane has written");
      }
      if (s.writer >= 0 && s.writer != lane) race(s.writer, "one writes, one reads");
      s.reader = s.reader == -1 || s.reader == lane ? lane : kManyReaders;
    }
  }
}

void observe_device(Buffer& b, uintptr_t address, unsigned size, bool write, uintptr_t site) {
  if (address < b.begin || address + size > b.end) {
    fail(std::string("out-of-bounds ") + (write ? "write to" : "read of") + " buffer '" + b.name + "' at byte " +
         std::to_string(static_cast<long long>(address - b.begin)) + " by lane " +
         std::to_string(current->global_index));
  }
  const uintptr_t offset = address - b.begin;
  if (write) {
    if (!b.writable) {
      fail("write to read-only buffer '" + b.name + "'");
    }
    for (unsigned i = 0; i < size; ++i) {
      int32_t& w = b.writer[offset + i];
      if (w != 0 && w != static_cast<int32_t>(current->global_index) + 1) {
        fail("lanes " + std::to_string(w - 1) + " and " + std::to_string(current->global_index) +
             " both write byte " + std::to_string(offset + i) + " of buffer '" + b.name + "' in one dispatch");
      }
      w = static_cast<int32_t>(current->global_index) + 1;
    }
    traffic.bytes_written += size;
  } else {
    for (unsigned i = 0; b.writable && !b.read_prior && i < size; ++i) {
      b.read_prior = b.writer[offset + i] == 0;
    }
    traffic.bytes_read += size;
  }
  // The k-th execution of one access site by the lanes of one SIMD-group is one instruction.
  const uint32_t k = current->executions[site]++;
  const InstructionKey key{site, current->lane.simdgroup_index_in_threadgroup, k,
                           static_cast<uint32_t>(&b - buffers.data()), write};
  instructions[key].accesses.emplace_back(offset, size);
}

void observe(const void* pointer, unsigned size, bool write, uintptr_t site) {
  if (current == nullptr || failed) {
    return;
  }
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  for (size_t i = 0; i < threadgroup_arrays.size(); ++i) {
    if (address >= threadgroup_arrays[i].begin && address < threadgroup_arrays[i].end) {
      observe_threadgroup(i, address, size, write);
      return;
    }
  }
  for (Buffer& b : buffers) {
    if (address >= b.begin && address < b.end) {
      observe_device(b, address, size, write, site);
      return;
    }
  }
  // The host surrounds each buffer with guard zones of this size (GUARD_BYTES in emulator.py):
  // nothing else lives there, so an access to one is an overrun of that buffer.
  constexpr uintptr_t kGuardBytes = 256;
  for (Buffer& b : buffers) {
    if (address + kGuardBytes >= b.begin && address < b.end + kGuardBytes) {
      observe_device(b, address, size, write, site);
      return;
    }
  }
}

// Folds the instructions of a finished threadgroup into the dispatch's traffic: the bytes each
// instruction asks for, and the 64-byte segments of memory it touches.
void count_instructions() {
  for (auto& entry : instructions) {
    auto& accesses = entry.second.accesses;
    std::vector<uint64_t> bytes, segments;
    for (auto [offset, size] : accesses) {
      for (unsigned i = 0; i < size; ++i) bytes.push_back(offset + i);
      segments.push_back(offset / kSegmentBytes);
      segments.push_back((offset + size - 1) / kSegmentBytes);
    }
    std::sort(bytes.begin(), bytes.end());
    std::sort(segments.begin(), segments.end());
    const uint64_t distinct_bytes = std::unique(bytes.begin(), bytes.end()) - bytes.begin();
    const uint64_t distinct_segments = std::unique(segments.begin(), segments.end()) - segments.begin();
    traffic.useful_bytes += distinct_bytes;
    traffic.segment_bytes += distinct_segments * kSegmentBytes;
    traffic.instructions += 1;
  }
  instructions.clear();
}

void fiber_main() {
  Fiber* fiber = current;
  dispatch.function(dispatch.arguments, &fiber->lane);
  fiber->state = State::Done;
  swapcontext(&fiber->context, &scheduler);
}

// Runs `fiber` until it waits or ends.
void resume(Fiber& fiber) {
  current = &fiber;
  swapcontext(&scheduler, &fiber.context);
  current = nullptr;
}

void resolve_simd(std::vector<Fiber*>& lanes) {
  Fiber* by_lane[kSimdWidth] = {};
  for (Fiber* f : lanes) by_lane[f->lane.thread_index_in_simdgroup] = f;
  const bool is_float = lanes[0]->simd_is_float;
  auto value = [&](unsigned lane, Fiber* asking) -> double {
    if (lane >= kSimdWidth || by_lane[lane] == nullptr) {
      fail("lane " + std::to_string(asking->lane.thread_index_in_threadgroup) + " reads SIMD lane " +
           std::to_string(lane) + " in a SIMD-group function, which is not active (its value is undefined)");
      return 0;
    }
    return by_lane[lane]->simd_value;
  };
  for (Fiber* f : lanes) {
    const unsigned me = f->lane.thread_index_in_simdgroup;
    double result = 0;
    switch (f->simd_op) {
      case METAL_EMULATOR_SIMD_SUM:
      case METAL_EMULATOR_SIMD_PREFIX_INCLUSIVE_SUM:
      case METAL_EMULATOR_SIMD_PREFIX_EXCLUSIVE_SUM: {
        const unsigned end = f->simd_op == METAL_EMULATOR_SIMD_SUM ? kSimdWidth
                             : f->simd_op == METAL_EMULATOR_SIMD_PREFIX_INCLUSIVE_SUM ? me + 1
                                                                                      : me;
        float float_sum = 0;
        int64_t int_sum = 0;
        for (unsigned l = 0; l < end; ++l) {
          if (by_lane[l] != nullptr) {
            float_sum += static_cast<float>(by_lane[l]->simd_value);
            int_sum += static_cast<int64_t>(by_lane[l]->simd_value);
          }
        }
        result = is_float ? float_sum : static_cast<double>(int_sum);
        break;
      }
      case METAL_EMULATOR_SIMD_MAX:
      case METAL_EMULATOR_SIMD_MIN: {
        result = f->simd_value;
        for (Fiber* other : lanes) {
          result = f->simd_op == METAL_EMULATOR_SIMD_MAX ? std::max(result, other->simd_value)
                                                         : std::min(result, other->simd_value);
        }
        break;
      }
      case METAL_EMULATOR_SIMD_SHUFFLE: result = value(f->simd_argument, f); break;
      case METAL_EMULATOR_SIMD_SHUFFLE_XOR: result = value(me ^ f->simd_argument, f); break;
      // Lanes shifted past either end keep their own value, as in Metal.
      case METAL_EMULATOR_SIMD_SHUFFLE_DOWN:
        result = me + f->simd_argument < kSimdWidth ? value(me + f->simd_argument, f) : f->simd_value;
        break;
      case METAL_EMULATOR_SIMD_SHUFFLE_UP:
        result = me >= f->simd_argument ? value(me - f->simd_argument, f) : f->simd_value;
        break;
    }
    f->simd_result = result;
  }
  for (Fiber* f : lanes) f->state = State::Ready;
}

// The order in which a threadgroup's ready lanes run: forward, backward or shuffled, by group.
std::vector<unsigned> lane_order(unsigned group_index) {
  std::vector<unsigned> order(dispatch.lanes_per_group);
  for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
  switch ((group_index + dispatch.order) % 3) {
    case 1: std::reverse(order.begin(), order.end()); break;
    case 2: {
      uint64_t state = 0x9E3779B97F4A7C15ull * (group_index + 1);
      for (size_t i = order.size(); i > 1; --i) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        std::swap(order[i - 1], order[state % i]);
      }
      break;
    }
  }
  return order;
}

void run_group(const unsigned position[3], unsigned group_index) {
  std::copy(position, position + 3, current_group);
  ++group_serial;
  ++epoch;
  threadgroup_arrays.clear();
  shadow_start.clear();
  threadgroup_shadow.clear();
  threadgroup_bytes = 0;
  unsigned size[3];
  for (int d = 0; d < 3; ++d) {
    // dispatchThreads: the groups at the grid's far edges are cut to the grid.
    size[d] = std::min(dispatch.group[d], dispatch.grid[d] - position[d] * dispatch.group[d]);
  }
  const unsigned lanes = size[0] * size[1] * size[2];
  for (unsigned i = 0; i < lanes; ++i) {
    Fiber& f = fibers[i];
    metal_emulator_lane& l = f.lane;
    const unsigned in_group[3] = {i % size[0], i / size[0] % size[1], i / (size[0] * size[1])};
    for (int d = 0; d < 3; ++d) {
      l.thread_position_in_threadgroup[d] = in_group[d];
      l.threadgroup_position_in_grid[d] = position[d];
      l.threads_per_threadgroup[d] = size[d];
      l.threadgroups_per_grid[d] = dispatch.groups[d];
      l.thread_position_in_grid[d] = position[d] * dispatch.group[d] + in_group[d];
    }
    l.thread_index_in_threadgroup = i;
    l.thread_index_in_simdgroup = i % kSimdWidth;
    l.simdgroup_index_in_threadgroup = i / kSimdWidth;
    l.threads_per_simdgroup = kSimdWidth;
    f.global_index = l.thread_position_in_grid[0] +
                     dispatch.grid[0] * (l.thread_position_in_grid[1] + dispatch.grid[1] * l.thread_position_in_grid[2]);
    f.state = State::Ready;
    f.executions.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  const std::vector<unsigned> order = lane_order(group_index);
  while (!failed) {
    for (unsigned i : order) {
      if (i < lanes && fibers[i].state == State::Ready && !failed) resume(fibers[i]);
    }
    if (failed) break;
    // Every lane now waits or is done. SIMD-groups whose active lanes all wait in a SIMD function
    // exchange their values; otherwise the threadgroup may pass a barrier that every lane reached.
    bool progressed = false;
    for (unsigned s = 0; s * kSimdWidth < lanes && !failed; ++s) {
      std::vector<Fiber*> waiting;
      bool all = true;
      for (unsigned i = s * kSimdWidth; i < std::min(lanes, (s + 1) * kSimdWidth); ++i) {
        if (fibers[i].state == State::AtSimd) waiting.push_back(&fibers[i]);
        else if (fibers[i].state != State::Done) all = false;
      }
      if (waiting.empty() || !all) continue;
      for (Fiber* f : waiting) {
        if (f->waiting_at != waiting[0]->waiting_at) {
          fail("lanes of SIMD-group " + std::to_string(s) + " of " + group_name() +
               " call different SIMD-group functions at once (divergent control flow)");
        }
      }
      if (!failed) resolve_simd(waiting);
      progressed = true;
    }
    if (failed) break;
    if (progressed) continue;
    unsigned done = 0, at_barrier = 0;
    uintptr_t site = 0;
    for (unsigned i = 0; i < lanes; ++i) {
      if (fibers[i].state == State::Done) ++done;
      if (fibers[i].state == State::AtBarrier) {
        if (at_barrier++ == 0) site = fibers[i].waiting_at;
        else if (fibers[i].waiting_at != site) {
          fail("lanes of " + group_name() + " wait at different barriers (divergent barrier: a GPU would hang)");
        }
      }
    }
    if (failed || done == lanes) break;
    if (at_barrier != lanes) {
      fail(std::to_string(at_barrier) + " of the " + std::to_string(lanes) + " lanes of " + group_name() +
           " wait at a barrier that the others " +
           (done > 0 ? "have returned without reaching" : "wait for in a SIMD-group function") +
           " (divergent barrier: a GPU would hang)");
      break;
    }
    ++epoch;
    for (unsigned i = 0; i < lanes; ++i) fibers[i].state = State::Ready;
  }
  count_instructions();
}

void wait_here(State state, uintptr_t site) {
  if (current == nullptr) {
    return;
  }
  current->state = state;
  current->waiting_at = site;
  swapcontext(&current->context, &scheduler);
}

}  // namespace

extern "C" {

void metal_emulator_threadgroup_memory(void* address, unsigned long bytes, const char* name) {
  const auto begin = reinterpret_cast<uintptr_t>(address);
  for (const ThreadgroupArray& a : threadgroup_arrays) {
    if (a.begin == begin) return;
  }
  threadgroup_arrays.push_back({begin, begin + bytes, name});
  shadow_start.push_back(threadgroup_shadow.size());
  threadgroup_shadow.resize(threadgroup_shadow.size() + bytes);
  std::memset(address, 0xFF, bytes);  // NaN, for a read the checks would miss
  threadgroup_bytes += bytes;
  if (threadgroup_bytes > kMaxThreadgroupBytes) {
    fail("the kernel declares " + std::to_string(threadgroup_bytes) +
         " bytes of threadgroup memory, over Metal's limit of 32 KiB");
  }
}

void metal_emulator_barrier(void) { wait_here(State::AtBarrier, reinterpret_cast<uintptr_t>(__builtin_return_address(0))); }

static double simd_exchange(int op, double value, unsigned argument, bool is_float, uintptr_t site) {
  if (current == nullptr) return value;
  current->simd_op = op;
  current->simd_value = value;
  current->simd_argument = argument;
  current->simd_is_float = is_float;
  wait_here(State::AtSimd, site);
  return current->simd_result;
}

float metal_emulator_simd_float(int op, float value, unsigned int argument) {
  return static_cast<float>(simd_exchange(op, value, argument, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0))));
}

int64_t metal_emulator_simd_int(int op, int64_t value, unsigned int argument) {
  return static_cast<int64_t>(
      simd_exchange(op, static_cast<double>(value), argument, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0))));
}

// The host side, called from Python through ctypes.

void metal_emulator_reset_buffers(void) { buffers.clear(); }

void metal_emulator_add_buffer(void* address, unsigned long bytes, int writable, const char* name) {
  const auto begin = reinterpret_cast<uintptr_t>(address);
  buffers.push_back({begin, begin + bytes, writable != 0, name, {}});
  if (writable) buffers.back().writer.assign(bytes, 0);
}

// For a writable buffer whose earlier contents the dispatch never read: 1 per byte it wrote, 0
// per byte it left (the host makes those NaN, so an output element never written shows). A buffer
// the dispatch updated in place keeps its contents, as on a GPU: returns 0 and leaves `mask`.
int metal_emulator_written_bytes(unsigned index, unsigned char* mask) {
  const Buffer& b = buffers.at(index);
  if (!b.writable || b.read_prior) {
    return 0;
  }
  for (size_t i = 0; i < b.writer.size(); ++i) {
    mask[i] = b.writer[i] != 0;
  }
  return 1;
}

// Runs a dispatch of `grid` threads in threadgroups of `group`; returns 0, or 1 with the reason
// in metal_emulator_error().
int metal_emulator_dispatch(metal_emulator_lane_function function, void** arguments, const unsigned grid[3],
                            const unsigned group[3], unsigned order) {
  failed = false;
  error.clear();
  traffic = Traffic{};
  dispatch.function = function;
  dispatch.arguments = arguments;
  dispatch.order = order;
  dispatch.lanes_per_group = group[0] * group[1] * group[2];
  for (int d = 0; d < 3; ++d) {
    dispatch.grid[d] = grid[d];
    dispatch.group[d] = group[d];
    dispatch.groups[d] = (grid[d] + group[d] - 1) / group[d];
  }
  if (fibers.size() < dispatch.lanes_per_group) {
    fibers.resize(dispatch.lanes_per_group);
    for (Fiber& f : fibers) f.stack.resize(kStackBytes);
  }
  unsigned index = 0;
  unsigned position[3];
  for (position[2] = 0; position[2] < dispatch.groups[2] && !failed; ++position[2]) {
    for (position[1] = 0; position[1] < dispatch.groups[1] && !failed; ++position[1]) {
      for (position[0] = 0; position[0] < dispatch.groups[0] && !failed; ++position[0]) {
        run_group(position, index++);
      }
    }
  }
  instructions.clear();
  return failed ? 1 : 0;
}

const char* metal_emulator_error(void) { return error.c_str(); }

// bytes read, bytes written, bytes the instructions asked for, bytes of the segments they touched,
// instructions, threadgroup memory declared.
void metal_emulator_traffic(uint64_t out[6]) {
  out[0] = traffic.bytes_read;
  out[1] = traffic.bytes_written;
  out[2] = traffic.useful_bytes;
  out[3] = traffic.segment_bytes;
  out[4] = traffic.instructions;
  out[5] = threadgroup_bytes;
}

// The hooks GCC's -fsanitize=thread calls in the kernel code.
#define METAL_EMULATOR_HOOKS(size)                                                                        \
  void __tsan_read##size(void* p) { observe(p, size, false, (uintptr_t)__builtin_return_address(0)); }  \
  void __tsan_write##size(void* p) { observe(p, size, true, (uintptr_t)__builtin_return_address(0)); }  \
  void __tsan_unaligned_read##size(void* p) { observe(p, size, false, (uintptr_t)__builtin_return_address(0)); } \
  void __tsan_unaligned_write##size(void* p) { observe(p, size, true, (uintptr_t)__builtin_return_address(0)); }
METAL_EMULATOR_HOOKS(1)
METAL_EMULATOR_HOOKS(2)
METAL_EMULATOR_HOOKS(4)
METAL_EMULATOR_HOOKS(8)
METAL_EMULATOR_HOOKS(16)
void __tsan_read_range(void* p, unsigned long size) { observe(p, size, false, (uintptr_t)__builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long size) { observe(p, size, true, (uintptr_t)__builtin_return_address(0)); }
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void) {}
void __tsan_init(void) {}
}
