"""A hostile file system (issue 26): output paths under a regular file, in read-only folders, on a full disk;
``evaluate --overwrite`` failing half-way; evaluating a run folder that a live training run holds.

Each case: one line ``error: ...`` naming the path, exit 2, no traceback, checked before anything slow, nothing
written and the previous state byte-identical. The container runs as root, which ignores mode bits: read-only
folders are made as read-only tmpfs / bind mounts (root may mount; the tests skip where mounting is refused),
and a chmod case runs only as a user the bits apply to.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXAMPLE, REPO, clean_env, one_line_error, run_train, tree_hash

import evaluate_movie_review as ev
from review_lm.evaluation.output import check_output_folder, staged_results
from review_lm.runs import lock as run_lock
from review_lm.runs import run_folder as rf
from review_lm.utils import UsageError, check_output_path


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate_movie_review.py"), *args, "--no_progress"],
                          capture_output=True, text=True, timeout=180, env=clean_env(), cwd=str(REPO),
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def mount(tmp_path):
    """``mount(folder, options, source=None)``: a tmpfs (or a read-only bind of ``source``) on ``folder``,
    unmounted after the test. Skips where this process may not mount."""
    mounted: list[Path] = []

    def make(folder: Path, options: str, source: Path | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if source is None:
            cmd = [["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]]
        else:  # a bind mount takes "ro" only on a remount
            cmd = [["mount", "--bind", str(source), str(folder)], ["mount", "-o", f"remount,{options},bind",
                                                                    str(folder)]]
        for c in cmd:
            proc = subprocess.run(c, capture_output=True, text=True)
            if proc.returncode != 0:
                if mounted and mounted[-1] == folder:
                    subprocess.run(["umount", str(folder)], check=False)
                pytest.skip(f"cannot mount here ({proc.stderr.strip()})")
            if folder not in mounted:
                mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def evaluated_run(preview_run, tmp_path) -> Path:
    """A copy of the run with a finished evaluation in eval/ (baselines only: no model needed)."""
    run = Path(shutil.copytree(preview_run, tmp_path / "run"))
    assert ev.main(["--baselines_only", "--model_dir", str(run), "--no_progress"]) == 0
    assert (run / rf.EVAL_DIR / rf.METRICS_FILE).is_file()
    return run


def train_cli(out: Path, tiny_model: str) -> subprocess.CompletedProcess:
    return run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model, "--report_to",
                     "none", "--preview_only")


# --------------------------------------------------------------------------------------------------------------
# The check, case by case (in process)
# --------------------------------------------------------------------------------------------------------------
def test_output_path_check_names_the_path_and_what_is_wrong(tmp_path, mount):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"^--output_dir .*/file: exists and is not a folder$"):
        check_output_path(str(tmp_path / "file"), "--output_dir")
    with pytest.raises(UsageError, match=r"^--output_dir .*/file/a/b: cannot be created: .*/file is a file, not a"):
        check_output_path(str(tmp_path / "file" / "a" / "b"), "--output_dir")
    with pytest.raises(UsageError, match=r"^--compare_out .*: is a folder, not a file$"):
        check_output_path(str(tmp_path), "--compare_out", kind="file")
    check_output_path(str(tmp_path / "new" / "deeper"), "--output_dir")  # creatable: fine, and nothing made
    assert sorted(os.listdir(tmp_path)) == ["file"]
    ro = mount(tmp_path / "ro", "ro,size=1m")
    with pytest.raises(UsageError, match=r"^--output_dir .*/ro: cannot write there: Read-only file system$"):
        check_output_path(str(ro), "--output_dir")
    with pytest.raises(UsageError, match=r"^--output_dir .*/ro/x/y: cannot write there \(in .*/ro\): Read-only"):
        check_output_path(str(ro / "x" / "y"), "--output_dir")
    small = mount(tmp_path / "small", "size=256k")
    with pytest.raises(UsageError, match=r"cannot write there: no space left on the device \(\d+ bytes free\)$"):
        check_output_path(str(small), "--output_dir")
    assert os.listdir(small) == []  # the probe file is gone


def test_a_chmod_read_only_folder_is_refused_where_the_mode_bits_apply(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes anyway: the check tries, so it says what is true
            check_output_path(str(folder / "out"), "--output_dir")
            pytest.skip("root ignores mode bits (the read-only mounts above cover this case)")
        with pytest.raises(UsageError, match="cannot write there .*Permission denied"):
            check_output_path(str(folder / "out"), "--output_dir")
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------------------------------------------
# The scripts
# --------------------------------------------------------------------------------------------------------------
def test_train_checks_output_dir_before_the_lock(tmp_path, tiny_model, mount):
    (tmp_path / "file").write_text("x")
    line = one_line_error(train_cli(tmp_path / "file" / "out", tiny_model))
    assert line == f"error: --output_dir {tmp_path / 'file' / 'out'}: cannot be created: {tmp_path / 'file'} is a " \
                   "file, not a folder"
    ro = mount(tmp_path / "ro", "ro,size=1m")
    line = one_line_error(train_cli(ro / "out", tiny_model))
    assert line == f"error: --output_dir {ro / 'out'}: cannot write there (in {ro}): Read-only file system"
    line = one_line_error(train_cli(ro, tiny_model))  # the folder itself: the lock file could not be made
    assert line == f"error: --output_dir {ro}: cannot write there: Read-only file system"
    small = mount(tmp_path / "small", "size=256k")
    assert "no space left on the device" in one_line_error(train_cli(small / "out", tiny_model))
    assert os.listdir(small) == [] and sorted(os.listdir(tmp_path)) == ["file", "ro", "small"]


def test_evaluate_checks_every_output_path_before_anything_slow(evaluated_run, tmp_path, mount):
    test_file = str(evaluated_run / rf.TEST_SAMPLES)
    (tmp_path / "file").write_text("x")
    args = ["--baselines_only", "--test_file", test_file]
    line = one_line_error(evaluate_cli(*args, "--output_dir", str(tmp_path / "file" / "e")))
    assert line.endswith(f"cannot be created: {tmp_path / 'file'} is a file, not a folder")
    line = one_line_error(evaluate_cli(*args, "--output_dir", str(tmp_path / "file")))
    assert line == f"error: output folder {tmp_path / 'file'}: exists and is not a folder"
    ro_run = mount(tmp_path / "ro_run", "ro", source=evaluated_run)  # eval/ exists: staged in the read-only run
    before = tree_hash(ro_run)
    line = one_line_error(evaluate_cli("--baselines_only", "--model_dir", str(ro_run), "--overwrite"))
    assert line == f"error: output folder {ro_run / rf.EVAL_DIR}: cannot write there: Read-only file system"
    shutil.rmtree(evaluated_run / rf.EVAL_DIR)  # no eval/ yet: it could not be created
    line = one_line_error(evaluate_cli("--baselines_only", "--model_dir", str(ro_run)))
    assert line == f"error: output folder {ro_run / rf.EVAL_DIR}: cannot write there (in {ro_run}): Read-only file " \
                   "system"
    small = mount(tmp_path / "small", "size=256k")
    assert "no space left on the device" in one_line_error(evaluate_cli(*args, "--output_dir", str(small / "e")))
    line = one_line_error(evaluate_cli("--compare", str(evaluated_run), "--compare_out",
                                       str(tmp_path / "file" / "c.png")))
    assert line.startswith(f"error: --compare_out {tmp_path / 'file' / 'c.png'}: cannot be created")
    assert {k: v for k, v in before.items() if not k.startswith(rf.EVAL_DIR)} == tree_hash(evaluated_run)


# --------------------------------------------------------------------------------------------------------------
# --overwrite: never destroy before the new results are complete
# --------------------------------------------------------------------------------------------------------------
def test_overwrite_with_hostile_predictions_leaves_the_previous_evaluation_byte_identical(evaluated_run, tmp_path):
    before = tree_hash(evaluated_run)
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"index": 0, "prediction": "好看\ud800"}) + "\n", encoding="utf-8")
    args = ["--test_file", str(evaluated_run / rf.TEST_SAMPLES), "--predictions", str(bad), "--output_dir",
            str(evaluated_run / rf.EVAL_DIR), "--overwrite"]
    line = one_line_error(evaluate_cli(*args))
    assert line.startswith(f"error: {bad}: line 1: index 0 (user Y): 'prediction' is not valid Unicode: a lone "
                           "surrogate \\ud800")
    bad.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert one_line_error(evaluate_cli(*args)).startswith(f"error: {bad}: nested too deeply")
    assert tree_hash(evaluated_run) == before


def test_a_failure_while_writing_results_leaves_the_previous_ones_byte_identical(evaluated_run, monkeypatch, capsys):
    before = tree_hash(evaluated_run)

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(ev, "write_json_atomic", disk_full)  # metrics.json, the last file written
    assert ev.main(["--baselines_only", "--model_dir", str(evaluated_run), "--overwrite", "--seed", "3",
                    "--no_progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {evaluated_run / rf.EVAL_DIR}: cannot write the results (No space left on device); the previous "
        "results there, if any, are unchanged")
    assert tree_hash(evaluated_run) == before
    assert sorted(os.listdir(evaluated_run)) == sorted({p.split("/")[0] for p in before})  # no staging folder


def test_overwrite_swaps_in_complete_results_and_keeps_other_files(evaluated_run, tmp_path):
    old = tree_hash(evaluated_run / rf.EVAL_DIR)
    assert ev.main(["--baselines_only", "--model_dir", str(evaluated_run), "--overwrite", "--seed", "3",
                    "--no_progress"]) == 0
    new = tree_hash(evaluated_run / rf.EVAL_DIR)
    assert new.keys() == old.keys() and new[rf.METRICS_FILE] != old[rf.METRICS_FILE]
    shared = tmp_path / "shared"  # --output_dir pointed at a folder with the user's own files in it
    shared.mkdir()
    (shared / "notes.txt").write_text("mine")
    for seed in ("1", "2"):
        assert ev.main(["--baselines_only", "--model_dir", str(evaluated_run), "--output_dir", str(shared),
                        "--overwrite", "--seed", seed, "--no_progress"]) == 0
    assert sorted(os.listdir(shared)) == sorted(["notes.txt", *old])
    assert (shared / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["run", "shared"]


def test_staged_results_removes_everything_it_made_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "eval"
    with pytest.raises(RuntimeError), staged_results(str(out)) as stage:
        Path(stage, "metrics.json").write_text("{}")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    check_output_folder(str(out))  # creatable: fine


# --------------------------------------------------------------------------------------------------------------
# A run folder that a live training run holds
# --------------------------------------------------------------------------------------------------------------
def test_evaluating_a_run_that_is_being_trained_is_refused_but_its_checkpoints_are_not(preview_run, tmp_path):
    run = Path(shutil.copytree(preview_run, tmp_path / "run"))
    (run / "checkpoint-2").mkdir()
    with run_lock.RunLock(str(run), "live-run", environ={}) as held:
        assert held.held
        before = tree_hash(run)
        line = one_line_error(evaluate_cli("--baselines_only", "--model_dir", str(run)))
        assert line == (f"error: --model_dir {run} is being trained right now (pid {os.getpid()} on host "
                        f"{held.holder['host']}, started {line.split('started ')[1].split(')')[0]}): its files may "
                        "change while they are read; wait for the run to finish, or evaluate one of its finished "
                        f"checkpoints with --model_dir {run / 'checkpoint-N'}")
        assert tree_hash(run) == before
        run_lock.check_not_in_training(str(run / "checkpoint-2"))  # a checkpoint folder holds no lock
    assert run_lock.training_holder(str(run)) is None  # released
    (run / rf.LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": "h"}))  # a kill -9'd holder
    assert run_lock.training_holder(str(run)) is None
    assert evaluate_cli("--baselines_only", "--model_dir", str(run)).returncode == 0


def test_proc_locks_parsing():
    text = "1: FLOCK  ADVISORY  WRITE 18991 fe:00:2179091 0 EOF\n2: POSIX  ADVISORY  WRITE 5 00:2f:7 0 EOF\n"
    assert run_lock._flocked_inodes(text) == {("fe:00", 2179091)}
