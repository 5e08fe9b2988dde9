"""Launch grids of the CUDA kernels (csrc/launch_grids.h through polarprune_cuda._C.launch_grid): within every
hardware limit and covering every element exactly once, for shapes past each limit. Pure arithmetic: runs
wherever the extension builds, GPU or not."""
import itertools
import shutil

import pytest
import torch

CAN_BUILD = bool(torch.version.cuda) and shutil.which("nvcc") is not None
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="needs a CUDA build of torch and nvcc to build the extension")

MAX_X, MAX_YZ, MAX_THREADS = 2**31 - 1, 65535, 1024


@pytest.fixture(scope="module")
def grid_of():
    import polarprune_cuda._C as ext

    return ext.launch_grid


# (n, c, hw, channels_fast, vec): the shapes the review named, and arithmetic ones past every limit
SHAPES = {
    "cl-1x64x1024x2048-bf16": (1, 64, 1024 * 2048, True, 8),
    "nchw-c16-hw9M": (1, 16, 9_000_000, False, 4),
    "nchw-c16-hw9M-unaligned": (1, 16, 9_000_001, False, 1),
    "2d-70000x3": (70000, 3, 1, True, 1),
    "2d-70000x1": (70000, 1, 1, False, 1),
    "2d-70000x256-fp16": (70000, 256, 1, True, 8),
    "nchw-hw49": (64, 256, 49, False, 1),
    "cl-hw49": (64, 256, 49, True, 4),
    "resnet-stem-cl": (256, 64, 112 * 112, True, 8),
    "huge-inner": (1, 1, 2**33, False, 8),
    "rows-past-2^31-blocks": (2**36, 64, 1, False, 1),
    "cl-rows-past-2^31-blocks": (2**20, 2, 2**24, True, 1),
}


def check(g, n, c, hw, fast, vec, backward):
    gx, gy, gz = g["grid"]
    assert 1 <= gx <= MAX_X and 1 <= gy <= MAX_YZ and gz == 1
    assert g["threads"] <= MAX_THREADS
    tpr, rpb = g["threads_per_row"], g["rows_per_block"]
    assert tpr * rpb == g["threads"] and tpr & (tpr - 1) == 0
    rows, inner = (n * hw, c) if fast else (n * c, hw)
    assert (g["rows"], g["inner"], g["row_div"], g["gate_inner"]) == (rows, inner, hw if fast else c, fast)
    # rows: (row block, thread group) -> r is one to one onto [0, row_blocks * rpb), which covers [0, rows)
    assert g["row_blocks"] * rpb >= rows > (g["row_blocks"] - 1) * rpb
    # inner: (tile, lane, v) -> i is one to one onto [0, tiles * tpr * vec), which covers [0, inner)
    assert g["tiles"] * tpr * vec >= inner > (g["tiles"] - 1) * tpr * vec
    assert inner % vec == 0 or vec == 1
    # grid-stride loops (rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) visit each block once
    assert gx <= g["row_blocks"] and gy <= g["tiles"]
    if backward:
        if fast:   # one grid row per tile of channels: each thread keeps the sums of its channels
            assert gy == g["tiles"] and g["partial_rows"] == gx
        else:
            assert g["partial_rows"] == gy
        assert g["partial_rows"] <= 1024   # the partial sums stay small whatever the shape


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_channel_gate_grid_within_limits_and_covering(grid_of, name, backward):
    n, c, hw, fast, vec = SHAPES[name]
    g = grid_of("channel_gate_backward" if backward else "channel_gate", n, c, hw, fast, vec)
    check(g, n, c, hw, fast, vec, backward)


def test_the_old_grids_would_have_failed(grid_of):
    """The shapes above are past the limits that the previous grids ((N, C-blocks, HW-tiles) in Triton,
    (C, N) and (HW-tiles, N) in CUDA) ran into: the new grids put those sizes on the x axis or loop."""
    assert 1024 * 2048 // (2048 // 64) > MAX_YZ             # the old Triton grid: HW tiles of 2048 // C on z
    g = grid_of("channel_gate", 1, 64, 1024 * 2048, True, 8)
    assert g["row_blocks"] > MAX_YZ and g["grid"][0] == g["row_blocks"]   # now on x
    g = grid_of("channel_gate_backward", 70000, 3, 1, True, 1)
    assert g["grid"][1] == 1 and g["grid"][0] <= 1024       # the old CUDA grids had N = 70000 on y
    g = grid_of("channel_gate", 1, 1, 2**33, False, 8)
    assert g["tiles"] > MAX_YZ and g["grid"][1] == MAX_YZ   # clamped, grid-stride over the rest


def emulate(g, n, c, hw, fast, vec, backward):
    """Run the kernels' index arithmetic (csrc/channel_gate.cu) over the whole grid: element -> visits."""
    visits = torch.zeros(n, c, hw, dtype=torch.int64)
    gx, gy, _ = g["grid"]
    tpr, rpb, D = g["threads_per_row"], g["rows_per_block"], g["row_div"]
    for bx, by, t in itertools.product(range(gx), range(gy), range(g["threads"])):
        lane, sub = t % tpr, t // tpr
        tiles = [by] if backward and fast else range(by, g["tiles"], gy)
        for rb in range(bx, g["row_blocks"], gx):
            r = rb * rpb + sub
            if r >= g["rows"]:
                continue
            a, b = divmod(r, D)
            for tile in tiles:
                i0 = (tile * tpr + lane) * vec
                for i in range(i0, min(i0 + vec, g["inner"])):
                    if fast:
                        visits[a, i, b] += 1
                    else:
                        visits[a, b, i] += 1
    return visits


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("n,c,hw,fast,vec", [(2, 3, 49, False, 1), (3, 5, 7, True, 1), (2, 16, 24, True, 8),
                                              (2, 4, 64, False, 4), (5, 1, 1, False, 1), (7, 6, 1, True, 2)])
def test_every_element_visited_once(grid_of, n, c, hw, fast, vec, backward):
    g = grid_of("channel_gate_backward" if backward else "channel_gate", n, c, hw, fast, vec)
    assert torch.equal(emulate(g, n, c, hw, fast, vec, backward), torch.ones(n, c, hw, dtype=torch.int64))


def test_channels_last_backward_refuses_channels_past_the_grid(grid_of):
    with pytest.raises(ValueError, match="channels in a channels_last tensor exceed the launch grid"):
        grid_of("channel_gate_backward", 1, 65535 * 256 + 1, 4, True, 1)


def test_elementwise_and_penalty_grids(grid_of):
    for n in (1, 255, 257, 2**24 + 1, 2**31 + 5, 2**40):
        g = grid_of("elementwise", n)
        blocks = g["grid"][0]
        assert 1 <= blocks <= MAX_X and g["threads"] == 256
        assert blocks == min(-(-n // 256), 65535 * 8)   # grid-stride (int64 index) beyond that
    assert grid_of("penalty", 26560)["threads"] == MAX_THREADS
    with pytest.raises(ValueError, match="kernel must be one of"):
        grid_of("conv", 3)


@pytest.mark.parametrize("hw,vec,threads_per_row,busy", [(49, 1, 64, 49 / 64), (196, 1, 256, 196 / 256),
                                                         (3136, 4, 256, 1.0), (1, 1, 1, 1.0)])
def test_rows_get_threads_sized_to_the_plane(grid_of, hw, vec, threads_per_row, busy):
    """NCHW planes of HW = 49 (ResNet's last stage) get 64 threads each, 4 planes a block: 77% of the threads
    busy, where one block of 256 threads per plane kept 19% busy."""
    g = grid_of("channel_gate_backward", 64, 512, hw, False, vec)
    assert g["threads_per_row"] == threads_per_row
    lanes = min(hw // vec, threads_per_row)
    assert lanes / threads_per_row == pytest.approx(busy) and 49 / 256 < 0.2
