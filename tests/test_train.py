"""Tests for train_distributed_MovieReview.py without training: arguments and decisions as pure functions,
and preview-only runs (in process: no model load) with a tiny model. Real training runs: test_train_runs.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import train_distributed_MovieReview as tr
from review_lm.inference import model_loading as ml
from review_lm.runs import run_folder as rf
from review_lm.training import model_setup, tracking
from review_lm.training import plan as rp
from review_lm.training import report as run_report
from tests.helpers import EXAMPLE, run_plan


# --------------------------------------------------------------------------------------------------------------
# Arguments and decisions (no training)
# --------------------------------------------------------------------------------------------------------------
def test_spec_flags_and_defaults():
    args = tr.parse_args(["--data_file", "d.json", "--output_dir", "out"])
    expected = {
        "train_ratio": 0.7, "val_ratio": 0.15, "test_ratio": 0.15, "model_path": "Qwen/Qwen2.5-3B",
        "max_length": 4096, "batch_size": 2, "gradient_accumulation_steps": 8, "learning_rate": 1e-5,
        "max_epochs": 50, "warmup_steps": 100, "use_profile": True, "use_history": True,
        "disable_flash_attn": False, "wandb_project": "MovieReview", "wandb_run_name": None,
        "early_stopping_patience": 3, "save_format": "bin", "trust_remote_code": False,
        "resume_from_checkpoint": None, "overwrite_output_dir": False,
    }
    assert {k: getattr(args, k) for k in expected} == expected


def test_ablation_flags_toggle_profile_and_history():
    base = ["--data_file", "d.json", "--output_dir", "out"]
    both = tr.parse_args([*base, "--use_profile", "--use_history"])
    assert (both.use_profile, both.use_history) == (True, True)
    profile_only = tr.parse_args([*base, "--use_profile", "--no_history"])
    assert (profile_only.use_profile, profile_only.use_history) == (True, False)
    history_only = tr.parse_args([*base, "--no_profile", "--use_history"])
    assert (history_only.use_profile, history_only.use_history) == (False, True)
    baseline = tr.parse_args([*base, "--no_profile", "--no_history"])
    assert (baseline.use_profile, baseline.use_history) == (False, False)


def test_resume_flag_without_value_means_latest():
    base = ["--data_file", "d.json", "--output_dir", "out"]
    assert tr.parse_args([*base, "--resume_from_checkpoint"]).resume_from_checkpoint == "latest"
    assert tr.parse_args([*base, "--resume_from_checkpoint", "out/checkpoint-4"]).resume_from_checkpoint \
        == "out/checkpoint-4"


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "message"), [
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--max_epochs", "0"], "--max_epochs must be >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
    (["--max_length", "-5"], "--max_length must be >= 1, got -5"),
    (["--early_stopping_patience", "0"], "--early_stopping_patience must be >= 1, got 0"),
    (["--learning_rate", "-1"], "--learning_rate must be > 0, got -1"),
    (["--learning_rate", "0"], "--learning_rate must be > 0, got 0"),
    (["--warmup_steps", "-1"], "--warmup_steps must be >= 0, got -1"),
    (["--logging_steps", "-2"], "--logging_steps must be >= 0, got -2"),
    (["--save_steps", "-1"], "--save_steps must be >= 0, got -1"),
    (["--eval_steps", "-1"], "--eval_steps must be >= 0, got -1"),
    (["--train_ratio", "1.5"], "--train_ratio must be between 0 and 1, got 1.5"),
    (["--train_ratio", "0.5"], "--train_ratio + --val_ratio + --test_ratio must sum to 1, got 0.8"),
    (["--batch_size", "two"], "argument --batch_size: invalid int value: 'two'"),
])
def test_invalid_numbers_are_one_line_before_anything_is_read(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tr, "load_splits", lambda args: pytest.fail("data read before the flags were checked"))
    out = tmp_path / "out"
    try:
        code = tr.main(["--data_file", "d.json", "--output_dir", str(out), *argv])
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]  # one line, no usage dump
    assert not out.exists()


@pytest.mark.parametrize(
    ("disable", "installed", "cuda", "compute", "capability", "expected", "reason_part"),
    [
        (True, True, True, "bf16", (9, 0), "sdpa", "--disable_flash_attn"),
        (False, True, False, "fp32", None, "sdpa", "no CUDA GPU"),
        (False, False, True, "bf16", (8, 0), "sdpa", "not installed"),
        (False, True, True, "fp16", (7, 0), "sdpa", "compute capability 7.0"),
        (False, True, True, "fp32", (8, 6), "sdpa", "fp16/bf16"),
        (False, True, True, "bf16", (8, 0), "flash_attention_2", "flash_attn available"),
        (False, True, True, "fp16", (8, 9), "flash_attention_2", "flash_attn available"),
    ],
)
def test_attention_choice_each_branch(disable, installed, cuda, compute, capability, expected, reason_part):
    attn, reason = rp.choose_attention(disable, installed, cuda, compute, capability)
    assert attn == expected
    assert reason_part in reason


def test_runtime_plan_for_flash_attention_gpu():
    """bf16 GPU, full fine-tune: fp32 master weights, bf16 autocast, and FA2 still chosen (bf16 compute)."""
    plan = rp.plan_runtime(disable_flash_attn=False, cuda_available=True, bf16_supported=True,
                           compute_capability=(9, 0), flash_attn_ok=True)
    assert (plan.attention, plan.precision.mode, plan.weights_dtype) == ("flash_attention_2", "bf16-mixed", "float32")
    assert plan.pad_to_multiple_of == 8
    assert plan.training_kwargs() == {"bf16": True, "fp16": False, "use_cpu": False, "dataloader_pin_memory": True}


def test_runtime_plan_for_old_gpu_and_cpu():
    v100 = rp.plan_runtime(False, True, False, (7, 0), True)
    assert (v100.attention, v100.precision.mode, v100.weights_dtype) == ("sdpa", "fp16-mixed", "float32")
    assert v100.training_kwargs()["fp16"] is True
    cpu = rp.plan_runtime(False, False, False, None, False)
    assert (cpu.attention, cpu.precision.mode, cpu.device, cpu.pad_to_multiple_of) == ("sdpa", "fp32", "cpu", None)
    assert cpu.training_kwargs() == {"bf16": False, "fp16": False, "use_cpu": True, "dataloader_pin_memory": False}


def test_flash_attention_with_pure_bf16_loads_bf16_weights():
    plan = rp.plan_runtime(False, True, True, (8, 0), True, precision="bf16-pure")
    assert (plan.attention, plan.weights_dtype, plan.precision.optimizer) == \
        ("flash_attention_2", "bfloat16", "optimi_adamw_kahan")


def test_flash_attention_plan_reaches_from_pretrained(monkeypatch):
    """The decided attention and dtype are what the model is loaded with (FA2 itself need not be installed)."""
    import torch
    from transformers import AutoModelForCausalLM

    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kwargs: seen.update(source=source, **kwargs) or "model")
    plan = run_plan(rp.plan_runtime(False, True, True, (8, 0), True))
    args = tr.parse_args(["--data_file", "d.json", "--output_dir", "out"])
    assert model_setup.load_training_model(args, "/models/qwen", True, plan) == "model"
    # bf16-mixed: fp32 master weights; FA2 runs on the bf16 activations autocast gives it.
    assert seen == {"source": "/models/qwen", "dtype": torch.float32, "attn_implementation": "flash_attention_2",
                    "trust_remote_code": False, "local_files_only": True,
                    "adapter_kwargs": {"local_files_only": True}}


def test_this_machine_falls_back_to_sdpa_without_flash_attn():
    import torch

    args = tr.parse_args(["--data_file", "d.json", "--output_dir", "out"])
    plan = rp.plan_hardware(args, rp.probe_hardware(args), world_size=1)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert (plan.runtime.attention, plan.runtime.attention_reason) == ("sdpa", "no CUDA GPU")


def test_model_source_local_folder_hub_and_offline(tmp_path, monkeypatch):
    def source(name, environ):
        return ml.resolve_model_source(name, environ, f"--model_path {name}: no such local folder")

    assert source(str(tmp_path), {}) == (str(tmp_path), True)
    with pytest.raises(tr.UsageError, match="no such local folder"):
        source("./no-such-model", {})
    probed = []
    monkeypatch.setattr(ml, "hub_reachable", lambda endpoint: probed.append(endpoint) or False)
    assert source("Qwen/Qwen2.5-3B", {"HF_ENDPOINT": "https://hf-mirror.example"}) \
        == ("Qwen/Qwen2.5-3B", True)  # unreachable hub: local cache only
    assert probed == ["https://hf-mirror.example"]
    assert source("Qwen/Qwen2.5-3B", {"HF_HUB_OFFLINE": "1"}) == ("Qwen/Qwen2.5-3B", True)
    assert source("Qwen/Qwen2.5-3B", {"HTTPS_PROXY": "http://proxy:3128"}) == ("Qwen/Qwen2.5-3B", False)
    assert len(probed) == 1  # neither offline mode nor a proxy probes the hub
    monkeypatch.setattr(ml, "hub_reachable", lambda endpoint: True)
    assert source("Qwen/Qwen2.5-3B", {}) == ("Qwen/Qwen2.5-3B", False)


def test_wandb_without_credentials_goes_offline(tmp_path):
    env = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "missing-netrc")}
    report_to, message = tracking.configure_reporting(None, env, wandb_installed=True)
    assert report_to == "wandb"
    assert env["WANDB_MODE"] == "offline"
    assert "offline" in message and "wandb sync" in message


def test_wandb_with_key_or_netrc_stays_online(tmp_path):
    env = {"WANDB_API_KEY": "x" * 40}
    assert tracking.configure_reporting(None, env, True) == ("wandb", "W&B: logging online")
    assert "WANDB_MODE" not in env
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert tracking.wandb_logged_in({"NETRC": str(netrc_file)}) is True
    assert tracking.wandb_logged_in({"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.org"}) is False


def test_wandb_mode_and_report_to_none_are_respected():
    env = {"WANDB_MODE": "disabled"}
    assert tracking.configure_reporting(None, env, True)[0] == "wandb" and env["WANDB_MODE"] == "disabled"
    env = {}
    assert tracking.configure_reporting("none", env, True) == ("none", None) and env == {}
    assert tracking.configure_reporting(None, {}, wandb_installed=False)[0] == "none"
    with pytest.raises(tr.UsageError, match="needs the wandb package"):
        tracking.configure_reporting("wandb", {}, wandb_installed=False)


def test_optimizer_steps_per_epoch_counts_partial_accumulation():
    assert rp.optimizer_steps_per_epoch(19, batch_size=2, world_size=1, accumulation=8) == 2  # 10 micro-batches
    assert rp.optimizer_steps_per_epoch(19, batch_size=2, world_size=2, accumulation=8) == 1  # 5 per rank
    assert rp.optimizer_steps_per_epoch(28, batch_size=1, world_size=1, accumulation=1) == 28


def test_epoch_losses_from_log_history():
    history = [
        {"loss": 3.0, "epoch": 1.0}, {"eval_loss": 2.5, "epoch": 1.0},
        {"loss": 2.0, "epoch": 2.0}, {"eval_loss": 2.2, "epoch": 2.0},
        {"loss": 1.0, "epoch": 3.0}, {"eval_loss": 2.4, "epoch": 3.0},
        {"train_loss": 2.0, "epoch": 3.0},
    ]
    train, evaluation = run_report.epoch_losses(history)
    assert train == {1: 3.0, 2: 2.0, 3: 1.0}
    assert evaluation == {1: 2.5, 2: 2.2, 3: 2.4}


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    rf.check_output_dir(str(out), overwrite=False, resume=None)  # absent: fine
    out.mkdir()
    (out / "training_samples_preview.txt").write_text("x")
    rf.check_output_dir(str(out), overwrite=False, resume=None)  # only a preview: nothing to lose
    (out / "checkpoint-2").mkdir()
    with pytest.raises(tr.UsageError, match="unfinished run"):
        rf.check_output_dir(str(out), overwrite=False, resume=None)
    rf.check_output_dir(str(out), overwrite=False, resume="latest")
    (out / "training_config.json").write_text("{}")
    with pytest.raises(tr.UsageError, match="finished run"):
        rf.check_output_dir(str(out), overwrite=False, resume=None)
    rf.check_output_dir(str(out), overwrite=True, resume=None)
    with pytest.raises(tr.UsageError, match="no checkpoint"):
        rf.check_output_dir(str(tmp_path / "empty"), overwrite=False, resume="latest")
    with pytest.raises(tr.UsageError, match="no such checkpoint"):
        rf.check_output_dir(str(out), overwrite=False, resume=str(out / "checkpoint-99"))


def test_overwrite_removes_only_run_files(tmp_path):
    for name in ("training_config.json", "pytorch_model.bin", "loss_curve.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "my-checkpoint-notes").mkdir()
    (tmp_path / "README.md").write_text("my own notes")
    removed = rf.remove_previous_run(str(tmp_path))
    assert removed == ["checkpoint-7", "loss_curve.png", "pytorch_model.bin", "training_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["README.md", "my-checkpoint-notes", "notes.txt"]


def test_overwrite_of_a_lora_run_removes_peft_model_card_too(tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "merged").mkdir()
    removed = rf.remove_previous_run(str(tmp_path))
    assert removed == ["README.md", "adapter_config.json", "adapter_model.safetensors", "merged"]
    assert os.listdir(tmp_path) == ["notes.txt"]


# --------------------------------------------------------------------------------------------------------------
# Preview-only runs (in process: no model load)
# --------------------------------------------------------------------------------------------------------------
def preview(tmp_path: Path, tiny_model: str, *flags: str) -> tuple[str, list[dict]]:
    out = tmp_path / ("preview" + "".join(flags).replace("-", "_"))
    code = tr.main(["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                    "--report_to", "none", "--preview_only", *flags])
    assert code == 0
    assert not (out / "training_config.json").exists()  # a preview is not a finished run
    text = (out / "training_samples_preview.txt").read_text(encoding="utf-8")
    return text, json.loads((out / "test_samples.json").read_text(encoding="utf-8"))


def test_ablations_change_exactly_their_part_of_the_preview(tmp_path, tiny_model):
    full, full_test = preview(tmp_path, tiny_model)
    no_profile, no_profile_test = preview(tmp_path, tiny_model, "--no_profile")
    no_history, no_history_test = preview(tmp_path, tiny_model, "--no_history")
    baseline, baseline_test = preview(tmp_path, tiny_model, "--no_profile", "--no_history")

    assert "用户: Y\n" in full and "历史影评记录 (1条):" in full
    assert "用户: Y\n" not in no_profile and "历史影评记录 (1条):" in no_profile
    assert "用户: Y\n" in no_history and "历史影评记录" not in no_history
    assert "用户: Y\n" not in baseline and "历史影评记录" not in baseline
    for ablated in (no_profile_test, no_history_test, baseline_test):
        assert [s["reference"] for s in ablated] == [s["reference"] for s in full_test]
    assert all(s["prompt"].startswith("用户: Y\n任务: ") for s in full_test)
    assert all(s["prompt"].startswith("任务: ") and "历史影评记录 (" in s["prompt"] for s in no_profile_test)
    assert all(s["prompt"] == "用户: Y\n任务: 基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式\n\n"
               f"请为电影《{s['movie']}》写一条影评：\n" for s in no_history_test)
    assert all(s["prompt"] == "任务: 基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式\n\n"
               f"请为电影《{s['movie']}》写一条影评：\n" for s in baseline_test)


def test_small_data_warns_when_warmup_outlasts_training(tmp_path, tiny_model, caplog):
    caplog.set_level("WARNING", logger="movie_review")
    preview(tmp_path, tiny_model)  # defaults: 19 samples, 2 x 8 per step -> 2 steps/epoch, 100 steps in 50 epochs
    assert "--warmup_steps 100 >= the 100 optimizer steps of the whole run (2 per epoch)" in caplog.text
    assert "Consider --warmup_steps 10" in caplog.text


@pytest.mark.slow
def test_overwrite_output_dir_clears_previous_run(tmp_path, tiny_model):
    out = tmp_path / "old"
    out.mkdir()
    (out / "training_config.json").write_text("{}")
    (out / "checkpoint-2").mkdir()
    (out / "notes.txt").write_text("mine")
    code = tr.main(["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                    "--report_to", "none", "--preview_only", "--overwrite_output_dir"])
    assert code == 0
    assert sorted(os.listdir(out)) == [".launch.json", "notes.txt", "run_fingerprint.json", "test_histories.json",
                                       "test_samples.json", "training_samples_preview.txt"]
