// What the CUDA kernels that keep their window sums in registers share (register_forward.cu,
// register_backward.cu): how the planes are cut into segments of a warp that walk down bands of
// rows, a group of consecutive columns a thread (kColumns: four or eight, each kernel's own), and
// the window sums of a row of a group's values with the values its neighbours lend by warp
// shuffles.
//
// Threads side by side along a row form a segment of 4 to 32 lanes of a warp. A window reaches one
// or two lanes beyond a thread's own columns, so a sum that needs its neighbours' values is right
// everywhere but in the lanes at a segment's ends (Segments::halo_lanes on each side, as many as
// the columns each kernel's windows reach beyond a thread's own take: its kReach). Those halo
// lanes only lend; the others write their columns.
#pragma once

#include "../spatial_norm.h"
#include "divider.cuh"
#include "lanes.cuh"
#include "tiles.cuh"

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

namespace spatialnorm::cuda {

constexpr int kSegmentBlockThreads = 256;
// The columns a thread owns where 16-bit rows allow it: one 16-byte load a row, as float32's four.
constexpr int kWideColumns = 8;
constexpr unsigned int kAllLanes = 0xffffffffu;

// How the planes are cut into segments: each takes a band of rows of a plane and a stretch of
// its columns, (lanes - 2 * halo_lanes) groups of a thread's columns wide.
struct Segments {
  int height;
  int width;
  int row_bytes;   // from one row of a plane to the next
  int lanes_log2;  // lanes per segment: 4 to 32
  int halo_lanes;  // on each side
  int band_rows;   // of every band but perhaps a plane's last
  int steps;       // rows a segment reads: band_rows and the rows its windows reach above and below
  Divider tiles_across;
  Divider bands_down;
  unsigned int count;

  __host__ __device__ int lanes() const { return 1 << lanes_log2; }
};

// Where a thread's segment and columns lie.
struct Place {
  int64_t plane_offset;  // of the thread's first column in the planes
  int row0;              // the band's first row
  int row_end;
  bool reads;            // its columns lie in the plane (lanes beyond it read zeros)
  bool writes;           // it also owns them (not a halo lane)
};

template <int kColumns>
__device__ inline Place locate(const Segments& s) {
  const unsigned int segment = (blockIdx.x * kSegmentBlockThreads + threadIdx.x) >> s.lanes_log2;
  const int lane = threadIdx.x & (s.lanes() - 1);
  const auto across = s.tiles_across.divmod(segment);
  const auto down = s.bands_down.divmod(across.div);
  const int owned = s.lanes() - 2 * s.halo_lanes;
  const int column = (static_cast<int>(across.mod) * owned + lane - s.halo_lanes) * kColumns;
  Place place;
  place.plane_offset = static_cast<int64_t>(down.div) * s.height * s.width + column;
  place.row0 = static_cast<int>(down.mod) * s.band_rows;
  place.row_end = min(place.row0 + s.band_rows, s.height);
  place.reads = segment < s.count && column >= 0 && column < s.width;
  place.writes = place.reads && lane >= s.halo_lanes && lane < s.lanes() - s.halo_lanes;
  return place;
}

// Where row `row` of the plane at `plane` starts: one 32 x 32-bit multiply-add into 64 bits. In
// C++ (even as unsigned numbers) NVVM widened the row's bytes and multiplied in 64 bits, which
// took four instructions an address; a product of int took five. The sum stays in C++ so that
// the compiler still knows the address global. Only rows of the plane are read or written, so
// that `row` is never negative where it matters.
template <typename T>
__device__ inline T* plane_row(T* plane, const Segments& s, int row) {
  using Byte = std::conditional_t<std::is_const_v<T>, const unsigned char, unsigned char>;
  uint64_t offset;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(offset) : "r"(row), "r"(s.row_bytes));
  return reinterpret_cast<T*>(reinterpret_cast<Byte*>(plane) + offset);
}

// The groups of values at a thread's kColumns columns of a plane's rows, the row `row` at step 0
// and one row further down each step, up to the segment's last step; each is loaded kAhead steps
// before it is taken, so that that many loads are in flight. Zeros before step kFirstStep, for rows
// outside the plane and where the columns lie outside it. Offsets within a plane fit 32 bits
// (segments_for).
//
// A segment's row is a short stretch of memory (224 bytes of a bfloat16 plane 112 wide), and the
// segments walking down their bands at once are thousands: read a row at a time, DRAM serves them
// at the speed of scattered requests, not of a stream (on an H200 a plain copy walking bands of
// 112x112 bfloat16 planes a row at a time took 44 us, two rows at a time 35, four 30.5; a copy 27).
// So the queue also asks L2 for the rows kPrefetchRows at a time, a run of memory each, well before
// their loads.
//
// The caller's loop unrolls kUnrolled steps at a time from step 0: where that is a whole number of
// turns of the queue, each step's place in it is known at compile time; elsewhere the queue
// rotates, and ptxas copies each of its registers every step (the bfloat16 forward at 5x5: four
// moves in a step of some 200 instructions; its gradient: 27 moves a step with two loads ahead
// rotating, 16 with one). A loop unrolled to whole turns of an odd window's rings and of two loads
// ahead is twice as long, which can cost more than the copies (register_backward.cu).
template <typename scalar_t, int kColumns, int kAhead, int kPrefetchRows, int kUnrolled, int kFirstStep = 0>
class RowQueue {
  static_assert(kAhead > 0 && kPrefetchRows > 0, "rows are loaded and prefetched ahead");

 public:
  using Group = Stored<scalar_t, kColumns>;

  __device__ RowQueue(const scalar_t* __restrict__ plane, const Segments& s, const Place& place, int row)
      : plane_(plane),
        s_(s),
        row_(row),
        first_(max(kFirstStep, -row)),
        count_(place.reads ? max(0, min(s.steps, s.height - row) - first_) : 0) {
    prefetch(0);
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      queue_[a] = load(a);
    }
  }

  // The group of the row of this step, and the load of the row kAhead steps further down. Steps
  // are taken in order, one a call.
  __device__ Group take(int step) {
    if (step % kPrefetchRows == 0) {
      prefetch(step + kPrefetchRows);
    }
    if constexpr (kUnrolled % kAhead == 0) {
      Group& place = queue_[step % kAhead];
      const Group taken = place;
      place = load(step + kAhead);
      return taken;
    } else {
      const Group taken = queue_[0];
#pragma unroll
      for (int a = 0; a + 1 < kAhead; ++a) {
        queue_[a] = queue_[a + 1];
      }
      queue_[kAhead - 1] = load(step + kAhead);
      return taken;
    }
  }

 private:
  // The steps wanted are count_ from first_: one comparison a step instead of one a bound. The
  // bfloat16 5x5 forward issued 38.6 instructions an element, 14 of them integer (Nsight Compute);
  // on an H200 (32x64x112x112) this took bfloat16 forwards 3x3 / 9x9 from 40.0 / 52.6 us to 39.2 /
  // 50.0 and gradients 1-2% faster, float32 within 1.5% either way.
  __device__ bool wanted(int step) const {
    return static_cast<unsigned>(step - first_) < static_cast<unsigned>(count_);
  }

  __device__ const scalar_t* address(int step) const { return plane_row(plane_, s_, row_ + step); }

  __device__ Group load(int step) const {
    return wanted(step) ? *reinterpret_cast<const Group*>(address(step)) : Group(0);
  }

  // Into L2: the groups of the rows of kPrefetchRows steps from this one.
  __device__ void prefetch(int first_step) const {
#pragma unroll
    for (int i = 0; i < kPrefetchRows; ++i) {
      // Predicated rather than branched around: a branch a row cost a divergence region
      // (three instructions) on top of the prefetch.
      asm volatile(
          "{\n"
          "  .reg .pred wanted;\n"
          "  setp.ne.u32 wanted, %1, 0;\n"
          "  @wanted prefetch.global.L2 [%0];\n"
          "}" ::"l"(address(first_step + i)),
          "r"(static_cast<unsigned>(wanted(first_step + i))));
    }
  }

  const scalar_t* __restrict__ plane_;
  const Segments& s_;  // the kernel's parameter: read where it lies, not copied to registers
  int row_;            // at step 0
  int first_;          // the first step wanted: from kFirstStep, at the plane's first row or later
  int count_;          // steps wanted from it: within the segment's steps, the plane's rows, and none where
                       // the columns lie outside the plane
  Group queue_[kAhead];
};

// out[i] = terms[i] + ... + terms[i + kWindow - 1] for i < kCount, all indices known at compile
// time so that the terms stay in registers. Windows go in chunks of consecutive ones (as in
// shared_tile.cuh's chunk_window_sums): window i0 + t is the chunk's suffix from i0 + t plus the
// terms after the chunk that it reaches, a prefix the chunk's windows share and that grows by
// one term per window.
template <int kWindow, int kCount, typename T>
__device__ inline void sliding_sums(const T (&terms)[kCount + kWindow - 1], T (&out)[kCount]) {
  constexpr int kChunk = kWindow < kCount ? kWindow : kCount;
#pragma unroll
  for (int i0 = 0; i0 < kCount; i0 += kChunk) {
    T suffix[kChunk];
    suffix[kChunk - 1] = terms[i0 + kChunk - 1];
#pragma unroll
    for (int t = kChunk - 2; t >= 0; --t) {
      suffix[t] = terms[i0 + t] + suffix[t + 1];
    }
    T beyond = 0;  // terms i0 + kChunk .. i0 + t + kWindow - 1
#pragma unroll
    for (int j = i0 + kChunk; j < i0 + kWindow; ++j) {
      beyond = j == i0 + kChunk ? terms[j] : beyond + terms[j];
    }
#pragma unroll
    for (int t = 0; t < kChunk && i0 + t < kCount; ++t) {
      const int last = i0 + t + kWindow - 1;
      if (t > 0) {
        beyond = last == i0 + kChunk ? terms[last] : beyond + terms[last];
      }
      out[i0 + t] = last < i0 + kChunk ? suffix[t] : suffix[t] + beyond;
    }
  }
}

// The lanes beyond a thread's own that a window reaching `columns` columns past them takes, where
// each lane owns `per_lane` columns.
__host__ __device__ constexpr int lanes_reached(int columns, int per_lane) {
  return (columns + per_lane - 1) / per_lane;
}

// The sums along the row of windows reaching kBefore columns before each of a thread's and
// kAfter after it, of `values` and the values its neighbours in the segment lend. Every lane of
// the warp must call it (shuffles). The shuffles span the whole warp, whatever the segments'
// width (no lane-count operand to set up each time): a segment's halo lanes then take values of
// the neighbouring segment's lanes, which reach only their own sums, and no written output needs
// those (halo_lanes >= lanes_reached of the window's reach).
template <int kBefore, int kAfter, typename T, int kColumns>
__device__ inline Lanes<T, kColumns> row_window_sums(const Lanes<T, kColumns>& values) {
  T terms[kColumns + kBefore + kAfter];
#pragma unroll
  for (int j = 0; j < kBefore; ++j) {
    const int lanes = lanes_reached(kBefore - j, kColumns);  // column j - kBefore of the thread's
    terms[j] = __shfl_up_sync(kAllLanes, values.v[j - kBefore + lanes * kColumns], lanes);
  }
#pragma unroll
  for (int j = 0; j < kColumns; ++j) {
    terms[kBefore + j] = values.v[j];
  }
#pragma unroll
  for (int j = 0; j < kAfter; ++j) {
    terms[kBefore + kColumns + j] = __shfl_down_sync(kAllLanes, values.v[j % kColumns], j / kColumns + 1);
  }
  Lanes<T, kColumns> sums;
  sliding_sums<kBefore + kAfter + 1, kColumns>(terms, sums.v);
  return sums;
}

// The squares of a group of values, in the compute type.
template <typename scalar_t, int kColumns>
__device__ inline Lanes<at::opmath_type<scalar_t>, kColumns> squares_of(const Stored<scalar_t, kColumns>& group) {
  Lanes<at::opmath_type<scalar_t>, kColumns> squares = widen<scalar_t, kColumns>(group);
#pragma unroll
  for (int e = 0; e < kColumns; ++e) {
    squares.v[e] *= squares.v[e];
  }
  return squares;
}

// The window sums along the row of the squares of a group of values (row_window_sums).
template <int kBefore, int kAfter, typename scalar_t, int kColumns>
__device__ inline Lanes<at::opmath_type<scalar_t>, kColumns> square_row_sums(const Stored<scalar_t, kColumns>& group) {
  return row_window_sums<kBefore, kAfter>(squares_of<scalar_t, kColumns>(group));
}

// A thread's own slots in its block's shared memory, each a value (Lanes) of up to 16 bytes or of
// 16-byte pieces: piece p of slot j of thread t at (j * pieces + p) * kSegmentBlockThreads + t, so
// that a warp's accesses to one piece are consecutive (16 bytes a lane: four wavefronts, no bank
// conflict; 32-byte slots side by side would take twice as many). No barrier: no thread reads
// another's slots.
template <typename T>
class ThreadSlots {
  static constexpr int kPieces = sizeof(T) > 16 ? sizeof(T) / 16 : 1;
  using Element = std::remove_extent_t<decltype(T::v)>;
  using Piece = std::conditional_t<kPieces == 1, T, Lanes<Element, 16 / sizeof(Element)>>;
  static constexpr int kPerPiece = sizeof(Piece) / sizeof(Element);
  static_assert(sizeof(T) == kPieces * sizeof(Piece), "slots of whole 16-byte pieces");

 public:
  // A slot, read and written as a whole value.
  class Slot {
   public:
    __device__ explicit Slot(Piece* first) : first_(first) {}

    __device__ operator T() const {  // NOLINT: read as the value it holds
      T value;
#pragma unroll
      for (int p = 0; p < kPieces; ++p) {
        const Piece piece = first_[p * kSegmentBlockThreads];
#pragma unroll
        for (int e = 0; e < kPerPiece; ++e) {
          value.v[p * kPerPiece + e] = piece.v[e];
        }
      }
      return value;
    }

    __device__ const Slot& operator=(const T& value) const {
#pragma unroll
      for (int p = 0; p < kPieces; ++p) {
        Piece piece;
#pragma unroll
        for (int e = 0; e < kPerPiece; ++e) {
          piece.v[e] = value.v[p * kPerPiece + e];
        }
        first_[p * kSegmentBlockThreads] = piece;
      }
      return *this;
    }

   private:
    Piece* first_;
  };

  __device__ explicit ThreadSlots(unsigned char* base) : base_(reinterpret_cast<Piece*>(base) + threadIdx.x) {}

  __device__ Slot operator[](int slot) const { return Slot(base_ + slot * kPieces * kSegmentBlockThreads); }

  static constexpr size_t bytes(int slots) { return sizeof(T) * slots * kSegmentBlockThreads; }

 private:
  Piece* base_;
};

// Where a thread's rings lie: in registers, with slots known at compile time (the loop over a
// ring's slots unrolled), or in its slots of shared memory (ThreadSlots), which tall windows need
// (each kernel says from which height).
enum class Storage { kRegisters, kShared };

// kSlots values of a thread's, zeros at first, in registers or in its slots of shared memory, taken
// from `free_shared` (which moves past them).
template <typename T, int kSlots, Storage kIn>
class Ring {
 public:
  __device__ explicit Ring(unsigned char*& free_shared) : slots_(take(free_shared)) {}

  // The slot's value: a reference in registers, ThreadSlots::Slot in shared memory.
  __device__ decltype(auto) operator[](int slot) { return slots_[slot]; }

  static constexpr size_t shared_bytes() { return kIn == Storage::kShared ? ThreadSlots<T>::bytes(kSlots) : 0; }

 private:
  struct Registers {
    T v[kSlots] = {};

    __device__ T& operator[](int slot) { return v[slot]; }
  };
  using Slots = std::conditional_t<kIn == Storage::kShared, ThreadSlots<T>, Registers>;

  __device__ static Slots take(unsigned char*& free_shared) {
    if constexpr (kIn == Storage::kShared) {
      const ThreadSlots<T> slots(free_shared);
      free_shared += shared_bytes();
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        slots[j] = T(0);
      }
      return slots;
    } else {
      return Registers{};
    }
  }

  Slots slots_;
};

// Window sums down the columns of rows pushed one a step: window_sum(slot) is the sum of the last
// kHeight rows pushed. Steps go in blocks of kHeight, the slot (step % kHeight) known at compile
// time where the caller unrolls a block. In registers, the sum is made from the ring of the rows,
// oldest (top) first: kHeight - 1 additions. In shared memory, a window is the suffix of the block
// before (made in place of its rows at the block's end) plus the prefix of the current one (van
// Herk / Gil-Werman, as in line_passes.cuh): about three additions a step whatever the height.
template <typename T, int kHeight, Storage kIn>
class ColumnWindowSums {
 public:
  __device__ explicit ColumnWindowSums(unsigned char*& free_shared) : ring_(free_shared) {}

  __device__ void push(int slot, const T& row) {
    ring_[slot] = row;
    if constexpr (kIn == Storage::kShared) {
      prefix_ = slot == 0 ? row : prefix_ + row;
      if (slot == kHeight - 1) {
        T suffix = row;
#pragma unroll
        for (int j = kHeight - 2; j >= 0; --j) {
          suffix += ring_[j];
          ring_[j] = suffix;
        }
      }
    }
  }

  // Of the last kHeight rows pushed, the latest at `slot`.
  __device__ T window_sum(int slot) {
    if constexpr (kIn == Storage::kShared) {
      return slot == kHeight - 1 ? prefix_ : prefix_ + ring_[(slot + 1) % kHeight];
    } else {
      T sum = ring_[(slot + 1) % kHeight];
#pragma unroll
      for (int i = 2; i <= kHeight; ++i) {
        sum += ring_[(slot + i) % kHeight];
      }
      return sum;
    }
  }

  static constexpr size_t shared_bytes() { return Ring<T, kHeight, kIn>::shared_bytes(); }

 private:
  Ring<T, kHeight, kIn> ring_;
  T prefix_ = 0;
};

// Values pushed one a step (steps in blocks of kHeight, as above), each read back up to kDepth <
// kHeight steps later. In registers a ring of kHeight slots known at compile time; in shared
// memory kDepth slots taken in turn, the oldest overwritten by the push that follows the reads.
template <typename T, int kHeight, int kDepth, Storage kIn>
class History {
 public:
  __device__ explicit History(unsigned char*& free_shared) : ring_(free_shared) {}

  // The value `steps` (0 to kDepth) steps before `next`, this step's value, which is pushed after
  // the step's reads.
  __device__ T before(int slot, int steps, const T& next) {
    if (steps == 0) {
      return next;
    }
    if constexpr (kIn == Storage::kShared) {
      // The oldest value directly: the index below costs a comparison the compiler cannot drop (it
      // does not know that oldest_ < kDepth).
      if (steps == kDepth) {
        return ring_[oldest_];
      }
      const int i = oldest_ + kDepth - steps;
      return ring_[i < kDepth ? i : i - kDepth];
    } else {
      return ring_[(slot + kHeight - steps) % kHeight];
    }
  }

  __device__ void push(int slot, const T& value) {
    if constexpr (kIn == Storage::kShared) {
      ring_[oldest_] = value;
      oldest_ = oldest_ + 1 == kDepth ? 0 : oldest_ + 1;
    } else {
      ring_[slot] = value;
    }
  }

  static constexpr size_t shared_bytes() { return Ring<T, kSlots, kIn>::shared_bytes(); }

 private:
  static_assert(kDepth < kHeight && (kDepth > 0 || kIn == Storage::kRegisters), "a history shorter than a window");
  static constexpr int kSlots = kIn == Storage::kShared ? kDepth : kHeight;
  Ring<T, kSlots, kIn> ring_;
  int oldest_ = 0;  // the slot pushed kDepth steps before (shared memory)
};

// Whether rows of whole, aligned groups of kColumns values can be loaded and stored as one in
// every tensor.
template <typename scalar_t, int kColumns>
bool rows_of_groups(const PlaneShape& shape, std::initializer_list<const at::Tensor*> tensors) {
  return rows_of_aligned_groups(shape.width, kColumns, alignof(Stored<scalar_t, kColumns>), tensors);
}

// launch(std::integral_constant<int, columns>) with kWideColumns columns a thread where `wide` and a
// 16-bit type allow it and the rows are whole, aligned groups of eight in every tensor; with four
// where they are groups of four and that did not launch (a device offering less shared memory
// than eight columns' rings take: the forward's 11x11 takes 108 KB a block, the gradient's 5x5
// 112 KB, sm_86 offers 99). Whether one launched.
template <typename scalar_t, typename Launch>
bool launch_with_columns(const PlaneShape& shape, std::initializer_list<const at::Tensor*> tensors, bool wide,
                         const Launch& launch) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (wide && rows_of_groups<scalar_t, kWideColumns>(shape, tensors) &&
        launch(std::integral_constant<int, kWideColumns>())) {
      return true;
    }
  }
  return rows_of_groups<scalar_t, 4>(shape, tensors) && launch(std::integral_constant<int, 4>());
}

// Warps of `kernel` (launched in blocks of kSegmentBlockThreads) the current device holds at once.
template <typename Kernel>
int64_t resident_warps(Kernel kernel, size_t shared_bytes) {
  return resident_blocks(kernel, kSegmentBlockThreads, shared_bytes) * (kSegmentBlockThreads / 32);
}

// Segments of 32, 16, 8 or 4 lanes, whichever has the fewest lanes in all for the plane's width
// (ties: the widest, whose halo lanes are fewer): on either side as many halo lanes as `reach`
// columns beyond a thread's own take, and at least one lane that writes. Nothing where a plane's
// offsets, a row's bytes or the indices would not fit 32 bits.
//
// Bands of kMinBandRows to kMaxBandRows rows, evened out over the plane, each reading rows_beyond
// rows more: as tall as the waves of resident warps (at least one) allow. A segment's warp takes about a step
// per row it reads, so the launch takes about (waves of warps) x (rows a band reads) steps; the
// fewest wins, ties the fewest bands. Tall bands read fewer halo rows, but a last wave that is
// mostly empty leaves the GPU idle for as long as a full one (bfloat16 3x3 gradient on an H200,
// 32x64x112x112 in 2.6 waves of bands of 28 rows: 74 us; in 1.3 waves of 56 rows: 84 us).
inline std::optional<Segments> segments_for(const PlaneShape& shape, int value_bytes, int columns, int reach,
                                            int rows_beyond, int64_t resident_warps) {
  const int halo_lanes = lanes_reached(reach, columns);
  constexpr int kMinBandRows = 16;
  constexpr int kMaxBandRows = 64;
  constexpr int64_t kLimit = std::numeric_limits<int>::max();
  if (shape.height + kMaxBandRows + rows_beyond > kLimit || shape.width + 2 * halo_lanes * columns > kLimit ||
      shape.height * shape.width > kLimit || shape.width * value_bytes > kLimit) {
    return std::nullopt;
  }
  const int64_t groups = shape.width / columns;
  int lanes_log2 = 5;
  int64_t fewest = std::numeric_limits<int64_t>::max();
  for (int log2 = 5; log2 >= 2 && (1 << log2) > 2 * halo_lanes; --log2) {
    const int64_t owned = (int64_t{1} << log2) - 2 * halo_lanes;
    const int64_t lanes = (int64_t{1} << log2) * ((groups + owned - 1) / owned);
    if (lanes < fewest) {
      fewest = lanes;
      lanes_log2 = log2;
    }
  }
  const int64_t tiles = fewest >> lanes_log2;
  int64_t bands = 0, rows = 0, least_steps = std::numeric_limits<int64_t>::max();
  for (int64_t tallest = kMaxBandRows; tallest >= kMinBandRows; --tallest) {
    const int64_t candidate_bands = (shape.height + tallest - 1) / tallest;
    const int64_t warps = (shape.planes * candidate_bands * fewest + 31) / 32;
    const int64_t waves = (warps + resident_warps - 1) / resident_warps;
    const int64_t candidate_rows = (shape.height + candidate_bands - 1) / candidate_bands;
    const int64_t steps = waves * (candidate_rows + rows_beyond);
    if (steps < least_steps) {
      least_steps = steps;
      bands = candidate_bands;
      rows = candidate_rows;
    }
  }
  const int64_t count = shape.planes * bands * tiles;
  if (count * (int64_t{1} << lanes_log2) + kSegmentBlockThreads > std::numeric_limits<unsigned int>::max() ||
      shape.planes * bands > std::numeric_limits<unsigned int>::max()) {
    return std::nullopt;
  }
  return Segments{static_cast<int>(shape.height),
                  static_cast<int>(shape.width),
                  static_cast<int>(shape.width * value_bytes),
                  lanes_log2,
                  halo_lanes,
                  static_cast<int>(rows),
                  static_cast<int>(rows + rows_beyond),
                  Divider(static_cast<unsigned int>(tiles)),
                  Divider(static_cast<unsigned int>(bands)),
                  static_cast<unsigned int>(count)};
}

// Launches kernel(pointers..., segments, k) on the current stream over the planes (of the values
// the pointers point at) cut into segments of threads owning `columns` columns each, whose windows
// reach `reach` columns beyond them and rows_beyond rows beyond a band (segments_for), with
// shared_bytes of dynamic shared memory a block; false, launching nothing, where they cannot be,
// or where the device offers a block less shared memory than that (float32 17x17 takes 100 KB,
// sm_86 offers 99).
template <typename Kernel, typename Coefficients, typename... Pointers>
bool launch_over_segments(Kernel kernel, const PlaneShape& shape, int columns, int reach, int rows_beyond,
                          size_t shared_bytes, const Coefficients& k, Pointers... pointers) {
  if (shared_bytes > static_cast<size_t>(shared_memory().per_block)) {
    return false;
  }
  ask_for_shared_memory(kernel, shared_bytes);
  constexpr int kValueBytes = static_cast<int>(std::max({sizeof(*std::declval<Pointers>())...}));
  const int64_t warps = resident_warps(kernel, shared_bytes);
  const std::optional<Segments> segments =
      warps > 0 ? segments_for(shape, kValueBytes, columns, reach, rows_beyond, warps) : std::nullopt;
  if (!segments) {
    return false;
  }
  const int64_t threads = int64_t{segments->count} << segments->lanes_log2;
  start_kernel(kernel, (threads + kSegmentBlockThreads - 1) / kSegmentBlockThreads, kSegmentBlockThreads, shared_bytes,
               pointers..., *segments, k);
  return true;
}

template <typename Launch, int... kAboveTwo>
bool with_window_size(int64_t size, const Launch& launch, std::integer_sequence<int, kAboveTwo...>) {
  bool launched = false;
  ((size == kAboveTwo + 2 && (launched = launch(std::integral_constant<int, kAboveTwo + 2>()), true)) || ...);
  return launched;
}

// launch(std::integral_constant<int, size>)'s result where size is from 2 to kLargest; false,
// launching nothing, for any other size.
template <int kLargest, typename Launch>
bool with_window_size(int64_t size, const Launch& launch) {
  return with_window_size(size, launch, std::make_integer_sequence<int, kLargest >= 2 ? kLargest - 1 : 0>());
}

}  // namespace spatialnorm::cuda
