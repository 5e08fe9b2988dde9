"""Launch grids of the Triton kernels as small pure functions (no Triton, no torch), tested past every limit.

A CUDA grid holds at most ``MAX_GRID`` = (2^31 - 1, 65535, 65535) programs per
axis. Every kernel here launches a 1-D grid: the big product (rows x tiles, or
channel blocks x splits) goes on axis 0, and where even that could pass the
limit the channel_gate forward loops inside the program (grid-stride: program
``pid`` handles tiles ``pid, pid + P, pid + 2P, ...``). The tile arithmetic of
the kernels is written out here (:func:`forward_tile`, :func:`backward_tile`)
so the tests can check, by arithmetic, that the tiles cover every element
exactly once. Every wrapper calls :func:`check_grid` before a launch: a grid
past a limit is a clear ValueError naming the axis, never a launch failure.

``MAX_PROGRAMS`` and ``BWD_PROGRAMS`` are read at call time, so a test can
lower them to run the grid-stride and split paths of the kernels on small
shapes under the interpreter.
"""
from __future__ import annotations

from dataclasses import dataclass

#: The hardware limit of a CUDA launch grid, per axis (x, y, z).
MAX_GRID = (2**31 - 1, 65535, 65535)
#: The most programs a channel_gate forward launches; more tiles than this are looped inside the programs.
MAX_PROGRAMS = MAX_GRID[0]
#: About how many programs the channel_gate backward aims for (a few per SM of an H100/H200, 132 SMs).
BWD_PROGRAMS = 1024
#: Elements per program of a channel_gate tile.
TILE = 2048


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def check_grid(grid) -> tuple:
    """``grid`` itself when every axis holds 1 .. MAX_GRID[axis] programs, else a ValueError naming the axis."""
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"a launch grid has 1 to 3 axes, got {grid}")
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if not 1 <= size <= limit:
            raise ValueError(f"launch grid axis {axis} has {size} programs, outside the hardware limit "
                             f"1..{limit} of that axis (grid {grid})")
    return grid


def elementwise_grid(n: int, block: int) -> tuple:
    """Grid of an elementwise kernel over ``n`` > 0 elements, ``block`` per program (int64 offsets in the kernel)."""
    return check_grid((cdiv(n, block),))


@dataclass(frozen=True)
class ChannelGatePlan:
    """How a channel_gate launch tiles x, addressed as (N, C, HW): tiles of block_c channels x block_hw positions.

    A tile index ``t`` in ``0 .. tiles - 1`` is ``(n * hw_tiles + hb) * c_blocks + cb`` (channel blocks fastest).
    Forward: ``grid[0]`` programs, program ``pid`` handles tiles ``pid, pid + grid[0], ...``. Backward: program
    ``pid`` is channel block ``pid % c_blocks`` of split ``pid // c_blocks``; split ``s`` walks the row tiles
    ``r = n * hw_tiles + hb`` in ``[s * tiles_per_split, min((s + 1) * tiles_per_split, rows))`` and writes
    one row of partial sums (``splits`` x C), summed afterwards over the fixed split axis.
    """
    N: int
    C: int
    HW: int
    block_c: int
    block_hw: int
    c_blocks: int
    hw_tiles: int
    rows: int            # N * hw_tiles: row tiles per channel block
    tiles: int           # rows * c_blocks
    even: bool           # C % block_c == 0 and HW % block_hw == 0: no masks at all
    grid: tuple
    splits: int = 1
    tiles_per_split: int = 0


def channel_gate_tiles(C: int, HW: int, channels_fast: bool) -> tuple[int, int]:
    """(block_c, block_hw): channels_last (channels contiguous) takes up to 64 channels a tile, NCHW up to 16,
    the contiguous dimension whole when it is short; TILE elements a tile at most."""
    block_c = min(next_power_of_2(C), 64 if channels_fast else 16)
    block_hw = min(next_power_of_2(max(HW, 1)), max(16, TILE // block_c))
    return block_c, block_hw


def _plan(N, C, HW, channels_fast):
    if N < 1 or C < 1 or HW < 1:
        raise ValueError(f"channel_gate tiles need N, C, HW >= 1, got {(N, C, HW)}")
    block_c, block_hw = channel_gate_tiles(C, HW, channels_fast)
    c_blocks, hw_tiles = cdiv(C, block_c), cdiv(HW, block_hw)
    even = C % block_c == 0 and HW % block_hw == 0
    return block_c, block_hw, c_blocks, hw_tiles, even


def channel_gate_forward_plan(N: int, C: int, HW: int, channels_fast: bool, max_programs: int | None = None):
    """The forward launch: one program a tile, or ``max_programs`` (default MAX_PROGRAMS) looping over them."""
    block_c, block_hw, c_blocks, hw_tiles, even = _plan(N, C, HW, channels_fast)
    tiles = N * hw_tiles * c_blocks
    programs = min(tiles, MAX_PROGRAMS if max_programs is None else max_programs)
    return ChannelGatePlan(N, C, HW, block_c, block_hw, c_blocks, hw_tiles, N * hw_tiles, tiles, even,
                           check_grid((programs,)))


def channel_gate_backward_plan(N: int, C: int, HW: int, channels_fast: bool, target_programs: int | None = None):
    """The backward launch: about ``target_programs`` (default BWD_PROGRAMS) programs, at least one per channel
    block; the row tiles are split evenly (no empty split) across ``splits`` programs per channel block."""
    block_c, block_hw, c_blocks, hw_tiles, even = _plan(N, C, HW, channels_fast)
    rows = N * hw_tiles
    target = BWD_PROGRAMS if target_programs is None else target_programs
    splits = max(1, min(rows, target // c_blocks))
    tiles_per_split = cdiv(rows, splits)
    splits = cdiv(rows, tiles_per_split)
    return ChannelGatePlan(N, C, HW, block_c, block_hw, c_blocks, hw_tiles, rows, rows * c_blocks, even,
                           check_grid((splits * c_blocks,)), splits, tiles_per_split)


def forward_tile(plan: ChannelGatePlan, t: int) -> tuple[int, int, int]:
    """(n, channel block, hw tile) of tile ``t``: the kernel's arithmetic."""
    cb, r = t % plan.c_blocks, t // plan.c_blocks
    return r // plan.hw_tiles, cb, r % plan.hw_tiles


def forward_program_tiles(plan: ChannelGatePlan, pid: int) -> range:
    """The tiles program ``pid`` of the forward handles (grid-stride)."""
    return range(pid, plan.tiles, plan.grid[0])


def backward_tile(plan: ChannelGatePlan, pid: int) -> tuple[int, range]:
    """(channel block, row tiles) of backward program ``pid``: the kernel's arithmetic."""
    cb, split = pid % plan.c_blocks, pid // plan.c_blocks
    lo = split * plan.tiles_per_split
    return cb, range(lo, min(lo + plan.tiles_per_split, plan.rows))
