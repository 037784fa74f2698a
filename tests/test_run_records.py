"""A run folder is one run (issue 17): resume and restart guards, one launch at a time, bad input loses nothing.

Real training runs of the tiny model, started as a user would (subprocess, torchrun for restarts). Every refusal
is checked as one line, exit 2, and the folder's files unchanged (names, sizes and bytes before == after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from review_lm.runs import run_folder as rf
from tests.helpers import (
    EXAMPLE,
    REPO,
    clean_env,
    finish,
    one_line_error,
    read_config,
    run_train,
    start_train,
    wait_for_checkpoints,
    write_reviews,
)

pytestmark = pytest.mark.slow


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256 of its bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def common(out: Path, model: str, *extra: str) -> list[str]:
    return ["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", model, "--warmup_steps", "0",
            "--learning_rate", "1e-3", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_train(*common(out, tiny_model, "--max_epochs", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def test_resuming_a_finished_run_with_other_data_is_refused_and_touches_nothing(run_copy, tiny_model, tmp_path):
    other = write_reviews(tmp_path / "other.json", [f"第{i}条影评，还不错" for i in range(12)])
    before = snapshot(run_copy)
    args = common(run_copy, tiny_model, "--max_epochs", "1", "--resume_from_checkpoint")
    args[args.index(EXAMPLE)] = other
    line = one_line_error(run_train(*args))
    assert "cannot resume the run in" in line and "--data_file content changed" in line
    assert "--max_epochs" not in line.split("(")[1].split(")")[0]  # epochs may change; the data may not
    assert snapshot(run_copy) == before


def test_resuming_a_finished_run_as_it_was_has_nothing_to_do(run_copy, tiny_model):
    before = snapshot(run_copy)
    line = one_line_error(run_train(*common(run_copy, tiny_model, "--max_epochs", "2", "--resume_from_checkpoint")))
    assert line.endswith("already finished; nothing to resume (pass a larger --max_epochs to train on, or choose "
                         "another --output_dir)")
    assert snapshot(run_copy) == before


def test_resume_with_other_arguments_names_what_differs(run_copy, tiny_model):
    before = snapshot(run_copy)
    line = one_line_error(run_train(*common(run_copy, tiny_model, "--max_epochs", "3", "--max_length", "512",
                                            "--no_history", "--resume_from_checkpoint")))
    assert "--max_length 4096 -> 512" in line and "--use_history on -> off" in line
    assert snapshot(run_copy) == before


def test_more_epochs_continue_a_finished_run_and_the_records_say_so(run_copy, tiny_model):
    before = read_config(run_copy)["result"]
    (run_copy / "eval").mkdir()  # an evaluation of the run as it was
    proc = run_train(*common(run_copy, tiny_model, "--max_epochs", "3", "--resume_from_checkpoint"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished with --max_epochs 2; training on to 3 epochs" in proc.stderr
    assert "describes the run before this resume" in proc.stderr  # the old evaluation is stale
    after = read_config(run_copy)
    assert after["arguments"]["max_epochs"] == 3 and after["result"]["global_steps"] == before["global_steps"] + 2
    assert after["result"]["train_loss_per_epoch"]["1"] == before["train_loss_per_epoch"]["1"]  # not retrained
    assert json.loads((run_copy / rf.FINGERPRINT_FILE).read_text())["max_epochs"] == 3


HOLD_AT_TRAIN = '''
import os, time
gate = os.environ.get("REVIEW_LM_TEST_GATE")
if gate:
    import transformers

    _train = transformers.Trainer.train

    def train(self, *args, **kwargs):  # hold the run (lock taken, data and model loaded) until the test says go
        open(gate + ".reached", "w").close()
        while not os.path.exists(gate + ".go"):
            time.sleep(0.05)
        return _train(self, *args, **kwargs)

    transformers.Trainer.train = train
'''


def gated_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose training run stops just before its first step until ``gate.go`` exists."""
    hook = tmp_path / "gate_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_AT_TRAIN, encoding="utf-8")
    gate = tmp_path / "gate"
    return clean_env(PYTHONPATH=f"{hook}{os.pathsep}{REPO}", REVIEW_LM_TEST_GATE=str(gate)), gate


def test_a_second_launch_into_a_busy_folder_is_refused_and_the_first_finishes(tmp_path, tiny_model):
    out = tmp_path / "run"
    env, gate = gated_env(tmp_path)
    first = start_train(*common(out, tiny_model, "--max_epochs", "3"), env=env)
    reached = Path(f"{gate}.reached")
    deadline = time.monotonic() + 240
    while not reached.exists():  # not a race: the first run waits at the gate for as long as the test needs
        assert first.poll() is None and time.monotonic() < deadline, finish(first, timeout=1)[-3000:]
        time.sleep(0.05)
    # The first run holds the lock for as long as the gate is shut, so a second launch that waited for the lock
    # instead of refusing at once would hang here until run_train's timeout fails the test.
    second = run_train(*common(out, tiny_model, "--max_epochs", "1", "--overwrite_output_dir"))
    line = one_line_error(second)
    assert f"{out} is in use by another training run (pid {first.pid} on host" in line
    assert first.poll() is None  # still held at the gate: the refusal did not wait for it
    Path(f"{gate}.go").touch()
    log = finish(first)
    assert first.returncode == 0, log[-3000:]
    config = read_config(out)
    assert config["arguments"]["max_epochs"] == 3 and config["result"]["global_steps"] == 6
    assert not (out / rf.LOCK_FILE).exists()  # released with the run


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, tiny_model):
    out = tmp_path / "run"
    first = start_train(*common(out, tiny_model, "--max_epochs", "20"))
    wait_for_checkpoints(first, out, 1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / rf.LOCK_FILE).read_text()  # the dead holder's record is still there
    proc = run_train(*common(out, tiny_model, "--max_epochs", "1", "--overwrite_output_dir"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the run lock of a dead training run (pid {first.pid} on host" in proc.stderr
    assert read_config(out)["arguments"]["max_epochs"] == 1


SITECUSTOMIZE = '''
import os
if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "0":
    import transformers

    def _die(*args, **kwargs):  # attempt 0 dies while loading the model (as with an OOM), before clearing
        os._exit(1)

    transformers.AutoModelForCausalLM.from_pretrained = _die
'''


def test_a_restart_after_overwrite_never_resumes_the_old_runs_checkpoints(finished_run, tiny_model, tmp_path):
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    old_checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert old_checkpoints
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = clean_env(PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1",
           str(REPO / "train_distributed_MovieReview.py"),
           *common(out, tiny_model, "--max_epochs", "1", "--overwrite_output_dir")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "still holds a previous run (this launch had not cleared it yet); removing it and starting over" in log
    assert "resuming from" not in log
    config = read_config(out)
    assert config["arguments"]["max_epochs"] == 1 and config["resolved"]["resumed_from"] is None
    assert config["result"]["global_steps"] == 2  # one epoch from scratch, not the old run's 4 steps + more


# --------------------------------------------------------------------------------------------------------------
# Live feedback, kept checkpoints, a full disk
# --------------------------------------------------------------------------------------------------------------
def test_a_log_file_gets_readable_lines_from_the_first_step_and_no_escape_sequences(finished_run, tmp_path):
    log = tmp_path / "train.log"
    with open(log, "wb") as f:  # stderr into a file, as a job scheduler or `> train.log 2>&1` does
        proc = subprocess.run([sys.executable, str(REPO / "train_distributed_MovieReview.py"),
                               *common(tmp_path / "again", str(finished_run), "--max_epochs", "1")],
                              stdout=f, stderr=subprocess.STDOUT, env=clean_env(), cwd=str(REPO), timeout=300)
    raw = log.read_bytes()
    assert proc.returncode == 0, raw[-3000:]
    assert b"\x1b" not in raw and b"\r" not in raw  # no cursor moves or bar redraws in a file
    text = raw.decode("utf-8")
    assert " INFO step 1/2 (epoch 0.80): loss " in text  # the loss at the very first optimizer step
    assert " INFO eval at step 2/2 (epoch 1.00): loss " in text and "{'loss'" not in text


def test_resume_shows_no_warning_about_steps_nobody_set(tmp_path, tiny_model):
    out = tmp_path / "run"
    assert run_train(*common(out, tiny_model, "--max_epochs", "1")).returncode == 0
    proc = run_train(*common(out, tiny_model, "--max_epochs", "2", "--resume_from_checkpoint"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(from args) !=" not in proc.stderr


def test_keep_checkpoints_best_leaves_exactly_the_best_checkpoint(tmp_path, tiny_model):
    from tests.helpers import assert_same_weights, state_dict, write_drift_reviews

    out = tmp_path / "run"
    data = write_drift_reviews(tmp_path)  # the validation loss soon stops improving: best != latest
    args = common(out, tiny_model, "--max_epochs", "8", "--early_stopping_patience", "2", "--keep_checkpoints", "best")
    args[args.index(EXAMPLE)] = data
    proc = run_train(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = Path(read_config(out)["result"]["best_checkpoint"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [best.name]
    assert "--keep_checkpoints best: removed checkpoint-" in proc.stderr
    assert_same_weights(state_dict(out), state_dict(best))  # the final model is the best checkpoint's


def test_keep_checkpoints_none_keeps_only_the_final_model(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = run_train(*common(out, tiny_model, "--max_epochs", "1", "--keep_checkpoints", "none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("checkpoint-*")) and (out / "pytorch_model.bin").is_file()
