"""Tests for fault_tolerance.py and the train script's long-run behaviour (issue 11).

Pure decisions first (checkpoint completeness, start plan, cadence, resume command, the signal callback driven
by hand), then real runs of the script on the tiny CPU model: SIGKILL + resume, a torchrun worker killed under
--max-restarts, SIGTERM mid-epoch, and step-based early stopping. Kills are timed from outside by watching the
output folder for a complete checkpoint (no test-only hooks in the code).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from review_lm.runs import checkpoints as ft
from review_lm.runs import launch
from review_lm.runs import run_folder as rf
from review_lm.training import graceful_stop, plan, process_group, tracking
from review_lm.utils import UsageError
from tests.helpers import (
    EXAMPLE,
    assert_same_weights,
    clean_env,
    finish,
    one_line_error,
    read_config,
    run_train,
    start_train,
    state_dict,
    wait_for_checkpoints,
    worker_pid,
    write_drift_reviews,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------------------
# Checkpoint completeness
# --------------------------------------------------------------------------------------------------------------
def make_checkpoint(folder: Path, step: int, rng_files=("rng_state.pth",)) -> Path:
    """A small but real Trainer-shaped checkpoint: torch.save zips, a safetensors file, trainer_state.json."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(folder / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    for name in rng_files:
        torch.save({"cpu": torch.random.get_rng_state()}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def test_complete_checkpoint_has_no_problem(tmp_path):
    assert ft.checkpoint_problem(str(make_checkpoint(tmp_path / "checkpoint-4", 4))) is None
    ddp = make_checkpoint(tmp_path / "checkpoint-6", 6, rng_files=("rng_state_0.pth", "rng_state_1.pth"))
    assert ft.checkpoint_problem(str(ddp)) is None


def deepspeed_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint as Trainer writes it under --deepspeed: no optimizer.pt, DeepSpeed's global_stepN/ instead."""
    import torch

    make_checkpoint(folder, step)
    (folder / "optimizer.pt").unlink()
    (folder / "scheduler.pt").unlink()
    states = folder / f"global_step{step}"
    states.mkdir()
    for rank in (0, 1):
        torch.save({"optimizer_state_dict": {}}, states / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    torch.save({"module": {}}, states / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text(f"global_step{step}")
    return folder


def test_deepspeed_checkpoint_is_complete_with_its_own_state_folder(tmp_path):
    complete = deepspeed_checkpoint(tmp_path / "checkpoint-4", 4)
    assert ft.checkpoint_problem(str(complete)) is None
    truncate(complete / "global_step4" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert "is truncated" in ft.checkpoint_problem(str(complete))
    missing = deepspeed_checkpoint(tmp_path / "checkpoint-6", 6)
    (missing / "global_step6" / "mp_rank_00_model_states.pt").unlink()
    assert ft.checkpoint_problem(str(missing)) == "no DeepSpeed model states in global_step6/"
    dangling = deepspeed_checkpoint(tmp_path / "checkpoint-8", 8)
    (dangling / "latest").write_text("global_step9")
    assert "names no readable state folder" in ft.checkpoint_problem(str(dangling))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is truncated"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 2}'), "says step 2"),
        (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
        (lambda c: truncate(c / "model.safetensors"), "model.safetensors is truncated"),
        (lambda c: truncate(c / "model.safetensors", keep=4), "model.safetensors is truncated"),
        (lambda c: (c / "optimizer.pt").unlink(), "no optimizer.pt"),
        (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
        (lambda c: (c / "scheduler.pt").unlink(), "no scheduler.pt"),
        (lambda c: (c / "rng_state.pth").unlink(), "no rng_state"),
        (lambda c: (c / "rng_state.pth").write_bytes(b""), "rng_state.pth is truncated"),
    ],
)
def test_each_kind_of_incomplete_checkpoint_is_named(tmp_path, damage, expected):
    folder = make_checkpoint(tmp_path / "checkpoint-4", 4)
    damage(folder)
    assert expected in ft.checkpoint_problem(str(folder))


def test_sharded_weights_need_every_shard(tmp_path):
    folder = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing weight shard model-00002-of-00002.safetensors" in ft.checkpoint_problem(str(folder))
    (folder / "model-00002-of-00002.safetensors").write_bytes(
        (folder / "model-00001-of-00002.safetensors").read_bytes())
    assert ft.checkpoint_problem(str(folder)) is None


def test_latest_complete_checkpoint_skips_incomplete_newer_ones_with_one_line_each(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    make_checkpoint(tmp_path / "checkpoint-10", 10)  # numeric order: 10 is newer than 2 and 9
    (tmp_path / "checkpoint-10" / "optimizer.pt").unlink()
    make_checkpoint(tmp_path / "checkpoint-9", 9)
    truncate(tmp_path / "checkpoint-9" / "model.safetensors")
    (tmp_path / "checkpoint-12").mkdir()  # a save that died before writing anything
    lines: list[str] = []
    assert ft.latest_complete_checkpoint(str(tmp_path), lines.append) == str(tmp_path / "checkpoint-2")
    assert len(lines) == 3
    assert "checkpoint-12: no trainer_state.json" in lines[0]
    assert "checkpoint-10: no optimizer.pt" in lines[1]
    assert "checkpoint-9: model.safetensors is truncated" in lines[2]
    assert ft.latest_complete_checkpoint(str(tmp_path / "absent"), lines.append) is None


# --------------------------------------------------------------------------------------------------------------
# Start decisions
# --------------------------------------------------------------------------------------------------------------
def test_restart_count_from_torchrun_environment():
    assert launch.restart_count({}) == 0
    assert launch.restart_count({"TORCHELASTIC_RESTART_COUNT": "0"}) == 0
    assert launch.restart_count({"TORCHELASTIC_RESTART_COUNT": "2"}) == 2
    assert launch.restart_count({"TORCHELASTIC_RESTART_COUNT": "x"}) == 0


def test_only_a_distributed_restart_gets_its_own_store_prefix():
    """A restarted group must not read the dead group's rank addresses from torchrun's shared store."""
    assert launch.restart_store_prefix({}) is None
    assert launch.restart_store_prefix({"TORCHELASTIC_RESTART_COUNT": "0", "WORLD_SIZE": "2"}) is None
    assert launch.restart_store_prefix({"TORCHELASTIC_RESTART_COUNT": "2", "WORLD_SIZE": "1"}) is None
    first = launch.restart_store_prefix({"TORCHELASTIC_RESTART_COUNT": "1", "WORLD_SIZE": "2"})
    second = launch.restart_store_prefix({"TORCHELASTIC_RESTART_COUNT": "2", "WORLD_SIZE": "2"})
    assert first and second and first != second
    assert process_group.isolate_restarted_process_group({"WORLD_SIZE": "2"}) is None  # first start: torch does it


def test_resolve_resume(tmp_path):
    assert ft.resolve_resume(None, str(tmp_path), 0) is None
    with pytest.raises(UsageError, match="no complete checkpoint-\\* folder"):
        ft.resolve_resume("latest", str(tmp_path), 0)
    assert ft.resolve_resume("latest", str(tmp_path), restarts=1) is None  # a restart then starts from scratch
    good = make_checkpoint(tmp_path / "checkpoint-2", 2)
    bad = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (bad / "scheduler.pt").unlink()
    assert ft.resolve_resume("latest", str(tmp_path), 0, log=lambda m: None) == str(good)
    with pytest.raises(UsageError, match="checkpoint-4: incomplete checkpoint \\(no scheduler.pt\\)"):
        ft.resolve_resume(str(bad), str(tmp_path), 0)


def test_checkpoint_schedule_each_branch():
    assert plan.checkpoint_schedule(0, 0, True) == {"save_strategy": "epoch", "eval_strategy": "epoch"}
    assert plan.checkpoint_schedule(0, 0, False) == {"save_strategy": "epoch", "eval_strategy": "no"}
    steps = {"save_strategy": "steps", "save_steps": 5, "eval_strategy": "steps", "eval_steps": 5}
    assert plan.checkpoint_schedule(5, 0, True) == steps
    assert plan.checkpoint_schedule(0, 5, True) == steps
    assert plan.checkpoint_schedule(10, 5, True) == {**steps, "save_steps": 10}
    assert plan.checkpoint_schedule(7, 3, False) == {"save_strategy": "steps", "save_steps": 7, "eval_strategy": "no"}
    assert plan.checkpoint_schedule(0, 3, False) == {"save_strategy": "epoch", "eval_strategy": "no"}
    with pytest.raises(UsageError, match="--save_steps 7 must be a multiple of --eval_steps 3"):
        plan.checkpoint_schedule(7, 3, True)


def test_schedule_reaches_training_arguments():
    """The kwargs are accepted by TrainingArguments, including transformers' best-model-reload rule."""
    from transformers import TrainingArguments

    for save, evaluate in ((5, 0), (0, 5), (10, 5), (0, 0)):
        targs = TrainingArguments(output_dir="unused", load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                  use_cpu=True, report_to="none", **plan.checkpoint_schedule(save, evaluate, True))
        assert targs.save_steps == (save or evaluate or targs.save_steps)


def test_resume_command_keeps_the_arguments_and_asks_for_the_latest_checkpoint():
    argv = ["--data_file", "d.json", "--output_dir", "out", "--overwrite_output_dir",
            "--resume_from_checkpoint", "out/checkpoint-4", "--max_epochs", "3"]
    assert ft.resume_command(argv, "train.py", {}) == \
        "python train.py --data_file d.json --output_dir out --max_epochs 3 --resume_from_checkpoint"
    assert ft.resume_command(["--output_dir", "my out", "--resume_from_checkpoint"], "train.py", {}) == \
        "python train.py --output_dir 'my out' --resume_from_checkpoint"
    env = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"}
    assert ft.resume_command(["--output_dir", "o"], "t.py", env) == \
        "torchrun --nproc_per_node=4 --nnodes=2 t.py --output_dir o --resume_from_checkpoint"


def test_wandb_run_id_is_stored_and_reused(tmp_path):
    first = tracking.wandb_run_id(str(tmp_path), resuming=False)
    assert (tmp_path / rf.WANDB_ID_FILE).read_text().strip() == first
    assert tracking.wandb_run_id(str(tmp_path), resuming=True) == first
    assert tracking.wandb_run_id(str(tmp_path), resuming=False) != first  # a new run gets a new W&B run
    env: dict[str, str] = {}
    tracking.configure_wandb_resume(env, "abc123")
    assert env == {"WANDB_RUN_ID": "abc123", "WANDB_RESUME": "allow"}


# --------------------------------------------------------------------------------------------------------------
# The signal callback, driven by hand
# --------------------------------------------------------------------------------------------------------------
class _Args:
    device = "cpu"
    output_dir = "out"


def _step(callback, epoch: float, step: int):
    from transformers import TrainerControl, TrainerState

    state = TrainerState(epoch=epoch, global_step=step)
    control = callback.on_step_end(_Args(), state, TrainerControl())
    return state, control


def test_signal_mid_epoch_saves_at_this_step_and_suppresses_the_partial_epoch_end():
    from transformers import TrainerControl

    stop = graceful_stop.graceful_stop_callback(exit_now=lambda code: None)
    _, control = _step(stop, 0.5, 3)
    assert not control.should_training_stop  # no signal: nothing changes
    stop._handle(signal.SIGTERM, None)
    state, control = _step(stop, 0.6, 4)
    assert (control.should_training_stop, control.should_save, stop.stopped_step) == (True, True, 4)
    epoch_end = TrainerControl(should_log=True, should_evaluate=True, should_save=True)
    epoch_end = stop.on_epoch_end(_Args(), state, epoch_end)
    assert not (epoch_end.should_log or epoch_end.should_evaluate or epoch_end.should_save)
    stop.on_save(_Args(), state, TrainerControl())
    assert stop.checkpoint == os.path.join("out", "checkpoint-4")
    assert stop.exit_code == 128 + signal.SIGTERM


def test_signal_on_an_epochs_last_step_keeps_its_evaluation_and_saves():
    from transformers import TrainerControl

    stop = graceful_stop.graceful_stop_callback(exit_now=lambda code: None)
    stop._handle(signal.SIGINT, None)
    state, control = _step(stop, 2.0, 8)
    assert control.should_training_stop and not control.should_save  # the epoch end saves
    epoch_end = stop.on_epoch_end(_Args(), state, TrainerControl(should_log=True, should_evaluate=True))
    assert epoch_end.should_log and epoch_end.should_evaluate and epoch_end.should_save
    assert stop.exit_code == 130


def test_second_signal_exits_at_once_and_handlers_are_restored():
    exits: list[int] = []
    stop = graceful_stop.graceful_stop_callback(exit_now=exits.append)
    before = signal.getsignal(signal.SIGINT)
    stop.on_train_begin(_Args(), None, None)
    assert signal.getsignal(signal.SIGINT) == stop._handle
    stop._handle(signal.SIGINT, None)
    assert exits == []
    stop._handle(signal.SIGINT, None)
    assert exits == [130]
    stop.on_train_end(_Args(), None, None)
    assert signal.getsignal(signal.SIGINT) == before


# --------------------------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """The same tiny model as test_train's fixture (built once for this module)."""
    from review_lm.testing.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), tokenizer_kind="bpe", corpus=[EXAMPLE],
                           vocab_size=1000, hidden_size=64, num_layers=2)


def approx_dict(values: dict) -> dict:
    return {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in values.items()}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run_and_skips_a_truncated_checkpoint(tmp_path, tiny):
    common = ["--data_file", EXAMPLE, "--model_path", tiny, "--max_epochs", "4", "--warmup_steps", "0",
              "--learning_rate", "1e-3", "--report_to", "none"]
    reference = tmp_path / "reference"
    proc = run_train(*common, "--output_dir", str(reference))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    proc = start_train(*common, "--output_dir", str(out))
    wait_for_checkpoints(proc, out, 2)  # per epoch: checkpoint-2 and checkpoint-4
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "training_config.json").exists()
    data_files = {n: (out / n).read_bytes() for n in ("test_samples.json", "training_samples_preview.txt")}

    # The newest checkpoint lost its optimizer state (a save cut short): resume must use the one before it.
    newest, previous = ft.checkpoints_newest_first(str(out))[:2]
    assert ft.checkpoint_problem(previous) is None
    os.remove(os.path.join(newest, "optimizer.pt"))
    resumed = run_train(*common, "--output_dir", str(out), "--resume_from_checkpoint")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = [line for line in resumed.stderr.splitlines() if "skipping incomplete checkpoint" in line]
    assert len(skipped) == 1 and f"{newest}: no optimizer.pt" in skipped[0]
    assert f"resuming from {previous}" in resumed.stderr

    expected, got = read_config(reference)["result"], read_config(out)["result"]
    assert got["global_steps"] == expected["global_steps"] == 8
    assert got["train_loss_per_epoch"] == approx_dict(expected["train_loss_per_epoch"])
    assert got["eval_loss_per_epoch"] == approx_dict(expected["eval_loss_per_epoch"])
    assert read_config(out)["resolved"]["resumed_from"] == previous
    for name, before in data_files.items():  # rewritten on resume, byte for byte the same as the first start
        assert (out / name).read_bytes() == before == (reference / name).read_bytes(), name


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_worker_finishes_the_run_by_itself(tmp_path, tiny):
    out = tmp_path / "ddp"
    proc = start_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny,
                       "--max_epochs", "6", "--warmup_steps", "0", "--learning_rate", "1e-3", "--report_to", "none",
                       torchrun=2, extra=("--max-restarts=1",))
    wait_for_checkpoints(proc, out, 2)  # 19 samples on 2 ranks: one optimizer step (and checkpoint) per epoch
    os.kill(worker_pid(proc.pid, local_rank=1), signal.SIGKILL)
    log = finish(proc)
    assert proc.returncode == 0, log[-4000:]
    resumed = [line for line in log.splitlines() if "torchrun restart 1 of the worker group: resuming from" in line]
    assert len(resumed) == 1, log[-4000:]
    checkpoint = resumed[0].rsplit("resuming from ", 1)[1].strip()
    assert ft.CHECKPOINT_RE.match(os.path.basename(checkpoint)) and int(checkpoint.rsplit("-", 1)[1]) >= 2
    config = read_config(out)
    assert config["result"]["global_steps"] == 6
    assert sorted(config["result"]["train_loss_per_epoch"]) == ["1", "2", "3", "4", "5", "6"]
    assert config["resolved"]["resumed_from"] == checkpoint
    assert [n for n in os.listdir(out) if n.startswith("training_config")] == ["training_config.json"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_the_last_step_and_a_resume_completes(tmp_path, tiny):
    out = tmp_path / "run"
    common = ["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny, "--max_epochs", "2",
              "--batch_size", "4", "--gradient_accumulation_steps", "1", "--warmup_steps", "0",
              "--learning_rate", "1e-3", "--save_steps", "2", "--report_to", "wandb"]
    env = clean_env(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), WANDB_MODE="offline")
    proc = start_train(*common, env=env, cwd=str(tmp_path))
    wait_for_checkpoints(proc, out, 1)  # checkpoint-2 of 5 steps per epoch
    proc.send_signal(signal.SIGTERM)
    log = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "SIGTERM received: finishing the current optimizer step" in log
    stopped = [line for line in log.splitlines() if "stopped by SIGTERM after optimizer step" in line]
    assert len(stopped) == 1, log[-3000:]
    step = int(stopped[0].split("optimizer step ")[1].split(";")[0])
    assert 2 <= step < 10
    assert ft.latest_complete_checkpoint(str(out)) == str(out / f"checkpoint-{step}")
    assert stopped[0].endswith("--save_steps 2 --report_to wandb --resume_from_checkpoint")
    assert not (out / "training_config.json").exists()

    resumed = run_train(*common, "--resume_from_checkpoint", env=env, cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Both starts logged into the same W&B run: the id stored in output_dir (offline runs end with their id).
    run_id = (out / rf.WANDB_ID_FILE).read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), (runs, run_id)
    result = read_config(out)["result"]
    assert result["global_steps"] == 10 and sorted(result["train_loss_per_epoch"]) == ["1", "2"]
    assert sorted(result["eval_loss_per_step"], key=int) == ["2", "4", "6", "8", "10"]  # every 2 steps


@pytest.mark.slow
def test_step_based_evaluation_early_stops_and_keeps_the_best_model(tmp_path, tiny):
    data = write_drift_reviews(tmp_path)
    out = tmp_path / "run"
    proc = run_train("--data_file", data, "--output_dir", str(out), "--model_path", tiny, "--no_history",
                     "--max_epochs", "20", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                     "--learning_rate", "1e-2", "--warmup_steps", "0", "--early_stopping_patience", "2",
                     "--eval_steps", "2", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_config(out)["result"]
    assert result["stopped_early"] is True
    steps = sorted(int(s) for s in result["eval_loss_per_step"])
    assert all(s % 2 == 0 for s in steps)
    losses = {int(s): v for s, v in result["eval_loss_per_step"].items()}
    assert result["best_eval_loss"] == min(losses.values()) == losses[result["best_step"]]
    assert steps[-3:] == [result["best_step"], result["best_step"] + 2, result["best_step"] + 4]  # patience 2
    assert result["global_steps"] == steps[-1]
    assert result["best_checkpoint"].endswith(f"checkpoint-{result['best_step']}")  # checkpoints follow evals
    assert_same_weights(state_dict(out), state_dict(Path(result["best_checkpoint"])))


@pytest.mark.slow
def test_save_steps_not_a_multiple_of_eval_steps_is_refused_before_loading(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path",
                                    str(tmp_path / "no-model-needed"), "--save_steps", "5", "--eval_steps", "2"))
    assert "--save_steps 5 must be a multiple of --eval_steps 2" in line
    assert not out.exists()
