"""The Metal emulator's own checks: each thing it must refuse, shown on a kernel with that bug
planted, and its traffic model on kernels whose figures are known."""

import pytest
import torch

from metal_emulator import BindingError, EmulatorError, compile_library

SOURCE = """
#include <metal_stdlib>
using namespace metal;

// Reverses each block of 64 values through threadgroup memory.
kernel void reverse_blocks(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                           uint lane [[thread_index_in_threadgroup]], uint block [[threadgroup_position_in_grid]]) {
  threadgroup float tile[64];
  tile[lane] = in[block * 64 + lane];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[block * 64 + lane] = tile[63 - lane];
}

// Reverses twice in place, with the barrier between the two reversals missing.
kernel void reverse_twice_without_barrier(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                                          uint lane [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[lane] = in[lane];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float reversed = tile[63 - lane];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  tile[lane] = reversed;
  out[lane] = tile[63 - lane];
}

// Lanes past the data leave before the barrier that the others wait at.
kernel void return_before_barrier(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                                  constant long& n [[buffer(2)]], uint i [[thread_position_in_grid]],
                                  uint lane [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  if (i >= uint(n)) {
    return;
  }
  tile[lane] = in[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = tile[lane ^ 1];
}

kernel void too_much_threadgroup_memory(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  threadgroup float tile[8200];
  tile[i] = 1.0f;
  out[i] = tile[i];
}

// Writes the even elements only.
kernel void write_even(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  if (i % 2 == 0) {
    out[i] = float(i);
  }
}

// Doubles the even elements in place.
kernel void double_even(device float* data [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  if (i % 2 == 0) {
    data[i] = 2.0f * data[i];
  }
}

// The last lane reads one element past what the threadgroup wrote.
kernel void read_unwritten(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
  threadgroup float tile[65];
  tile[i] = in[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = tile[i + 1];
}

kernel void same_output_twice(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                              uint i [[thread_position_in_grid]]) {
  out[i / 2] = in[i];
}

kernel void simd_functions(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                           device int* lanes [[buffer(2)]], uint i [[thread_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]], uint simdgroup [[simdgroup_index_in_threadgroup]]) {
  const float v = in[i];
  out[6 * i + 0] = simd_sum(v);
  out[6 * i + 1] = simd_prefix_inclusive_sum(v);
  out[6 * i + 2] = simd_prefix_exclusive_sum(v);
  out[6 * i + 3] = simd_shuffle_down(v, 3);
  out[6 * i + 4] = simd_shuffle_xor(v, 5);
  out[6 * i + 5] = simd_max(v);
  lanes[2 * i] = simd_shuffle(int(lane), ushort(31 - lane));
  lanes[2 * i + 1] = int(simdgroup);
}

kernel void positions(device long* out [[buffer(0)]], uint2 grid [[thread_position_in_grid]],
                      uint2 in_group [[thread_position_in_threadgroup]], uint2 group [[threadgroup_position_in_grid]],
                      uint2 group_size [[threads_per_threadgroup]], uint2 groups [[threadgroups_per_grid]]) {
  device long* o = out + 10 * (grid.y * 7 + grid.x);
  o[0] = grid.x; o[1] = grid.y; o[2] = in_group.x; o[3] = in_group.y; o[4] = group.x; o[5] = group.y;
  o[6] = group_size.x; o[7] = group_size.y; o[8] = groups.x; o[9] = groups.y;
}

kernel void copy(device const float* in [[buffer(0)]], device float* out [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  out[i] = in[i];
}

// Reads a square matrix down its columns: neighbouring lanes read a row apart.
kernel void transpose(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                      constant long& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  out[i] = in[(i % n) * n + i / n];
}

struct Shape {
  long rows;
  long columns;
};

kernel void fill_shape(device float* out [[buffer(0)]], constant Shape& shape [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  out[i] = float(shape.rows * 100 + shape.columns);
}

kernel void write_one_past(device float* out [[buffer(0)]], constant long& n [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
  out[i + 1] = float(n);
}

kernel void narrow_scalar(device float* out [[buffer(0)]], constant int& n [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
  out[i] = float(n);
}
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "planted.metal"
    path.write_text(SOURCE)
    return compile_library(path, path.parent)


def test_barriers_order_threadgroup_memory(library, generator):
    x = torch.randn(256, generator=generator)
    out = torch.empty(256)
    library.reverse_blocks(x, out, threads=256, group_size=64)
    assert torch.equal(out, x.view(4, 64).flip(1).reshape(-1))


def test_a_missing_barrier_is_a_race(library):
    with pytest.raises(EmulatorError, match=r"data race on threadgroup memory: lanes \d+ and \d+ .* of `tile`"):
        library.reverse_twice_without_barrier(torch.randn(64), torch.empty(64), threads=64, group_size=64)


def test_a_barrier_some_lanes_skip_is_refused(library):
    with pytest.raises(EmulatorError, match="divergent barrier: a GPU would hang"):
        library.return_before_barrier(torch.randn(60), torch.empty(60), 60, threads=64, group_size=64)
    out = torch.empty(64)
    library.return_before_barrier(torch.randn(64), out, 64, threads=64, group_size=64)  # no lane leaves early
    assert not out.isnan().any()


def test_threadgroup_memory_over_32_kib_is_refused(library):
    with pytest.raises(EmulatorError, match="32800 bytes of threadgroup memory, over Metal's limit of 32 KiB"):
        library.too_much_threadgroup_memory(torch.empty(4), threads=4)


def test_reading_threadgroup_memory_nobody_wrote_is_refused(library):
    with pytest.raises(EmulatorError, match="reads byte 256 of threadgroup memory `tile`, which no lane has written"):
        library.read_unwritten(torch.randn(64), torch.empty(64), threads=64)


def test_unwritten_outputs_show_and_in_place_updates_keep_the_rest(library, generator):
    """An element an output kernel leaves is NaN; a buffer the kernel reads and writes keeps what
    it does not write, as a GPU buffer does."""
    out = torch.randn(64, generator=generator)
    library.write_even(out, threads=64)
    assert torch.equal(out[::2], torch.arange(0, 64, 2, dtype=torch.float32)) and out[1::2].isnan().all()
    data = torch.randn(64, generator=generator)
    expected = data.clone()
    expected[::2] *= 2
    library.double_even(data, threads=64)
    assert torch.equal(data, expected)


def test_two_lanes_writing_one_element_are_refused(library):
    with pytest.raises(EmulatorError, match=r"both write byte \d+ of buffer 'out' in one dispatch"):
        library.same_output_twice(torch.randn(8), torch.empty(4), threads=8)


def test_more_than_1024_lanes_in_a_threadgroup_are_refused(library):
    with pytest.raises(ValueError, match="more than 1024 threads"):
        library.copy(torch.randn(2048), torch.empty(2048), threads=2048, group_size=2048)


def test_simd_group_functions(library, generator):
    n = 96
    x = torch.randint(-8, 8, (n,), generator=generator).float()
    out, lanes = torch.empty(n * 6), torch.empty(n * 2, dtype=torch.int32)
    library.simd_functions(x, out, lanes, threads=n, group_size=64)
    out, lanes = out.view(n, 6), lanes.view(n, 2)
    for start in range(0, n, 32):
        v, block = x[start : start + 32], out[start : start + 32]
        assert torch.equal(block[:, 0], v.sum().expand(32))
        assert torch.equal(block[:, 1], v.cumsum(0))
        assert torch.equal(block[:, 2], v.cumsum(0) - v)
        assert torch.equal(block[:, 3], torch.cat([v[3:], v[-3:]]))  # the last 3 lanes keep their own value
        assert torch.equal(block[:, 4], v[torch.arange(32) ^ 5])
        assert torch.equal(block[:, 5], v.max().expand(32))
        assert torch.equal(lanes[start : start + 32, 0], 31 - torch.arange(32, dtype=torch.int32))
    assert lanes[:, 1].tolist() == [0] * 32 + [1] * 32 + [0] * 32


def test_a_shuffle_from_an_inactive_lane_is_refused(library):
    """16 threads fill half a SIMD-group: shuffling down by 3 reads lanes 16-18, which do not run."""
    with pytest.raises(EmulatorError, match=r"reads SIMD lane 1[6-8] in a SIMD-group function, which is not active"):
        library.simd_functions(torch.randn(16), torch.empty(96), torch.empty(32, dtype=torch.int32), threads=16)


def test_two_dimensional_grids(library):
    out = torch.empty(5 * 7 * 10, dtype=torch.int64)
    library.positions(out, threads=(7, 5), group_size=(4, 2))  # edge groups are cut to the grid
    out = out.view(5, 7, 10)
    y, x = 3, 6
    assert out[y, x].tolist() == [6, 3, 2, 1, 1, 1, 3, 2, 2, 3]


def test_traffic_model_tells_coalesced_from_strided(library, generator):
    n = 64
    x = torch.randn(n * n, generator=generator)
    out = torch.empty(n * n)
    with library.recording() as log:
        library.copy(x, out, threads=n * n, group_size=256)
        library.transpose(x, out, n, threads=n * n, group_size=256)
    copy, transpose = log
    assert torch.equal(out.view(n, n), x.view(n, n).t())
    assert (copy.bytes_read, copy.bytes_written) == (4 * n * n, 4 * n * n)
    assert copy.coalescing == 1.0  # 32 lanes x 4 bytes: two whole segments per instruction
    assert transpose.bytes_read == 4 * n * n
    # Reads touch one segment per lane (4 of 64 bytes used); the writes stay coalesced.
    assert transpose.coalescing == pytest.approx((4 * n * n + 4 * n * n) / (64 * n * n + 4 * n * n))
    assert transpose.coalescing < 0.15


def test_structs_bind_from_lists_of_ints(library):
    out = torch.empty(3)
    library.fill_shape(out, [7, 5], threads=3)
    assert out.tolist() == [705.0] * 3
    with pytest.raises(BindingError, match=r"a list of 3 ints is sent as 24 bytes, but `constant Shape& shape` takes 16"):
        library.fill_shape(out, [7, 5, 1], threads=3)


def test_out_of_bounds_writes_are_caught(library):
    with pytest.raises(RuntimeError, match="out-of-bounds write to buffer 'out'"):
        library.write_one_past(torch.zeros(8), 3, threads=8)


def test_scalar_and_tensor_bindings_are_checked(library):
    with pytest.raises(BindingError, match=r"sent as 8 bytes \(int64\), but the kernel declares `constant int& n`"):
        library.narrow_scalar(torch.zeros(4), 3, threads=4)
    with pytest.raises(BindingError, match="sent as 4 bytes"):
        library.write_one_past(torch.zeros(4), 3.0, threads=3)
    with pytest.raises(BindingError, match="dtype torch.float64 bound to `device float\\* out`"):
        library.write_one_past(torch.zeros(4, dtype=torch.float64), 3, threads=3)
    with pytest.raises(BindingError, match="takes 2 arguments, got 1"):
        library.write_one_past(torch.zeros(4), threads=3)
    with pytest.raises(AttributeError, match="no kernel named"):
        library.not_a_kernel


def test_double_does_not_compile(tmp_path):
    path = tmp_path / "uses_double.metal"
    path.write_text(SOURCE.replace("float(n)", "float(double(n))"))
    with pytest.raises(RuntimeError, match="poisoned"):
        compile_library(path, tmp_path)
