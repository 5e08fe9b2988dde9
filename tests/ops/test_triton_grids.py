"""Launch grids of the Triton kernels (kernels/_grids.py), pure functions: within every hardware limit for shapes
past every limit, and the tiles cover every element exactly once (checked by arithmetic; by enumeration where
small). The kernels run the same tile arithmetic (test_channel_gate.py runs them, grid-stride and split paths
included, against the reference)."""
import itertools

import numpy as np
import pytest

from polarprune_cuda.kernels import _grids as G

CL, NCHW = True, False
# (name, N, C, HW, channels_fast): each past a limit of the old (N, C blocks, HW tiles) grid or of int32
BIG = [
    ("1x64x1024x2048 channels_last", 1, 64, 1024 * 2048, CL),
    ("NCHW C=16 HW=9M", 1, 16, 9_000_000, NCHW),
    ("2-D (70000, 3) as rows", 1, 3, 70000, CL),
    ("2-D (70000, 64) as rows", 1, 64, 70000, CL),
    ("9x64x2048x2048 channels_last, > 2^31 elements", 9, 64, 2048 * 2048, CL),
    ("NCHW > 2^31 elements", 2, 16, 2**27, NCHW),
    ("many channels", 4, 3_000_000, 49, NCHW),
    ("2^40 elements", 256, 4096, 2**20, CL),
]


def _old_forward_grid(N, C, HW, channels_fast):
    """The grid before issue 22: (N, C blocks, HW tiles)."""
    block_c, block_hw = G.channel_gate_tiles(C, HW, channels_fast)
    return (N, G.cdiv(C, block_c), G.cdiv(HW, block_hw))


def test_check_grid_names_the_axis():
    assert G.check_grid((2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    for grid, axis in [((2**31,), 0), ((1, 65536), 1), ((1, 1, 65536), 2), ((0,), 0), ((5, 0), 1)]:
        with pytest.raises(ValueError, match=f"axis {axis} "):
            G.check_grid(grid)
    with pytest.raises(ValueError, match="1 to 3 axes"):
        G.check_grid((1, 1, 1, 1))


def test_the_old_grid_crashes_where_the_review_said():
    """The old channel_gate forward grid passes the axis-2 limit for 1x64x1024x2048 channels_last and NCHW HW=9M."""
    with pytest.raises(ValueError, match="axis 2"):
        G.check_grid(_old_forward_grid(1, 64, 1024 * 2048, CL))
    with pytest.raises(ValueError, match="axis 2"):
        G.check_grid(_old_forward_grid(1, 16, 9_000_000, NCHW))
    G.check_grid(_old_forward_grid(1, 64, 2_097_120, CL))  # the last HW that fitted


@pytest.mark.parametrize("n", [1, 1023, 1024, 1025, 2**31 - 1, 2**31 + 7, 2**40 + 3])
def test_elementwise_grid(n):
    (blocks,) = G.elementwise_grid(n, 1024)
    assert 1 <= blocks <= G.MAX_GRID[0]
    assert (blocks - 1) * 1024 < n <= blocks * 1024  # every element once, no empty program


def test_elementwise_grid_past_every_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="axis 0"):
        G.elementwise_grid(2**31 * 1024 + 1, 1024)


def _check_forward(plan):
    N, C, HW = plan.N, plan.C, plan.HW
    (programs,) = plan.grid
    assert 1 <= programs <= G.MAX_GRID[0]
    assert plan.block_c * plan.block_hw <= G.TILE
    assert (plan.c_blocks - 1) * plan.block_c < C <= plan.c_blocks * plan.block_c
    assert (plan.hw_tiles - 1) * plan.block_hw < HW <= plan.hw_tiles * plan.block_hw
    assert plan.tiles == N * plan.hw_tiles * plan.c_blocks
    assert plan.even == (C % plan.block_c == 0 and HW % plan.block_hw == 0)
    # grid-stride: program pid takes tiles pid, pid + P, ...: a partition of 0 .. tiles - 1
    q, r = divmod(plan.tiles, programs)
    assert r * (q + 1) + (programs - r) * q == plan.tiles
    for pid in {0, programs - 1}:
        tiles = G.forward_program_tiles(plan, pid)
        assert len(tiles) in (q, q + 1) and tiles[0] == pid
    # the tile index decomposes into (n, channel block, hw tile) and back (first, last and some in between)
    for t in {t for t in (0, 1, plan.c_blocks, plan.tiles // 3, plan.tiles - 2, plan.tiles - 1) if 0 <= t < plan.tiles}:
        n, cb, hb = G.forward_tile(plan, t)
        assert 0 <= n < N and 0 <= cb < plan.c_blocks and 0 <= hb < plan.hw_tiles
        assert (n * plan.hw_tiles + hb) * plan.c_blocks + cb == t
    assert G.forward_tile(plan, plan.tiles - 1) == (N - 1, plan.c_blocks - 1, plan.hw_tiles - 1)


def _check_backward(plan):
    (programs,) = plan.grid
    assert 1 <= programs <= G.MAX_GRID[0]
    assert programs == plan.splits * plan.c_blocks
    assert plan.rows == plan.N * plan.hw_tiles
    # the splits' row ranges are contiguous, in order, none empty, and end at the last row tile
    assert plan.tiles_per_split >= 1
    assert (plan.splits - 1) * plan.tiles_per_split < plan.rows <= plan.splits * plan.tiles_per_split
    first, last = G.backward_tile(plan, 0), G.backward_tile(plan, programs - 1)
    assert first == (0, range(0, min(plan.tiles_per_split, plan.rows)))
    assert last[0] == plan.c_blocks - 1 and last[1].stop == plan.rows and len(last[1]) >= 1
    if plan.splits > 1:
        before = G.backward_tile(plan, programs - 1 - plan.c_blocks)[1]
        assert before.stop == last[1].start


@pytest.mark.parametrize("name,N,C,HW,channels_fast", BIG, ids=[b[0] for b in BIG])
def test_big_shapes_within_limits_and_covered(name, N, C, HW, channels_fast):
    fwd = G.channel_gate_forward_plan(N, C, HW, channels_fast)
    _check_forward(fwd)
    bwd = G.channel_gate_backward_plan(N, C, HW, channels_fast)
    _check_backward(bwd)
    assert bwd.splits * bwd.c_blocks <= max(G.BWD_PROGRAMS, bwd.c_blocks)
    if N * C * HW >= 2**31:  # offsets past int32: the kernels compute them in int64 (tile index t is int64)
        assert fwd.tiles * G.TILE >= N * C * HW


def test_forward_past_the_axis0_limit_loops_inside_the_programs():
    """More tiles than 2^31 - 1 (2^43 elements): the grid stays at the limit and every program loops."""
    plan = G.channel_gate_forward_plan(2**20, 64, 2**23, CL)
    assert plan.tiles > G.MAX_GRID[0] and plan.grid == (G.MAX_GRID[0],)
    _check_forward(plan)


def _enumerate(plan, backward):
    """How many times each element of (N, C, HW) is visited, walking the tiles as the kernels do."""
    seen = np.zeros((plan.N, plan.C, plan.HW), dtype=np.int64)

    def visit(n, cb, hb):
        c0, h0 = cb * plan.block_c, hb * plan.block_hw
        seen[n, c0:min(c0 + plan.block_c, plan.C), h0:min(h0 + plan.block_hw, plan.HW)] += 1

    for pid in range(plan.grid[0]):
        if backward:
            cb, rows = G.backward_tile(plan, pid)
            for r in rows:
                visit(r // plan.hw_tiles, cb, r % plan.hw_tiles)
        else:
            for t in G.forward_program_tiles(plan, pid):
                visit(*G.forward_tile(plan, t))
    return seen


@pytest.mark.parametrize("programs", [None, 1, 2, 5, 64])
@pytest.mark.parametrize("N,C,HW", [(1, 1, 1), (2, 3, 49), (3, 67, 200), (1, 3, 7000), (5, 130, 33), (1, 64, 4096)])
def test_small_shapes_every_element_exactly_once(N, C, HW, programs):
    for channels_fast in (CL, NCHW):
        fwd = G.channel_gate_forward_plan(N, C, HW, channels_fast, max_programs=programs)
        bwd = G.channel_gate_backward_plan(N, C, HW, channels_fast, target_programs=programs)
        _check_forward(fwd)
        _check_backward(bwd)
        assert (_enumerate(fwd, backward=False) == 1).all()
        assert (_enumerate(bwd, backward=True) == 1).all()


def test_module_limits_are_read_at_call_time(monkeypatch):
    monkeypatch.setattr(G, "MAX_PROGRAMS", 3)
    monkeypatch.setattr(G, "BWD_PROGRAMS", 2)
    assert G.channel_gate_forward_plan(4, 16, 4096, NCHW).grid == (3,)
    assert G.channel_gate_backward_plan(4, 16, 4096, NCHW).grid == (2,)


def test_tiles_vectorise_where_the_layout_allows():
    """The contiguous dimension is a power of two wide (whole when short), so a tile row is one aligned run."""
    for (C, HW, fast), (bc, bhw) in {(64, 3136, CL): (64, 32), (256, 49, CL): (64, 32), (16, 3136, NCHW): (16, 128),
                                     (3, 70000, CL): (4, 512), (1, 1, NCHW): (1, 1)}.items():
        assert G.channel_gate_tiles(C, HW, fast) == (bc, bhw)
    for a, b in itertools.product([1, 2, 3, 64, 100], repeat=2):
        bc, bhw = G.channel_gate_tiles(a, b, CL)
        assert bc & (bc - 1) == 0 and bhw & (bhw - 1) == 0
