"""Tests for train_distributed_MovieReview.py: decisions as pure functions, then real CPU training runs.

Training runs use a tiny random Qwen2 model with a small byte-level BPE tokenizer (built once per module) and
run the script as a user would, in a subprocess (torchrun for DDP).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import data_loader_movie_review as dl
import train_distributed_MovieReview as tr
from review_lm.inference import model_loading as ml
from review_lm.runs import run_folder as rf
from review_lm.training import model_setup, tracking
from review_lm.training import plan as rp
from review_lm.training import report as run_report
from tests.eager_encoder import SampleTokenizer
from tests.helpers import (
    EXAMPLE,
    assert_same_weights,
    clean_env,
    one_line_error,
    read_config,
    run_plan,
    run_train,
    state_dict,
    write_drift_reviews,
    write_reviews,
)


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


# --------------------------------------------------------------------------------------------------------------
# Real training runs
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example_run(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("example") / "run"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--max_epochs", "3", "--warmup_steps", "0", "--learning_rate", "1e-3", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_single_process_run_writes_every_spec_output(example_run):
    names = set(os.listdir(example_run))
    for name in ("pytorch_model.bin", "config.json", "training_config.json", "test_samples.json",
                 "training_samples_preview.txt", "loss_curve.png", "tokenizer.json", "tokenizer_config.json"):
        assert name in names, name
    assert "model.safetensors" not in names  # --save_format bin (default) writes only the spec's .bin
    assert any(n.startswith("checkpoint-") for n in names)
    assert not any(n.endswith(".tmp") for n in names)


@pytest.mark.slow
def test_saved_model_loads_and_is_the_best_checkpoint(example_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(example_run))
    assert model.config.use_cache is True  # Trainer's use_cache=False is not saved
    assert AutoTokenizer.from_pretrained(str(example_run)).eos_token == "<|endoftext|>"
    best = read_config(example_run)["result"]["best_checkpoint"]
    assert_same_weights(model.state_dict(), state_dict(Path(best)))


@pytest.mark.slow
def test_training_config_records_arguments_facts_and_losses(example_run):
    config = read_config(example_run)
    args = config["arguments"]
    assert args["max_epochs"] == 3 and args["learning_rate"] == 1e-3
    assert set(vars(tr.parse_args(["--data_file", "d", "--output_dir", "o"]))) <= set(args)
    resolved = config["resolved"]
    assert (resolved["world_size"], resolved["effective_batch_size"], resolved["attention"]) == (1, 16, "sdpa")
    assert resolved["optimizer_steps_per_epoch"] == 2
    result = config["result"]
    assert sorted(result["eval_loss_per_epoch"]) == ["1", "2", "3"]
    assert sorted(result["train_loss_per_epoch"]) == ["1", "2", "3"]
    assert result["global_steps"] == 6
    assert config["data"]["splits"]["train"]["samples"] == 19
    assert config["data"]["splits"]["test"]["time_range"] == ["2016-12-04", "2017-11-26"]
    assert config["versions"]["transformers"].startswith("5.")


@pytest.mark.slow
def test_test_samples_are_the_five_newest_reviews_as_the_loader_builds_them(example_run):
    from transformers import AutoTokenizer

    saved = json.loads((example_run / "test_samples.json").read_text(encoding="utf-8"))
    data = dl.load_review_file(EXAMPLE)
    splits = dl.split_chronologically(data)
    encoder = SampleTokenizer(AutoTokenizer.from_pretrained(str(example_run)), 4096)
    assert saved == [dl.sample_record(e) for e in encoder.encode_split(splits["test"])]
    assert len(saved) == 5
    assert [s["movie"] for s in saved] == [r.movie for r in data.users[0].reviews[-5:]]


@pytest.mark.slow
def test_preview_shows_first_training_samples_with_token_counts(example_run):
    from transformers import AutoTokenizer

    text = (example_run / "training_samples_preview.txt").read_text(encoding="utf-8")
    data = dl.load_review_file(EXAMPLE)
    first = SampleTokenizer(AutoTokenizer.from_pretrained(str(example_run)), 4096).encode(
        dl.split_chronologically(data)["train"][0])
    assert "训练样本 1/19" in text and "训练样本 3/19" in text and "训练样本 4/19" not in text
    assert first.prompt in text and "boring" in text
    assert f"prompt {first.prompt_length} + target {len(first.input_ids) - first.prompt_length}" in text


@pytest.mark.slow
def test_loss_curve_is_an_image(example_run):
    from PIL import Image

    with Image.open(example_run / "loss_curve.png") as image:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 200


@pytest.mark.slow
def test_finished_run_is_not_overwritten(example_run, tiny_model):
    marker = example_run / "training_config.json"
    before = marker.stat().st_mtime_ns
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(example_run), "--model_path", tiny_model,
                     "--report_to", "none")
    assert "already holds a finished run" in one_line_error(proc)
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_training_lowers_the_loss_on_a_learnable_set(tmp_path, tiny_model):
    data = write_reviews(tmp_path / "toy.json", ["好看好看好看"] * 30)
    out = tmp_path / "run"
    proc = run_train("--data_file", data, "--output_dir", str(out), "--model_path", tiny_model, "--no_history",
                     "--max_epochs", "6", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                     "--learning_rate", "5e-3", "--warmup_steps", "0", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = read_config(out)["result"]["eval_loss_per_epoch"]
    assert losses["6"] < 0.5 * losses["1"], losses


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best_model(tmp_path, tiny_model):
    data = write_drift_reviews(tmp_path)
    out = tmp_path / "run"
    proc = run_train("--data_file", data, "--output_dir", str(out), "--model_path", tiny_model, "--no_history",
                     "--max_epochs", "20", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                     "--learning_rate", "1e-2", "--warmup_steps", "0", "--early_stopping_patience", "2",
                     "--report_to", "none", "--save_format", "safetensors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_config(out)["result"]
    assert result["stopped_early"] is True
    assert result["epochs_run"] < 20
    assert result["epochs_run"] == result["best_epoch"] + 2  # patience 2
    losses = result["eval_loss_per_epoch"]
    assert result["best_eval_loss"] == min(losses.values())
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    assert_same_weights(state_dict(out), state_dict(Path(result["best_checkpoint"])))


@pytest.mark.slow
def test_empty_validation_split_trains_every_epoch_without_early_stopping(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--train_ratio", "0.85", "--val_ratio", "0", "--test_ratio", "0.15", "--max_epochs", "2",
                     "--warmup_steps", "0", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the validation split is empty" in proc.stderr
    result = read_config(out)["result"]
    assert (result["epochs_run"], result["stopped_early"], result["best_epoch"]) == (2, False, None)
    assert result["eval_loss_per_epoch"] == {}
    # No validation: the final model is the last epoch's (23 samples, 12 micro-batches -> 2 steps/epoch).
    assert result["global_steps"] == 4
    assert_same_weights(state_dict(out), state_dict(out / "checkpoint-4"))


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(tmp_path, tiny_model):
    out = tmp_path / "run"
    common = ["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model, "--warmup_steps", "0",
              "--learning_rate", "1e-3", "--report_to", "none"]
    first = run_train(*common, "--max_epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_config(out)["result"]
    second = run_train(*common, "--max_epochs", "4", "--resume_from_checkpoint")
    assert second.returncode == 0, second.stderr[-3000:]
    after = read_config(out)["result"]
    assert after["global_steps"] == 8 and sorted(after["train_loss_per_epoch"]) == ["1", "2", "3", "4"]
    # Epochs 1-2 come from the restored trainer state, not from training again.
    for epoch in ("1", "2"):
        assert after["train_loss_per_epoch"][epoch] == before["train_loss_per_epoch"][epoch]
        assert after["eval_loss_per_epoch"][epoch] == before["eval_loss_per_epoch"][epoch]


@pytest.mark.slow
def test_unfinished_run_needs_resume_or_overwrite(tmp_path, tiny_model):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model)
    assert "--resume_from_checkpoint" in one_line_error(proc)
    assert os.listdir(out) == ["checkpoint-3"]


@pytest.mark.slow
def test_torchrun_two_processes_train_in_step(tmp_path, tiny_model):
    out = tmp_path / "ddp"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--max_epochs", "2", "--warmup_steps", "0", "--learning_rate", "1e-3", "--report_to", "none",
                     torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_config(out)
    assert config["resolved"]["world_size"] == 2
    assert config["resolved"]["effective_batch_size"] == 2 * 8 * 2
    # 19 samples over 2 ranks: 5 micro-batches each -> 1 optimizer step per epoch (2 on one process).
    assert config["result"]["global_steps"] == 2
    assert sorted(config["result"]["eval_loss_per_epoch"]) == ["1", "2"]
    assert proc.stderr.count("training setup") == 1  # only rank 0 prints the summary
    assert "world size 2" in proc.stderr


@pytest.mark.slow
def test_wandb_offline_fallback_never_blocks_and_keeps_secrets_out(tmp_path, tiny_model):
    out = tmp_path / "run"
    env = clean_env(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), HF_TOKEN="hf_SECRET_token_123")
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--max_epochs", "1", "--warmup_steps", "0", "--wandb_project", "ProjFromFlag",
                     "--wandb_run_name", "RunFromFlag", env=env, cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging offline" in proc.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # one run, made by rank 0
    record = runs[0].read_bytes()
    assert b"ProjFromFlag" in record and b"RunFromFlag" in record
    assert read_config(out)["resolved"]["report_to"] == "wandb"
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_SECRET_token_123" not in path.read_bytes(), path


@pytest.mark.slow
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, tiny_model):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"user": {"profile": {"name": "Y"}}, "task": {"description": "d", '
                   '"task_behavior_collections": [{"type": "movie_review", "data": '
                   '[{"continuation": "x", "continuation_prefix": "a: ", "timestamp": "2010/08/22"}]}]}}]',
                   encoding="utf-8")
    out = tmp_path / "run"
    line = one_line_error(run_train("--data_file", str(bad), "--output_dir", str(out), "--model_path", tiny_model))
    assert str(bad) in line and "user #0 (Y)" in line and "record #0" in line and "timestamp" in line
    assert not out.exists()


@pytest.mark.slow
def test_missing_model_folder_is_one_line(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(run_train("--data_file", EXAMPLE, "--output_dir", str(out),
                                    "--model_path", str(tmp_path / "no-model")))
    assert "no such local folder" in line
    assert not out.exists()


def test_epochs_run_counts_an_epoch_that_early_stopping_ended_midway():
    from types import SimpleNamespace

    history = [{"loss": 2.0, "epoch": 1.0, "step": 4}, {"eval_loss": 1.5, "epoch": 1.0, "step": 4},
               {"loss": 1.8, "epoch": 1.5, "step": 6}, {"eval_loss": 1.6, "epoch": 1.5, "step": 6}]
    state = SimpleNamespace(log_history=history, epoch=1.5, global_step=6, max_steps=40,
                            best_model_checkpoint="run/checkpoint-4")
    trainer = SimpleNamespace(state=state)
    args = SimpleNamespace(output_dir="/nonexistent/run", eval_steps=2, save_steps=0)
    import unittest.mock

    with unittest.mock.patch.object(run_report, "plot_loss_curve"):
        outcome = run_report.summarize_run(args, trainer, SimpleNamespace(metrics={}), has_val=True)
    assert outcome["epochs_run"] == 2 and outcome["stopped_early"]  # it trained into epoch 2 (was: 1)


def test_epoch_train_loss_is_the_step_weighted_mean_of_its_logged_windows():
    history = [{"loss": 4.0, "epoch": 0.25, "step": 1}, {"loss": 2.0, "epoch": 1.0, "step": 4},
               {"eval_loss": 1.0, "epoch": 1.0, "step": 4}, {"loss": 1.0, "epoch": 2.0, "step": 8}]
    train, evaluation = run_report.epoch_losses(history)
    assert train == {1: pytest.approx((4.0 * 1 + 2.0 * 3) / 4), 2: 1.0} and evaluation == {1: 1.0}
