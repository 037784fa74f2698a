"""review_lm.runs.disk_space: the run size estimate and free-space warning, and save failures
(incomplete checkpoints, a full disk recognised, one line naming what to do). Fast: no torch import except in
the real disk-full test (torch.save's errno-less error)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from review_lm.runs import disk_space as ds
from review_lm.utils import UsageError, nearest_existing


# ==============================================================================================================
# Disk space
# ==============================================================================================================
def test_estimate_run_bytes_formula():
    # Full fine-tuning, fp32 weights + AdamW: 3 checkpoints (limit 2 + the one being written) + 1 final copy.
    n = 1_000_000
    assert ds.estimate_run_bytes(n, n, 4, 8, checkpoints_kept=3, final_copies=1) == (4 * n + 8 * n) * 3 + 4 * n
    assert ds.estimate_run_bytes(n, n, 4) == 40 * n  # the defaults: adamw, 3 kept, 1 final
    # LoRA: checkpoints hold the adapter and its optimizer state only.
    assert ds.estimate_run_bytes(n, 1000, 4, 8, 3, 1, saved_params=1000) == 12_000 * 3 + 4000
    # bf16-pure with Kahan AdamW, bin conversion (2 final copies), tokenizer etc. per copy.
    assert ds.estimate_run_bytes(n, n, 2, ds.OPTIMIZER_BYTES["adamw_kahan_bf16"], 2, 2, overhead_bytes=10) == (
        (2 * n + 6 * n + 10) * 2 + 2 * (2 * n + 10))
    # The measured tiny-model checkpoint (STACK_NOTES): 19.5 MB weights, 39 MB optimizer.pt, 11 MB tokenizer.
    params = 19_500_000 // 4
    per_checkpoint = ds.estimate_run_bytes(params, params, 4, 8, 1, 0, overhead_bytes=11_000_000)
    assert 69e6 < per_checkpoint < 70.5e6


@pytest.mark.parametrize("n, text", [(0, "0 B"), (950, "950 B"), (12_345, "12.3 KB"), (3_400_000, "3.4 MB"),
                                     (7_500_000_000, "7.5 GB"), (250_000_000_000, "250 GB"),
                                     (1_200_000_000_000, "1.2 TB")])
def test_human_bytes(n, text):
    assert ds.human_bytes(n) == text


def test_disk_space_warning():
    assert ds.disk_space_warning("out/x", 3_000_000_000, 3_000_000_000) is None
    assert ds.disk_space_warning("out/x", 3_000_000_000, 10**12) is None
    warning = ds.disk_space_warning("out/x", 3_400_000_000, 1_200_000_000)
    assert warning == ("only 1.2 GB free for out/x, but the run needs about 3.4 GB (checkpoints and the final "
                       "model): free space or choose another --output_dir")


def test_free_space_is_read_on_the_nearest_existing_parent(tmp_path):
    missing = tmp_path / "a" / "b" / "c"
    assert nearest_existing(str(missing)) == str(tmp_path)
    assert ds.free_bytes(str(missing)) == shutil.disk_usage(tmp_path).free
    assert ds.check_disk_space(str(missing), 1) is None
    assert "only" in ds.check_disk_space(str(missing), 10**18)
    assert nearest_existing("/") == "/"


# ==============================================================================================================
# Save failures
# ==============================================================================================================
def safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 4


def zip_file(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", b"x")


def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A Trainer-shaped checkpoint without torch: zips for .pt/.pth, a valid safetensors header."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(safetensors_bytes())
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        zip_file(folder / name)
    if complete:  # Trainer writes trainer_state.json last
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_checkpoint_without_trainer_state_is_incomplete(tmp_path):
    assert ds.checkpoint_problem(str(make_checkpoint(tmp_path / "checkpoint-1", 1))) is None
    assert "trainer_state.json" in ds.checkpoint_problem(str(make_checkpoint(tmp_path / "checkpoint-2", 2, False)))


@pytest.mark.parametrize("entries, expected", [
    ([], []),
    ([("c3", None), ("c2", None)], []),
    ([("c3", "no trainer_state.json"), ("c2", None)], ["c3"]),
    ([("c4", "x"), ("c3", "y"), ("c2", None), ("c1", "z")], ["c4", "c3"]),  # c1: older than a complete one
    ([("c2", "x"), ("c1", "y")], ["c2", "c1"]),  # nothing complete: an interrupted first save
])
def test_partial_to_remove(entries, expected):
    assert ds.partial_to_remove(entries) == expected


def test_remove_partial_checkpoints_keeps_complete_and_older_ones(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-1", 1, complete=False)
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    make_checkpoint(tmp_path / "checkpoint-3", 3, complete=False)
    logs = []
    assert ds.remove_partial_checkpoints(str(tmp_path), logs.append) == [str(tmp_path / "checkpoint-3")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]
    assert logs == [f"removed incomplete checkpoint {tmp_path / 'checkpoint-3'}: no trainer_state.json (the save "
                    "was interrupted)"]


@pytest.mark.parametrize("err, free, full", [
    (OSError(errno.ENOSPC, "No space left on device"), None, True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), None, True),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), None, True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 0, True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 10**12, False),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), None, False),
    (RuntimeError("basic_ios::clear: iostream error"), 1000, True),
    (OSError(errno.EACCES, "Permission denied"), 0, False),
    (ValueError("bad"), 0, False),
])
def test_is_disk_full(err, free, full):
    assert ds.is_disk_full(err, free) is full


def test_is_disk_full_survives_a_cycle_in_the_context_chain():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not ds.is_disk_full(a, 0)


def test_is_disk_full_looks_at_the_cause():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert ds.is_disk_full(outer)


CMD = "python train_distributed_MovieReview.py --data_file d.json --output_dir out/x --resume_from_checkpoint"


def test_describe_disk_full_names_folder_space_checkpoint_and_command():
    err = OSError(errno.ENOSPC, "No space left on device")
    line = ds.describe_save_failure(err, "out/x", 3_400_000_000, "out/x/checkpoint-20", CMD, free=0)
    assert line == ("saving to out/x failed: the disk is full (the run needs about 3.4 GB, 0 B free now); "
                    f"last complete checkpoint: out/x/checkpoint-20; free space, then resume with: {CMD}")
    assert ds.describe_save_failure(err, "out/x", None, "c", CMD) == (
        f"saving to out/x failed: the disk is full; last complete checkpoint: c; free space, then resume with: {CMD}")


def test_describe_other_failures_and_no_checkpoint_yet():
    err = OSError(errno.EACCES, "Permission denied", "out/x/checkpoint-5/optimizer.pt")
    line = ds.describe_save_failure(err, "out/x", 10**9, None, CMD)
    assert line == ("saving to out/x failed: PermissionError: Permission denied (out/x/checkpoint-5/optimizer.pt); "
                    "no complete checkpoint yet; fix that, then start again (--overwrite_output_dir)")
    line = ds.describe_save_failure(RuntimeError("first line\nsecond"), "o", None, "o/checkpoint-1", CMD)
    assert line.startswith("saving to o failed: RuntimeError: first line; last complete checkpoint: o/checkpoint-1")
    assert "RuntimeError: no message" in ds.describe_save_failure(RuntimeError(), "o", None, None, CMD)


def test_patched_writer_raising_enospc_gives_one_line_and_removes_the_partial_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_checkpoint(out / "checkpoint-10", 10)

    def save_checkpoint(folder: Path) -> None:  # Trainer's order: weights, optimizer, ..., trainer_state last
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(safetensors_bytes())
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.pt"))

    monkeypatch.setattr(ds, "free_bytes", lambda path: 5_000_000)
    logs = []
    with pytest.raises(UsageError) as failed:
        try:
            save_checkpoint(out / "checkpoint-20")
        except OSError as err:
            raise ds.explain_save_failure(err, str(out), 2_000_000_000, CMD, logs.append) from err
    assert str(failed.value) == (f"saving to {out} failed: the disk is full (the run needs about 2.0 GB, 5.0 MB free "
                                 f"now); last complete checkpoint: {out / 'checkpoint-10'}; free space, then resume "
                                 f"with: {CMD}")
    assert sorted(os.listdir(out)) == ["checkpoint-10"] and len(logs) == 1 and "checkpoint-20" in logs[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a 2 MB tmpfs for a real disk-full test: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:  # busy: an open file left
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk_torch_save_and_plain_write(small_tmpfs):
    """On a real 2 MB file system: torch.save fails without an errno, a plain write with ENOSPC; both are
    recognised, the partial checkpoint is removed (freeing its space) and the line names the complete one."""
    torch = pytest.importorskip("torch")
    out = small_tmpfs / "run"
    make_checkpoint(out / "checkpoint-1", 1)
    partial = out / "checkpoint-2"
    partial.mkdir()
    with pytest.raises(Exception) as failed:  # noqa: B017 - whatever torch raises is what a save gives us
        torch.save({"w": torch.zeros(1_000_000)}, partial / "optimizer.pt")
    err = failed.value
    assert not isinstance(err, OSError)  # the point: no errno to go by
    assert ds.free_bytes(str(out)) < 64 * 1024 * 1024
    assert ds.is_disk_full(err, ds.free_bytes(str(out)))
    usage_error = ds.explain_save_failure(err, str(out), 4_000_000, CMD, log=lambda m: None)
    message = str(usage_error)
    assert message.startswith(f"saving to {out} failed: the disk is full (the run needs about 4.0 MB, ")
    assert f"last complete checkpoint: {out / 'checkpoint-1'}; free space, then resume with: {CMD}" in message
    assert not partial.exists() and ds.free_bytes(str(out)) > 1_000_000  # the partial file's space is back
    with pytest.raises(OSError) as plain:
        (out / "big").write_bytes(b"\0" * 3_000_000)
    assert plain.value.errno == errno.ENOSPC and ds.is_disk_full(plain.value)
