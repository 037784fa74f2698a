"""Real CPU training runs of train_distributed_MovieReview.py, and how a run's epochs and losses are
summarised.

Training runs use a tiny random Qwen2 model with a small byte-level BPE tokenizer (built once per
module) and run the script as a user would, in a subprocess (torchrun for DDP).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import data_loader_movie_review as dl
import train_distributed_MovieReview as tr
from review_lm.runs import test_set
from review_lm.training import report as run_report
from tests.eager_encoder import SampleTokenizer
from tests.helpers import (
    EXAMPLE,
    assert_same_weights,
    clean_env,
    one_line_error,
    read_config,
    run_train,
    state_dict,
    write_drift_reviews,
    write_reviews,
)


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
    digests = {s.pop(test_set.RUN_DIGEST_KEY) for s in saved}  # the run's digest, in every sample (issue 26)
    histories = json.loads((example_run / "test_histories.json").read_text(encoding="utf-8"))
    assert digests == {histories[test_set.RUN_DIGEST_KEY]} and all(digests)
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
