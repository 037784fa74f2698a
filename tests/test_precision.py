"""Tests for precision.py: the decision per branch, the "do small updates survive" probes, and real CPU runs.

The probes use the plan's own pieces (weights dtype, autocast, optimizer) on a random Qwen2 with the standard 0.02
initialisation, at the spec's learning rate 1e-5: the regime where bf16 weights lose AdamW updates.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from review_lm.training import plan as rp
from review_lm.training import precision as pr
from review_lm.utils import UsageError
from tests.helpers import (
    EXAMPLE,
    REPO,
    assert_same_weights,
    clean_env,
    read_config,
    run_train,
    state_dict,
    write_drift_reviews,
)

LR = 1e-5


# --------------------------------------------------------------------------------------------------------------
# The decision, branch by branch
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("requested", "cuda", "bf16", "finetuning", "mode", "weights", "autocast", "optimizer"),
    [
        ("auto", True, True, "full", "bf16-mixed", "float32", "bf16", pr.ADAMW_TORCH),
        ("auto", True, True, "lora", "bf16-mixed", "bfloat16", "bf16", pr.ADAMW_TORCH),
        ("auto", True, False, "full", "fp16-mixed", "float32", "fp16", pr.ADAMW_TORCH),
        ("auto", True, False, "lora", "fp16-mixed", "float16", "fp16", pr.ADAMW_TORCH),
        ("auto", False, False, "full", "fp32", "float32", None, pr.ADAMW_TORCH),
        ("auto", False, False, "lora", "fp32", "float32", None, pr.ADAMW_TORCH),
        ("bf16-mixed", True, True, "full", "bf16-mixed", "float32", "bf16", pr.ADAMW_TORCH),
        ("bf16-mixed", False, False, "full", "bf16-mixed", "float32", "bf16", pr.ADAMW_TORCH),  # CPU bf16
        ("bf16-pure", True, True, "full", "bf16-pure", "bfloat16", "bf16", pr.ADAMW_KAHAN),
        ("bf16-pure", False, False, "full", "bf16-pure", "bfloat16", "bf16", pr.ADAMW_KAHAN),
        ("fp16-mixed", True, True, "full", "fp16-mixed", "float32", "fp16", pr.ADAMW_TORCH),
        ("fp32", True, True, "full", "fp32", "float32", None, pr.ADAMW_TORCH),
        ("fp32", True, True, "lora", "fp32", "float32", None, pr.ADAMW_TORCH),
    ],
)
def test_plan_each_branch(requested, cuda, bf16, finetuning, mode, weights, autocast, optimizer):
    plan = pr.plan_precision(requested, cuda, bf16, finetuning)
    assert (plan.mode, plan.weights_dtype, plan.autocast, plan.optimizer) == (mode, weights, autocast, optimizer)
    assert plan.training_kwargs() == {"bf16": autocast == "bf16", "fp16": autocast == "fp16"}
    assert plan.reason and plan.optimizer_reason


def test_mixed_precision_computes_in_half_precision_for_flash_attention():
    assert pr.plan_precision("auto", True, True).compute_dtype == "bf16"  # fp32 weights, bf16 maths
    assert pr.plan_precision("fp16-mixed", True, True).compute_dtype == "fp16"
    assert pr.plan_precision("fp32", True, True).compute_dtype == "fp32"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requested": "bf16-mixed", "cuda_available": True, "bf16_supported": False}, "does not support bf16"),
        ({"requested": "bf16-pure", "cuda_available": True, "bf16_supported": False}, "does not support bf16"),
        ({"requested": "fp16-mixed", "cuda_available": False, "bf16_supported": False}, "needs a CUDA GPU"),
        ({"requested": "bf16-pure", "cuda_available": True, "bf16_supported": True, "finetuning_type": "lora"},
         "for full fine-tuning"),
        ({"requested": "bf16-pure", "cuda_available": True, "bf16_supported": True, "optimi_available": False},
         "pip install torch-optimi"),
        ({"requested": "fp32", "cuda_available": True, "bf16_supported": True, "finetuning_type": "lora",
          "quantization_bit": 4}, "--quantization_bit 4"),
        ({"requested": "bf16-pure", "cuda_available": True, "bf16_supported": True, "deepspeed": True},
         "DeepSpeed's bf16 mode"),
    ],
)
def test_impossible_combinations_are_one_line_errors(kwargs, message):
    with pytest.raises(UsageError) as err:
        pr.plan_precision(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_only_bf16_pure_brings_its_own_optimizer():
    import optimi

    cls, kwargs = pr.plan_precision("bf16-pure", True, True).optimizer_cls_and_kwargs(2e-5)
    assert cls is optimi.AdamW
    assert kwargs == {"lr": 2e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "kahan_sum": True}
    assert pr.plan_precision("bf16-mixed", True, True).optimizer_cls_and_kwargs(2e-5) is None


# --------------------------------------------------------------------------------------------------------------
# Probes: do AdamW updates at lr 1e-5 survive?
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_model():
    """Random Qwen2 (hidden 256, 2 layers, 0.02 init) whose weights are exactly representable in bf16, like a
    released checkpoint stored in bf16 (Qwen2.5's are): every mode starts from the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16).to(torch.float32)


@pytest.fixture(scope="module")
def batches():
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 1000, (2, 64), generator=generator) for _ in range(20)]


def train_steps(model, plan: pr.PrecisionPlan, batches, steps: int):
    """``steps`` optimizer steps the way the plan trains: its weights dtype, autocast and optimizer.

    Plain AdamW is built exactly as Trainer builds it (torch.optim.AdamW, betas 0.9/0.999, eps 1e-8, no decay).
    """
    import torch

    model = copy.deepcopy(model).to(getattr(torch, plan.weights_dtype))
    custom = plan.optimizer_cls_and_kwargs(LR)
    cls, kwargs = custom or (torch.optim.AdamW, {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0})
    optimizer = cls(model.parameters(), **kwargs)
    for batch in batches[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.autocast == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def decoder_weights(model) -> dict:
    return {n: p.detach().float() for n, p in model.named_parameters() if ".layers." in n}


def changed_fraction(before: dict, after: dict) -> float:
    changed = sum((after[n] != before[n]).sum().item() for n in before)
    return changed / sum(v.numel() for v in before.values())


def mean_abs_diff(a: dict, b: dict) -> float:
    return sum((a[n] - b[n]).abs().sum().item() for n in a) / sum(v.numel() for v in a.values())


# What "today's bf16 path" was: bf16 weights, bf16 autocast, Trainer's plain torch AdamW.
PURE_BF16_PLAIN_ADAMW = pr.PrecisionPlan("bf16-pure", "bfloat16", "bf16", pr.ADAMW_TORCH, "old path", "plain AdamW")


@pytest.mark.slow
def test_bf16_mixed_moves_every_weight_where_pure_bf16_adamw_freezes_most(probe_model, batches):
    start = decoder_weights(probe_model)
    mixed, _ = train_steps(probe_model, pr.plan_precision("bf16-mixed", True, True), batches, 3)
    old, _ = train_steps(probe_model, PURE_BF16_PLAIN_ADAMW, batches, 3)
    mixed_changed = changed_fraction(start, decoder_weights(mixed))
    old_changed = changed_fraction(start, decoder_weights(old))
    assert mixed_changed >= 0.99, mixed_changed
    assert old_changed < 0.5, old_changed  # measured ~0.15: most updates round away


@pytest.mark.slow
def test_kahan_bf16_pure_tracks_bf16_mixed_where_plain_adamw_drifts(probe_model, batches):
    import torch

    reference, _ = train_steps(probe_model, pr.plan_precision("bf16-mixed", True, True), batches, 20)
    kahan, optimizer = train_steps(probe_model, pr.plan_precision("bf16-pure", True, True), batches, 20)
    plain, _ = train_steps(probe_model, PURE_BF16_PLAIN_ADAMW, batches, 20)
    ref = decoder_weights(reference)
    # bf16 weights can at best hold the fp32 result rounded to bf16: compare on that grid.
    ref_bf16 = {n: v.to(torch.bfloat16).float() for n, v in ref.items()}
    kahan_w, plain_w = decoder_weights(kahan), decoder_weights(plain)
    assert 2 * mean_abs_diff(kahan_w, ref_bf16) <= mean_abs_diff(plain_w, ref_bf16)
    # What the optimizer tracks (bf16 weight + its Kahan compensation) is close to the fp32 weights themselves.
    names = [n for n, _ in kahan.named_parameters()]
    effective = {n: p.detach().float() + optimizer.state[p]["kahan_comp"].float()
                 for n, p in zip(names, kahan.parameters(), strict=True) if ".layers." in n}
    assert 2 * mean_abs_diff(effective, ref) <= mean_abs_diff(plain_w, ref)


# --------------------------------------------------------------------------------------------------------------
# Real runs on CPU: train, early stop, save, resume, evaluate
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from review_lm.testing.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), tokenizer_kind="bpe", corpus=[EXAMPLE],
                           vocab_size=1000, hidden_size=64, num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "dtype", "optimizer"), [("bf16-mixed", "float32", pr.ADAMW_TORCH),
                                                            ("bf16-pure", "bfloat16", pr.ADAMW_KAHAN)])
def test_precision_run_trains_early_stops_resumes_and_evaluates(tmp_path, tiny_model, mode, dtype, optimizer):
    import torch

    data = write_drift_reviews(tmp_path)
    out = tmp_path / "run"
    common = ["--data_file", data, "--output_dir", str(out), "--model_path", tiny_model, "--no_history",
              "--batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
              "--warmup_steps", "0", "--early_stopping_patience", "2", "--report_to", "none",
              "--save_format", "safetensors", "--precision", mode]
    first = run_train(*common, "--max_epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"precision   {mode}" in first.stderr
    before = read_config(out)["result"]

    resumed = run_train(*common, "--max_epochs", "20", "--resume_from_checkpoint")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    config = read_config(out)
    resolved, result = config["resolved"], config["result"]
    assert (resolved["precision"], resolved["dtype"], resolved["optimizer"]) == (mode, dtype, optimizer)
    for epoch in ("1", "2"):  # restored from the checkpoint, not trained again
        assert result["eval_loss_per_epoch"][epoch] == before["eval_loss_per_epoch"][epoch]
    assert result["stopped_early"] and result["epochs_run"] == result["best_epoch"] + 2

    # The optimizer state was restored on resume: its step count covers the whole run, not the resumed part.
    last = out / f"checkpoint-{result['global_steps']}"
    saved = torch.load(last / "optimizer.pt", weights_only=True)
    steps = saved["param_groups"][0]["step"] if optimizer == pr.ADAMW_KAHAN else saved["state"][0]["step"]
    assert int(steps) == result["global_steps"]
    states = saved["state"][0]
    assert states["exp_avg"].dtype == getattr(torch, dtype)  # fp32 Adam states in mixed, bf16 in pure
    assert ("kahan_comp" in states) == (mode == "bf16-pure")

    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {getattr(torch, dtype)}  # fp32 master weights kept in mixed
    assert_same_weights(state_dict(out), state_dict(Path(result["best_checkpoint"])))

    evaluation = subprocess.run(
        [sys.executable, str(REPO / "evaluate_movie_review.py"), "--model_dir", str(out), "--max_new_tokens", "4",
         "--no_progress"], capture_output=True, text=True, env=clean_env(), cwd=str(REPO), timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_samples"] == 5 and metrics["training_arguments"]["precision"] == mode


@pytest.mark.slow
def test_bf16_on_a_gpu_without_it_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """The decision runs before the tokenizer and the model: a bad --precision never loads either (the data is
    validated first, so a data error answers without torch)."""
    import train_distributed_MovieReview as tr
    from review_lm.training import model_setup

    monkeypatch.setattr(tr, "probe_hardware", lambda args: rp.Hardware(cuda=True, bf16=False,
                                                                      compute_capability=(7, 0)))
    monkeypatch.setattr(model_setup, "load_training_tokenizer",
                        lambda *args: pytest.fail("tokenizer loaded before the precision check"))
    out = tmp_path / "run"
    code = tr.main(["--data_file", EXAMPLE, "--output_dir", str(out), "--precision", "bf16-mixed",
                    "--report_to", "none"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --precision bf16-mixed: this GPU does not support bf16; use --precision fp16-mixed or "
                   "fp32"]
    assert not out.exists()
