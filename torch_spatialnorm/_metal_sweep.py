"""How the tiled Metal kernels sweep the image planes: strips, segments, rows per step, and the
layout of threadgroup memory, as the ``Sweep`` struct of metal/spatial_norm.metal holds them.

A threadgroup owns a strip of columns of one plane (all of them where they fit) and a segment of
its rows, and keeps ring buffers of rows in threadgroup memory. The plan chooses the strip width
and rows per step that read the fewest bytes of device memory per element and fit in the
kernels' threadgroup array; where nothing fits (very large windows), there is no plan and the host
takes the general path.
"""

import math
from dataclasses import dataclass

THREADS = 256  # kThreads: lanes of a threadgroup
THREADGROUP_FLOATS = 7168  # kThreadgroupFloats: the kernels' threadgroup array
STEP_ROWS = (8, 4, 2, 1)
STRIP_WIDTHS = (512, 256, 128, 64, 32, 16, 8)
# Threadgroups wanted at least: fewer planes are split into segments of rows.
MIN_THREADGROUPS = 64


@dataclass(frozen=True)
class SweepPlan:
    fields: tuple  # the Sweep struct, in order
    threads: tuple  # the dispatch's grid (lanes, planes)
    group_size: tuple


def _arrays(gradient, step_rows, strip_width, extents_y, window_x):
    """(rows, columns) of each ring, in the order of the Sweep struct's layouts. A phase that
    lags the loads by `lag` rows works `ceil(lag / step_rows)` blocks behind them, and a ring holds
    every row from the oldest one a phase reads to the newest block."""
    before_y, after_y = extents_y
    lag_t, lag_d = -(-after_y // step_rows), -(-before_y // step_rows)
    if not gradient:
        return [((lag_t + 1) * step_rows, strip_width + window_x - 1), ((lag_t + 1) * step_rows + before_y, strip_width)]
    term_columns = strip_width + window_x - 1
    return [
        ((lag_t + lag_d + 1) * step_rows, term_columns + window_x - 1),  # x
        ((lag_t + 1) * step_rows + before_y, term_columns),  # x_sums
        (step_rows, term_columns),  # terms
        ((lag_d + 1) * step_rows, strip_width),  # scaled
        ((lag_d + 1) * step_rows + after_y, strip_width),  # term_sums
    ]


def _layout(arrays):
    """(offset, pitch, rows) of each array, one after another; odd pitches, so that lanes walking
    down neighbouring rows touch different banks."""
    layout, offset = [], 0
    for rows, columns in arrays:
        pitch = columns | 1
        layout.append((offset, pitch, rows))
        offset += rows * pitch
    return layout, offset


def _bytes_per_element(gradient, strip_width, width, window_x):
    """Reads per element, relative to one read of each input, from the strips' side halos."""
    if strip_width >= width:
        return 2.0 if gradient else 1.0
    if not gradient:
        return (strip_width + window_x - 1) / strip_width
    return (strip_width + 2 * (window_x - 1)) / strip_width + (strip_width + window_x - 1) / strip_width


def plan_sweep(gradient: bool, planes: int, height: int, width: int, extents_y, extents_x):
    """The plan of the forward (gradient=False) or gradient kernel, or None if no ring layout fits.
    ``extents_y`` and ``extents_x`` are the forward window's (before, after), clipped to the image."""
    window_y, window_x = sum(extents_y) + 1, sum(extents_x) + 1
    best = None
    for strip_width in {min(width, s) for s in (width, *STRIP_WIDTHS)}:
        for step_rows in STEP_ROWS:
            layout, floats = _layout(_arrays(gradient, step_rows, strip_width, extents_y, window_x))
            if floats > THREADGROUP_FLOATS:
                continue
            # Fewer rows per step cost more barriers per row: a small penalty breaks ties.
            score = _bytes_per_element(gradient, strip_width, width, window_x) + 0.02 * (STEP_ROWS[0] / step_rows)
            if best is None or score < best[0]:
                best = (score, strip_width, step_rows, layout)
    if best is None:
        return None
    _, strip_width, step_rows, layout = best
    strips = math.ceil(width / strip_width)
    wanted = math.ceil(MIN_THREADGROUPS / max(1, planes * strips))
    segments = max(1, min(wanted, height // max(16, 4 * (window_y - 1))))
    # Segments start at multiples of step_rows, as the blocks of the sweep do.
    segment_rows = math.ceil(height / segments / step_rows) * step_rows
    segments = math.ceil(height / segment_rows)
    layouts = layout + [(0, 1, 1)] * (5 - len(layout))  # the forward leaves the gradient's unused
    fields = (height, width, strip_width, strips, segment_rows, segments, step_rows, *extents_y, *extents_x)
    fields += tuple(v for entry in layouts for v in entry)
    return SweepPlan(fields, (THREADS * strips * segments, planes), (THREADS, 1))
