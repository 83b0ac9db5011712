// Square tiles transposed in registers: Tile<T, kBytes> is kSize rows of one vector of kBytes.
//
// The window sums along a band's rows transpose its rows in tiles (window_sums.h), so that every
// step along a row becomes one vector operation on kSize rows at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace spatialnorm::cpu {

template <typename T, int kBytes>
struct Tile {
  static constexpr int kSize = kBytes / sizeof(T);
  typedef T Vector __attribute__((vector_size(kBytes)));
  // A vector in memory at any T's address, which may alias the T's there.
  typedef T Stored __attribute__((vector_size(kBytes), aligned(sizeof(T)), may_alias));

  static Stored& at(T* p) { return *reinterpret_cast<Stored*>(p); }
  static const Stored& at(const T* p) { return *reinterpret_cast<const Stored*>(p); }
};

namespace detail {

// Integers as wide as a vector's lanes, a vector of them as wide as the vector: the lanes of
// GCC 11's __builtin_shuffle.
template <typename Vector>
struct LaneIndices {
  using Integer = std::conditional_t<sizeof(std::declval<Vector>()[0]) == 4, int32_t, int64_t>;
  typedef Integer type __attribute__((vector_size(sizeof(Vector))));
};

// Lane p of a becomes a[p] where bit `kBit` of p is clear, else b[p - kBit]; of b, a[p + kBit]
// where it is clear, else b[p]: the off-diagonal blocks of kBit x kBit values of the two rows
// swapped. (Vectors go by reference: GCC warns that passing ones wider than the baseline's
// registers by value differs between targets.)
template <int kBit, typename Vector, size_t... kLane>
inline void swap_blocks(Vector& a, Vector& b, std::index_sequence<kLane...>) {
  constexpr int n = sizeof...(kLane);
#if defined(__clang__) || __GNUC__ >= 12
  const Vector low = __builtin_shufflevector(a, b, ((kLane & kBit) == 0 ? kLane : n + kLane - kBit)...);
  b = __builtin_shufflevector(a, b, ((kLane & kBit) == 0 ? kLane + kBit : n + kLane)...);
#else
  using Lanes = typename LaneIndices<Vector>::type;
  const Vector low = __builtin_shuffle(a, b, Lanes{((kLane & kBit) == 0 ? kLane : n + kLane - kBit)...});
  b = __builtin_shuffle(a, b, Lanes{((kLane & kBit) == 0 ? kLane + kBit : n + kLane)...});
#endif
  a = low;
}

// Rows i and i + kBit swap their off-diagonal blocks, for every i with bit kBit clear; done for
// kBit = n/2, n/4, ..., 1 this transposes the n x n tile.
template <int kBit, typename Vector, int n>
inline void swap_blocks_of_rows(Vector (&rows)[n]) {
  for (int i = 0; i < n; ++i) {
    if ((i & kBit) == 0) {
      swap_blocks<kBit>(rows[i], rows[i + kBit], std::make_index_sequence<n>());
    }
  }
  if constexpr (kBit > 1) {
    swap_blocks_of_rows<kBit / 2>(rows);
  }
}

}  // namespace detail

// to[i * to_stride + j] = from[j * from_stride + i] for i, j < Tile::kSize.
template <typename Tile, typename T>
inline void transpose_tile(const T* from, int64_t from_stride, T* to, int64_t to_stride) {
  constexpr int n = Tile::kSize;
  typename Tile::Vector rows[n];
  for (int j = 0; j < n; ++j) {
    rows[j] = Tile::at(from + j * from_stride);
  }
  detail::swap_blocks_of_rows<n / 2>(rows);
  for (int i = 0; i < n; ++i) {
    Tile::at(to + i * to_stride) = rows[i];
  }
}

}  // namespace spatialnorm::cpu

