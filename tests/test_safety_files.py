"""Untrusted files, second audit (issue 33): archives that expand, files that disagree with themselves, values
that overflow. Each refusal is one ``polarprune: error:`` line; the memory cases run under an address-space
limit (``resource.setrlimit``) in a child process, where a refusal, not an allocation, is the expected outcome.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from polarprune_cuda import _io, cli

from helpers import one_error_line

TINY = ["--dataset", "digits", "--model", "resnet20", "--max-train", "96", "--max-test", "48",
        "--batch-size", "32", "--latency-batch", "4", "--quiet", "--min-channels", "2"]
REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30

# The CLI in a child whose address space may grow by 768 MiB past what it holds after importing torch: an
# archive that expands to 1 GiB cannot be loaded there, so a refusal must come before the expansion.
LIMITED = """
import resource, sys
from polarprune_cuda import cli
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), resource.RLIM_INFINITY))
sys.exit(cli.main(sys.argv[1:]))
"""


def run(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_limited(argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def bomb(src: Path, dst: Path, size: int = GIB) -> str:
    """``dst``: ``src``'s archive with its largest record replaced by ``size`` zero bytes, deflated (4.6 MB per
    GiB); returns the record's name."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        infos = zin.infolist()
        big = max(infos, key=lambda i: i.file_size)
        for info in infos:
            if info is big:
                with zout.open(info.filename, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 24)
                    for _ in range(size // len(chunk)):
                        f.write(chunk)
            else:
                zout.writestr(info, zin.read(info))
    return big.filename


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["prune", *TINY, "--epochs", "2", "--warmup-epochs", "0", "--ramp-epochs", "1",
                     "--out", str(out)]) == 0
    return out


def test_a_checkpoint_that_expands_is_refused_before_loading_under_a_memory_limit(run_copy):
    ckpt = run_copy / "checkpoint.pt"
    record = bomb(ckpt, ckpt.with_suffix(".bomb"))
    os.replace(ckpt.with_suffix(".bomb"), ckpt)
    assert ckpt.stat().st_size < 8 << 20
    proc = run_limited(["prune", *TINY, "--epochs", "3", "--warmup-epochs", "0", "--ramp-epochs", "1",
                        "--out", str(run_copy), "--resume"])
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and f"record {record!r} is compressed" in line and "checkpoint.pt" in line


def test_init_weights_that_expand_are_refused_before_loading_under_a_memory_limit(tmp_path):
    import polarprune_cuda as pp

    plain, init = tmp_path / "plain.pt", tmp_path / "init.pt"
    torch.save(pp.resnet20(num_classes=10, in_channels=1).state_dict(), plain)
    record = bomb(plain, init)
    proc = run_limited(["prune", *TINY, "--epochs", "1", "--init", str(init), "--out", str(tmp_path / "o")])
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and line.startswith("polarprune: error: init: ") and f"{record!r}" in line


def test_pruned_weights_that_expand_are_refused_even_with_their_digest(run_copy, capsys):
    weights = run_copy / "model" / "weights.pt"
    bomb(weights, weights.with_suffix(".bomb"), size=64 << 20)
    os.replace(weights.with_suffix(".bomb"), weights)
    _io.write_text(_io.digest_file(weights), f"{_io.sha256_bytes(weights.read_bytes())}  weights.pt\n")
    spec = json.loads((run_copy / "model" / "spec.json").read_text())
    rc, _, err = run(["export", str(run_copy), "--format", "pt2"], capsys)
    line = one_error_line(err)
    assert rc == 2 and "weights.pt" in line and "is compressed" in line, (line, spec.keys())


def test_declared_sizes_past_the_file_are_refused(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        name = max(zf.infolist(), key=lambda i: i.file_size).filename
    entry = data.find(b"PK\x01\x02")          # the central directory's entry for that record
    while data[entry + 46:entry + 46 + int.from_bytes(data[entry + 28:entry + 30], "little")] != name.encode():
        entry = data.find(b"PK\x01\x02", entry + 4)
    data[entry + 24:entry + 28] = GIB.to_bytes(4, "little")   # its uncompressed size, forged to 1 GiB
    path.write_bytes(bytes(data))
    with pytest.raises(_io.IntegrityError, match=f"record {name!r} declares {GIB} bytes"):
        _io.check_archive(path, path)


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pt_that_names_code_is_refused_in_one_line_without_torchs_advice(tmp_path, capsys):
    init = tmp_path / "init.pt"
    torch.save({"conv1.weight": _System(tmp_path / "ran")}, init)
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--init", str(init), "--out", str(tmp_path / "o")], capsys)
    line = one_error_line(err)
    assert rc == 2 and "something other than tensors" in line and "system" in line
    assert "weights_only" not in line and "Re-running" not in line and "pytorch.org" not in line
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_that_names_code_is_refused_in_one_line(run_copy, capsys):
    ckpt = run_copy / "checkpoint.pt"
    torch.save({"format": 1, "x": _System(run_copy.parent / "ran")}, ckpt)
    rc, _, err = run(["prune", *TINY, "--epochs", "3", "--warmup-epochs", "0", "--ramp-epochs", "1",
                      "--out", str(run_copy), "--resume"], capsys)
    line = one_error_line(err)
    assert rc == 2 and "checkpoint.pt" in line and "system" in line and "weights_only" not in line
    assert not (run_copy.parent / "ran").exists()


def test_a_report_naming_a_million_classes_is_refused_before_building_under_a_memory_limit(run_copy):
    report = json.loads((run_copy / "report.json").read_text())
    report["config"]["model"], report["data"]["num_classes"] = "resnet50", 1_000_000   # an 8 GB dense model
    (run_copy / "report.json").write_text(json.dumps(report))
    proc = run_limited(["export", str(run_copy), "--format", "pt2"])
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "num_classes is 1000000" in line and "'fc' has 10 outputs" in line


def test_a_spec_whose_classifier_disagrees_with_the_report_is_refused(run_copy, capsys):
    from polarprune_cuda.surgery.spec import spec_digest

    spec = json.loads((run_copy / "model" / "spec.json").read_text())
    spec["shapes"]["fc.weight"][0] = spec["shapes"]["fc.bias"][0] = 5
    spec["sha256"] = spec_digest(spec)
    (run_copy / "model" / "spec.json").write_text(json.dumps(spec))
    rc, _, err = run(["export", str(run_copy), "--format", "pt2"], capsys)
    line = one_error_line(err)
    assert rc == 2 and "num_classes is 10, the spec's classifier 'fc' has 5 outputs" in line
    assert not (run_copy / "model.pt2").exists()


def test_an_export_batch_past_the_input_cap_is_refused_before_loading(run_copy, capsys, monkeypatch):
    from polarprune_cuda.surgery import spec as spec_mod
    from polarprune_cuda.surgery.inputs import MAX_INPUT_ELEMENTS

    spec = json.loads((run_copy / "model" / "spec.json").read_text())
    spec["input_shapes"] = [[1, 1, 2048, 2048]]                     # exactly the cap: a valid spec
    assert 2048 * 2048 == MAX_INPUT_ELEMENTS
    spec["sha256"] = spec_mod.spec_digest(spec)
    (run_copy / "model" / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setattr(spec_mod, "load_pruned", lambda *a, **k: pytest.fail("loaded the model"))
    rc, _, err = run(["export", str(run_copy), "--format", "pt2", "--batch", "2"], capsys)
    line = one_error_line(err)
    assert rc == 2 and "batch: 2 samples of shape [1, 2048, 2048]" in line and "lower --batch" in line


@pytest.mark.parametrize("manifest,why", [
    (None, f"it has {2 * GIB} bytes, more than a manifest has"),
    ("{not json", "it is not valid JSON"),
    ('{"library": "polarprune_cuda", "format": 1, "files": ["../x"]}', "its field 'files' must be a list"),
])
def test_a_malformed_manifest_is_named_as_such_and_never_read_whole(run_copy, capsys, manifest, why):
    path = run_copy / "manifest.json"
    if manifest is None:
        os.truncate(path, 2 * GIB)          # a sparse 2 GiB file: reading it whole would take 2 GiB
    else:
        path.write_text(manifest)
    before = sorted(p.name for p in run_copy.iterdir())
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(run_copy), "--overwrite"], capsys)
    line = one_error_line(err)
    assert rc == 2 and "manifest.json is malformed" in line and why in line and "did not write" not in line
    assert sorted(p.name for p in run_copy.iterdir()) == before


def test_weights_that_diverge_are_named_as_not_finite(tmp_path, capsys):
    rc, _, err = run(["prune", *TINY, "--epochs", "2", "--warmup-epochs", "0", "--ramp-epochs", "1",
                      "--lr", "1e4", "--out", str(tmp_path / "o")], capsys)
    line = one_error_line(err)
    assert rc == 2 and "not finite" in line and "closed channels at zero" not in line


def test_a_spec_declaring_four_billion_repeats_is_refused_under_a_memory_limit(run_copy):
    from polarprune_cuda.surgery.spec import spec_digest

    spec = json.loads((run_copy / "model" / "spec.json").read_text())
    spec["groups"][0].update(channels=2 ** 32, repeat=2 ** 32, kept=[0])
    spec["sha256"] = spec_digest(spec)
    (run_copy / "model" / "spec.json").write_text(json.dumps(spec))
    proc = run_limited(["export", str(run_copy), "--format", "pt2"])
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "4294967296 groups of 1" in line


def test_a_gzipped_idx_file_that_expands_to_gigabytes_is_refused_under_a_memory_limit(tmp_path):
    import gzip
    import struct

    def idx(name, shape, body: bytes):
        header = struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(header + body))

    idx("train-labels-idx1-ubyte", (30,), bytes(30))
    idx("t10k-images-idx3-ubyte", (10, 28, 28), bytes(10 * 784))
    idx("t10k-labels-idx1-ubyte", (10,), bytes(10))
    # 2^22 images of 32x32 declared (4 GiB), and a body of 256 MiB of zeros that gzip holds in 250 KB
    header = struct.pack(">BBBBIII", 0, 0, 0x08, 3, 1 << 22, 32, 32)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(16):
            f.write(bytes(1 << 24))
    assert (tmp_path / "train-images-idx3-ubyte.gz").stat().st_size < 2 << 20
    proc = run_limited(["prune", "--dataset", "fashion-mnist", "--model", "resnet20", "--data-dir", str(tmp_path),
                        "--epochs", "1", "--quiet", "--out", str(tmp_path / "o")])
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "train-images-idx3-ubyte.gz" in line and "more than an IDX data set" in line
