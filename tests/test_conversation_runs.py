"""Real CPU runs with --prompt_format conversation (tiny model): train, early stopping, resume,
evaluate and generate, and a preview with a chat-template tokenizer."""

from __future__ import annotations

import json
import sys

import pytest

import data_loader_movie_review as dl
from tests.helpers import (
    EXAMPLE,
    REPO,
    clean_env,
    one_line_error,
    read_config,
    run_train,
    write_drift_reviews,
    write_reviews,
)


# --------------------------------------------------------------------------------------------------------------
# Real runs (CPU, tiny model): train, early-stop, resume, evaluate, generate
# --------------------------------------------------------------------------------------------------------------
def run_script(script: str, *args: str):
    import subprocess

    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, timeout=300,
                          env=clean_env(), cwd=str(REPO), stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_conversation_run_learns_and_is_evaluated_and_generates(tmp_path, tiny_model):
    data = write_reviews(tmp_path / "toy.json", ["好看好看好看"] * 40)
    out = tmp_path / "run"
    proc = run_train("--data_file", data, "--output_dir", str(out), "--model_path", tiny_model,
                     "--prompt_format", "conversation", "--max_length", "400", "--max_epochs", "8",
                     "--batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3",
                     "--warmup_steps", "0", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "format      conversation; chat template built-in ChatML" in proc.stderr
    assert "reviews per optimizer step" in proc.stderr
    config = read_config(out)
    resolved, result = config["resolved"], config["result"]
    assert (resolved["prompt_format"], resolved["chat_template"]) == ("conversation", "built-in ChatML")
    epoch = resolved["epoch"]
    assert epoch["train_reviews"] == 28 and 1 < epoch["train_sequences"] < 28
    assert epoch["optimizer_steps_per_epoch"] == resolved["optimizer_steps_per_epoch"] == epoch["train_sequences"]
    assert result["global_steps"] == 8 * epoch["train_sequences"]
    losses = result["eval_loss_per_epoch"]
    assert losses["8"] < 0.5 * losses["1"], losses
    preview = (out / "training_samples_preview.txt").read_text(encoding="utf-8")
    assert "训练序列 1/" in preview and f"{dl.LOSS_OPEN}好看好看好看<|endoftext|>{dl.LOSS_CLOSE}" in preview
    assert "请为电影《电影0》写一条影评：" in preview and f"{dl.LOSS_OPEN}<|im_start|>" not in preview
    saved = json.loads((out / "test_samples.json").read_text(encoding="utf-8"))
    assert len(saved) == 6 and all(s["prompt"].endswith("<|im_start|>assistant\n") for s in saved)

    proc = run_script("evaluate_movie_review.py", "--model_dir", str(out), "--max_new_tokens", "8", "--no_progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["generation"]["prompt_format"] == "conversation"
    assert metrics["generation"]["generation_config"]["eos_token_id"] == [0]  # EOS ends the turn (no ChatML)

    proc = run_script("generate_review.py", "--model_dir", str(out), "--movie", "新片", "--greedy",
                      "--max_new_tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.splitlines()[0])
    assert line["settings"]["prompt_format"] == "conversation"
    assert line["prompt"].endswith("<|im_start|>user\n请为电影《新片》写一条影评：<|im_end|>\n<|im_start|>assistant\n")
    assert 0 < line["history_count"] <= 40 and line["prompt_tokens"] + 8 <= 400


@pytest.mark.slow
def test_conversation_run_early_stops_and_resumes(tmp_path, tiny_model):
    data = write_drift_reviews(tmp_path)
    common = ["--data_file", data, "--model_path", tiny_model, "--prompt_format", "conversation",
              "--max_length", "300", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--warmup_steps", "0",
              "--report_to", "none", "--save_format", "safetensors"]
    out = tmp_path / "stop"
    proc = run_train(*common, "--output_dir", str(out), "--max_epochs", "20", "--learning_rate", "1e-2",
                     "--early_stopping_patience", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_config(out)["result"]
    assert result["stopped_early"] is True and result["epochs_run"] == result["best_epoch"] + 2

    out = tmp_path / "resume"
    first = run_train(*common, "--output_dir", str(out), "--max_epochs", "2", "--learning_rate", "1e-3")
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_config(out)
    second = run_train(*common, "--output_dir", str(out), "--max_epochs", "3", "--learning_rate", "1e-3",
                       "--resume_from_checkpoint")
    assert second.returncode == 0, second.stderr[-3000:]
    after = read_config(out)
    steps = before["resolved"]["optimizer_steps_per_epoch"]
    assert after["result"]["global_steps"] == 3 * steps
    assert after["result"]["train_loss_per_epoch"]["2"] == before["result"]["train_loss_per_epoch"]["2"]


@pytest.mark.slow
def test_template_tokenizer_preview_and_too_small_budget(tmp_path, qwen_tokenizer):
    from review_lm.testing.tiny_model import make_tiny_model

    model = make_tiny_model(str(tmp_path / "qwen"), "qwen", hidden_size=16, num_layers=1, num_heads=2)
    out = tmp_path / "run"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", model, "--prompt_format",
                     "conversation", "--max_length", "600", "--preview_only", "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat template tokenizer (chat template of" in proc.stderr
    saved = json.loads((out / "test_samples.json").read_text(encoding="utf-8"))
    for s in saved:  # the prompt is the generation prompt the model sees, ids as evaluation feeds them
        assert s["prompt_tokens"] == len(qwen_tokenizer(s["prompt"], add_special_tokens=False)["input_ids"])
        assert s["prompt"].startswith("<|im_start|>system\n用户: Y\n") and s["prompt_tokens"] <= 600
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(tmp_path / "small"), "--model_path", model,
                     "--prompt_format", "conversation", "--max_length", "20", "--preview_only", "--report_to", "none")
    assert "--max_length 20" in one_line_error(proc)
    assert not (tmp_path / "small").exists()
