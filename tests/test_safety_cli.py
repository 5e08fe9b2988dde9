"""Untrusted run folders, careless options, two runs at once: the command line refuses cleanly.

Each test reproduces a finding of issue 18 and asserts the refusal (one
``polarprune: error:`` line, exit code 2) or the preserved file.
"""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polarprune_cuda import _io, cli, train
from polarprune_cuda.train import data as data_mod, rundir, runs

from helpers import one_error_line, without_clock

TINY = ["--dataset", "digits", "--model", "resnet20", "--max-train", "96", "--max-test", "48",
        "--batch-size", "32", "--latency-batch", "4", "--quiet", "--min-channels", "2"]
RESUMABLE = [*TINY, "--epochs", "2", "--warmup-epochs", "0", "--ramp-epochs", "1"]
REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run, written under umask 022."""
    out = tmp_path_factory.mktemp("finished") / "run"
    old = os.umask(0o022)
    try:
        assert cli.main(["prune", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    return out


# ----------------------------------------------------------------------------- 1. no code from a run folder

MARKER_MODULE = """
import pathlib
def net(num_classes, in_channels=3):
    pathlib.Path({marker!r}).write_text("ran")
    import polarprune_cuda as pp
    return pp.resnet20(num_classes, in_channels)
"""


@pytest.mark.parametrize("named", ["markermod:net", "os:system", "subprocess:Popen"])
def test_export_never_runs_code_a_run_folder_names(run_copy, tmp_path, capsys, monkeypatch, named):
    marker = tmp_path / "MARKER"
    (tmp_path / "markermod.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    report = json.loads((run_copy / "report.json").read_text())
    report["config"]["model"] = named
    (run_copy / "report.json").write_text(json.dumps(report))
    rc, _, err = run(["export", str(run_copy)], capsys)
    line = one_error_line(err)
    assert rc == 2 and f"--model {named}" in line and "never decides which code runs" in line
    with pytest.raises(ValueError, match="never decides which code runs"):
        cli.load_run(run_copy)
    assert not marker.exists()
    assert "markermod" not in sys.modules
    assert not (run_copy / "model.pt2").exists()


def test_export_with_the_users_own_model_option(run_copy, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "markermod.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    report = json.loads((run_copy / "report.json").read_text())
    report["config"]["model"] = "markermod:net"
    (run_copy / "report.json").write_text(json.dumps(report))
    rc, out, err = run(["export", str(run_copy), "--model", "markermod:net"], capsys)
    assert rc == 0, err
    assert marker.read_text() == "ran"                   # the user asked for it on the command line
    assert "model.pt2" in rundir.RunFolder(run_copy).files()


@pytest.mark.parametrize("report,field", [
    ([1, 2, 3], "JSON object"),
    ({"method": "polar"}, "'config'"),
    ({"config": {"model": "resnet20"}}, "'data'"),
    ({"config": {"model": 20}, "data": {"num_classes": 10}}, "'model'"),
    ({"config": {"model": "resnet20"}, "data": {"num_classes": -1}}, "'num_classes'"),
])
def test_export_of_a_malformed_report_is_one_error_line(run_copy, capsys, report, field):
    (run_copy / "report.json").write_text(json.dumps(report))
    rc, _, err = run(["export", str(run_copy)], capsys)
    assert rc == 2 and field in one_error_line(err)


@pytest.mark.parametrize("batch", ["1", "0", "100000000"])
def test_export_batch_out_of_range_is_named(run_copy, capsys, batch):
    rc, _, err = run(["export", str(run_copy), "--batch", batch], capsys)
    assert rc == 2 and "batch must be in [2, 4096]" in one_error_line(err)


def test_export_out_under_a_file_or_a_folder(run_copy, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run(["export", str(run_copy), "--out", str(blocker / "m.pt2")], capsys)
    assert rc == 2 and "is a file" in one_error_line(err)
    rc, _, err = run(["export", str(run_copy), "--out", str(tmp_path)], capsys)
    assert rc == 2 and "is a folder" in one_error_line(err)
    assert blocker.read_text() == "x"


# ----------------------------------------------------------------------------- 2. no file lost

def test_overwrite_removes_only_the_runs_own_files(run_copy, capsys):
    notes = run_copy / "model" / "notes.txt"
    notes.write_text("mine")
    (run_copy / "mine.csv").write_text("a,b")
    before = set(rundir.RunFolder(run_copy).files())
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(run_copy), "--overwrite"], capsys)
    assert rc == 0, err
    assert notes.read_text() == "mine" and (run_copy / "mine.csv").read_text() == "a,b"
    assert before <= set(rundir.RunFolder(run_copy).files())
    assert (run_copy / "report.json").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_polarprune_did_not_write_is_refused(tmp_path, capsys, overwrite):
    out = tmp_path / "theirs"
    (out / "model").mkdir(parents=True)
    weights = out / "model" / "weights.pt"
    weights.write_bytes(b"their weights")
    (out / "model" / "notes.txt").write_text("notes")
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(out), *(["--overwrite"] * overwrite)], capsys)
    line = one_error_line(err)
    assert rc == 2 and "did not write" in line and "model/weights.pt" in line
    assert weights.read_bytes() == b"their weights" and (out / "model" / "notes.txt").read_text() == "notes"
    assert not (out / rundir.MANIFEST).exists()


def test_every_file_a_run_writes_is_in_its_manifest(finished):
    folder = rundir.RunFolder(finished)
    assert folder.owned() and folder.foreign() == []
    assert {"checkpoint.pt", "report.json", "model/spec.json", "model/weights.pt"} <= set(folder.files())


# ----------------------------------------------------------------------------- 3. one run per folder

HOLDER = """
import sys, time
from polarprune_cuda.train import rundir
with rundir.locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_run_on_a_held_folder_is_refused_naming_the_pid(run_copy, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        listing = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE}
        for extra in ([], ["--overwrite"], ["--resume"]):
            rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(run_copy), *extra], capsys)
            line = one_error_line(err)
            assert rc == 2 and f"pid {holder.pid}" in line and "in use by another polarprune run" in line
        rc, _, err = run(["export", str(run_copy)], capsys)
        assert rc == 2 and f"pid {holder.pid}" in one_error_line(err)
        after = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE}
        assert after == listing                          # nothing deleted, nothing written
    finally:
        holder.kill()                                    # kill -9: the operating system drops the lock
        holder.wait()
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(run_copy), "--overwrite"], capsys)
    assert rc == 0, err


def test_the_api_takes_the_same_lock(tmp_path):
    cfg = train.PruneConfig(max_train=32, max_test=16, epochs=1, batch_size=32)
    with rundir.locked(tmp_path / "o"):
        assert rundir.is_locked_here(tmp_path / "o")
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "p")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(rundir.RunFolderError, match=f"pid {holder.pid}"):
                train.run_prune(cfg, tmp_path / "p", progress=False)
        finally:
            holder.kill()
            holder.wait()
    assert not rundir.is_locked_here(tmp_path / "o")


# ----------------------------------------------------------------------------- 6. options to their real range

@pytest.mark.parametrize("extra,named", [
    (["--max-train", "0"], "max-train must be a positive int"),
    (["--max-train", "-5"], "max-train must be a positive int"),
    (["--max-test", "0"], "max-test must be a positive int"),
    (["--latency-batch", "0"], "latency-batch must be a positive int"),
    (["--latency-batch", "-1"], "latency-batch must be a positive int"),
    (["--latency-batch", "100000000"], "latency-batch must be a positive int (at most 4096)"),
    (["--epochs", "0"], "epochs must be a positive int"),
    (["--batch-size", "-2"], "batch-size must be a positive int"),
    (["--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["--label-smoothing", "1"], "label-smoothing must be in [0, 1)"),
    (["--seed", "-1"], "seed must be an int"),
    (["--round-to", "0"], "round-to must be a positive int"),
    (["--round-to", "-4"], "round-to must be a positive int"),
    (["--lr", "nan"], "lr must be a number in [0, 1e+06]"),
    (["--lr", "1e308"], "lr must be a number in [0, 1e+06]"),
    (["--warmup-epochs", "1e308"], "warmup-epochs must be a number in [0, 1e+06]"),
    (["--freeze-lr-scale", "1e308"], "freeze-lr-scale must be a number in [0, 1e+06]"),
    (["--score-init", "1e39"], "score-init must be a number in [-100, 100]"),
    (["--freeze-gates-at", "0"], "freeze-gates-at must be in (0, 1]"),
    (["--device", "bogus"], "device must be cpu, cuda, cuda:N or auto"),
    (["--device", "meta"], "device must be cpu, cuda, cuda:N or auto"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    (["--update-every", "5"], "update-every applies to the unstructured methods"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fashion"], "data-dir '/nonexistent/fashion' is not a folder"),
])
def test_bad_options_are_one_line_naming_the_option(tmp_path, capsys, extra, named):
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(tmp_path / "o"), *extra], capsys)
    assert rc == 2 and named in one_error_line(err)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal where no GPU is visible")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    rc, _, err = run(["prune", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no GPU is visible" in one_error_line(err)


def test_explicit_data_dir_is_the_only_place_looked_in(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(["prune", *TINY, "--dataset", "fashion-mnist", "--data-dir", str(empty),
                      "--out", str(tmp_path / "o")], capsys)
    line = one_error_line(err)
    assert rc == 2 and str(empty) in line and "/usr/share" not in line


def test_unreachable_recipes_warn():
    cfg = train.PruneConfig(epochs=2, warmup_epochs=100, batch_size=32)
    with pytest.warns(UserWarning, match="warmup-epochs 100 reaches past the step where the gates freeze"):
        assert len(runs.warn_unreachable(cfg, 96)) == 1
    cfg = train.PruneConfig(epochs=2, batch_size=100000, warmup_epochs=0)
    with pytest.warns(UserWarning) as caught:
        runs.warn_unreachable(cfg, 96)
    assert [str(w.message).split(":")[0] for w in caught] == [
        "batch-size 100000 is larger than the training set (96 images)",
        "freeze-gates-at 0.3 of 2 steps freezes the gates at step 0"]
    assert runs.warn_unreachable(train.PruneConfig(epochs=12, batch_size=32), 960) == []


def test_warnings_and_resume_without_a_checkpoint_are_said(tmp_path, capsys):
    rc, _, err = run(["prune", *TINY, "--epochs", "2", "--batch-size", "1000", "--out", str(tmp_path / "o"),
                      "--resume", "--interrupt-after-epoch", "1"], capsys)
    assert rc == 130
    assert "polarprune: --resume: " in err and "has no checkpoint yet" in err
    assert "polarprune: warning: batch-size 1000 is larger than the training set (96 images)" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- 7. failures of the file system

def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    saves = []
    original = train.Checkpointer.save

    def save(self, state):
        saves.append(state["epoch"])
        if len(saves) == 2:
            def no_space(tmp):
                Path(tmp).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device", tmp)
            _io.atomic_write(self.path, no_space)
        original(self, state)

    monkeypatch.setattr(train.Checkpointer, "save", save)
    rc, _, err = run(["prune", *RESUMABLE, "--out", str(out)], capsys)
    assert rc == 2 and "No space left on device" in one_error_line(err)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1                            # the previous checkpoint is intact
    assert not list(out.glob(".*.tmp"))


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(rundir.LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", read_only)
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "Read-only file system" in one_error_line(err)


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("keep")
    for out in (f, f / "sub"):
        rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(out)], capsys)
        assert rc == 2 and "is a file" in one_error_line(err)
    assert f.read_text() == "keep"


def test_unexpected_errors_are_one_line_too(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(runs, "run_prune", boom)   # where cli.py looks it up
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(tmp_path / "o")], capsys)
    line = one_error_line(err)
    assert rc == 2 and "RuntimeError: something broke" in line and "POLARPRUNE_DEBUG" in line


# ----------------------------------------------------------------------------- 9. interruptions, temp files, modes

def test_ctrl_c_before_the_first_epoch_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(data_mod, "batches", interrupted)
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(tmp_path / "o")], capsys)
    assert rc == 130 and "nothing was saved" in err and "is saved in" not in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


KILLED_IN_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from polarprune_cuda import cli, train
saves = []
original = train.Checkpointer.save
def save(self, state):
    saves.append(1)
    if len(saves) == 2:   # the second checkpoint: die half-way through its write
        real = torch.save
        def half(obj, f, *a, **k):
            Path(f).write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half
    original(self, state)
train.Checkpointer.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_9_during_the_checkpoint_write_then_resume_equals_uninterrupted(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    rc, _, err = run(["prune", *RESUMABLE, "--out", str(a)], capsys)
    assert rc == 0, err
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, "prune", *RESUMABLE, "--out", str(b)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    temps = list(b.glob(".checkpoint.pt.*.tmp"))
    assert temps                                          # what a kill -9 leaves
    assert torch.load(b / "checkpoint.pt", weights_only=True)["epoch"] == 1
    rc, _, err = run(["prune", *RESUMABLE, "--out", str(b), "--resume"], capsys)
    assert rc == 0, err
    assert not any(t.exists() for t in temps)             # removed by the next run of the folder
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert without_clock(ra["history"]) == without_clock(rb["history"]) and ra["accuracy"] == rb["accuracy"]
    wa, wb = (torch.load(d / "model" / "weights.pt", weights_only=True) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_take_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _io.write_text(tmp_path / "f.txt", "x")
        _io.save_tensors({"w": torch.ones(2)}, tmp_path / "w.pt")
    finally:
        os.umask(old)
    for name in ("f.txt", "w.pt", "w.pt.sha256"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_runs_files_all_have_the_umask_mode(finished):
    modes = {p.relative_to(finished).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in finished.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_digest_files_catch_flipped_bytes(tmp_path):
    path = tmp_path / "w.pt"
    _io.save_tensors({"w": torch.arange(1000.0)}, path)
    assert torch.equal(_io.load_tensors(path)["w"], torch.arange(1000.0))
    data = bytearray(path.read_bytes())
    gen = torch.Generator().manual_seed(0)
    for i in torch.randint(0, len(data), (64,), generator=gen).tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(_io.IntegrityError, match="does not match its digest"):
        _io.load_tensors(path)
    _io.digest_file(path).unlink()
    with pytest.raises(_io.IntegrityError, match="has no digest file"):
        _io.load_tensors(path)


@pytest.mark.parametrize("tamper,named", [
    (lambda sd: {**sd, "conv1.weight": torch.zeros(3, 3)}, "misshapen conv1.weight (3, 3)"),
    (lambda sd: {**sd, "bn1.running_var": torch.full_like(sd["bn1.running_var"], float("nan"))},
     "NaN or inf in bn1.running_var"),
    (lambda sd: [1, 2, 3], "must hold a state_dict"),
])
def test_init_weights_that_do_not_fit_are_named(tmp_path, capsys, tamper, named):
    import polarprune_cuda as pp

    path = tmp_path / "init.pt"
    torch.save(tamper(pp.resnet20(num_classes=10, in_channels=1).state_dict()), path)
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--init", str(path), "--out", str(tmp_path / "o")], capsys)
    line = one_error_line(err)
    assert rc == 2 and line.startswith("polarprune: error: init: ") and named in line


def test_links_in_a_run_folder_are_never_written_or_deleted_through(run_copy, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights.pt").write_bytes(b"precious")
    (elsewhere / "keys").write_text("precious")
    shutil.rmtree(run_copy / "model")
    (run_copy / "model").symlink_to(elsewhere, target_is_directory=True)
    for extra in (["--overwrite"], ["--resume"]):
        rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(run_copy), *extra], capsys)
        assert rc == 2 and "symbolic links (model)" in one_error_line(err)
    removed = rundir.RunFolder(run_copy).clear()          # the API's clear does not follow the link either
    assert "report.json" in removed and not any(r.startswith("model/") for r in removed)
    assert (elsewhere / "weights.pt").read_bytes() == b"precious"
    (run_copy / "model").unlink()
    (run_copy / rundir.LOCK_FILE).unlink()
    (run_copy / rundir.LOCK_FILE).symlink_to(elsewhere / "keys")
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(run_copy), "--overwrite"], capsys)
    assert rc == 2 and "is a symbolic link" in one_error_line(err)
    assert (elsewhere / "keys").read_text() == "precious"


def test_an_oversized_report_is_refused_before_reading(run_copy, capsys):
    with open(run_copy / "report.json", "r+b") as f:
        f.truncate(cli.MAX_REPORT_BYTES + 1)              # sparse file: no disk used
    rc, _, err = run(["export", str(run_copy)], capsys)
    assert rc == 2 and "more than a report can have" in one_error_line(err)


class _RunsACommand:
    """Pickles to a call of os.system: what a tampered CIFAR batch can hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_cifar_batch_that_names_code_is_refused_without_running_it(tmp_path, capsys):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        payload = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        if name == "data_batch_3":
            payload[b"labels"] = _RunsACommand(marker)
        (folder / name).write_bytes(pickle.dumps(payload, protocol=2))
    rc, _, err = run(["prune", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1",
                      "--out", str(tmp_path / "o")], capsys)
    assert rc != 0 and not marker.exists()
    line = one_error_line(err)
    assert "data_batch_3" in line and "system" in line and "refused without running it" in line
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    rc, _, err = run(["prune", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1",
                      "--out", str(tmp_path / "o")], capsys)
    assert rc != 0 and "not a readable CIFAR batch" in one_error_line(err)


def test_a_hard_linked_lock_is_refused_and_its_outside_file_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    os.link(outside, out / rundir.LOCK_FILE)
    rundir.RunFolder(out).claim("report.json")                       # a polarprune folder otherwise
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(out), "--resume"], capsys)
    assert rc != 0 and "hard link" in one_error_line(err)
    assert outside.read_text() == "precious"


def test_a_foreign_folder_is_refused_before_a_lock_is_made_and_without_walking_it(tmp_path, capsys, monkeypatch):
    theirs = tmp_path / "theirs"
    for i in range(50):
        (theirs / f"d{i}").mkdir(parents=True)
        (theirs / f"d{i}" / "f.txt").write_text("x")
    walked = []
    real_walk = os.walk

    def counting_walk(*a, **k):
        for item in real_walk(*a, **k):
            walked.append(item[0])
            yield item

    monkeypatch.setattr(rundir.os, "walk", counting_walk)
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(theirs)], capsys)
    assert rc == 2 and "did not write" in one_error_line(err)
    assert not (theirs / rundir.LOCK_FILE).exists()
    assert len(walked) <= 5                                          # stops at the fourth file


def test_a_manifest_that_lists_the_lock_does_not_get_it_removed(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(out)], capsys)
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] += [rundir.LOCK_FILE, "manifest.json"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with rundir.locked(out):
        assert rundir.RunFolder(out).files() == manifest["files"][:-2]
        rundir.RunFolder(out).clear()
        assert (out / rundir.LOCK_FILE).exists()


def test_a_users_own_file_at_a_planned_name_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(out)], capsys)
    assert rc == 0, err
    (out / "baseline.pt").write_bytes(b"mine")                       # the manifest does not list it
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", str(out), "--overwrite", "--baseline"], capsys)
    assert rc == 2 and "baseline.pt is not a file polarprune wrote" in one_error_line(err)
    assert (out / "baseline.pt").read_bytes() == b"mine"
    (out / "model.pt2").write_bytes(b"mine too")
    rc, _, err = run(["export", str(out), "--format", "pt2"], capsys)
    assert rc != 0 and "model.pt2 is not a file polarprune wrote" in one_error_line(err)
    assert (out / "model.pt2").read_bytes() == b"mine too"
    assert "model.pt2" not in rundir.RunFolder(out).files()


def test_an_out_that_is_not_text_is_refused_before_training(tmp_path, capsys):
    out = os.fsdecode(bytes(tmp_path) + b"/run-\xff")                  # a byte that is not UTF-8
    rc, _, err = run(["prune", *TINY, "--epochs", "1", "--out", out], capsys)
    assert rc == 2 and "is not valid UTF-8" in one_error_line(err)
    assert not any(tmp_path.iterdir())                                # nothing created, nothing trained
