"""Tests for adapters.py (LoRA / QLoRA through peft) and its use by the training script.

Decisions are tested branch by branch as pure functions; LoRA itself is tested end to end on the tiny CPU model
(one early-stopping run with --merge_lora shared by several tests, one resume run, one evaluation).
QLoRA needs a CUDA GPU and bitsandbytes, neither of which is here: only its decisions and configuration are tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_distributed_MovieReview as tr
from review_lm.runs import checkpoints
from review_lm.training import adapters, model_setup
from review_lm.training import plan as rp
from tests.helpers import (
    EXAMPLE,
    REPO,
    clean_env,
    one_line_error,
    read_config,
    run_plan,
    run_train,
    write_drift_reviews,
)

BASE = ["--data_file", "d.json", "--output_dir", "out"]


def args_for(*flags: str):
    return tr.parse_args([*BASE, *flags])


# --------------------------------------------------------------------------------------------------------------
# Flags and decisions
# --------------------------------------------------------------------------------------------------------------
def test_defaults_keep_full_fine_tuning():
    args = args_for()
    assert (args.finetuning_type, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target,
            args.merge_lora, args.quantization_bit) == ("full", 8, 16, 0.05, None, False, None)
    adapters.check_flags(args)  # the spec's defaults are a valid combination


@pytest.mark.parametrize(("flags", "message"), [
    (["--quantization_bit", "4"], "add --finetuning_type lora"),
    (["--merge_lora"], "--merge_lora merges LoRA adapters"),
    (["--lora_rank", "16"], "--lora_rank: only used with --finetuning_type lora"),
    (["--lora_alpha", "32", "--lora_target", "q_proj"], "--lora_alpha, --lora_target: only used with"),
    (["--lora_dropout", "0.1"], "--lora_dropout: only used with"),
    (["--finetuning_type", "lora", "--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
    (["--finetuning_type", "lora", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--finetuning_type", "lora", "--lora_target", " , "], "no module names given"),
])
def test_contradicting_adapter_flags_are_refused(flags, message):
    with pytest.raises(tr.UsageError, match=re.escape(message)):
        adapters.check_flags(args_for(*flags))


def test_help_lists_the_adapter_and_sharding_flags(capsys):
    with pytest.raises(SystemExit):
        tr.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--finetuning_type", "--lora_rank", "--lora_alpha", "--lora_dropout", "--lora_target",
                 "--merge_lora", "--quantization_bit", "--fsdp", "--deepspeed"):
        assert flag in text


def test_lora_flags_are_accepted_with_lora():
    adapters.check_flags(args_for("--finetuning_type", "lora", "--lora_rank", "4", "--lora_alpha", "8",
                                  "--lora_dropout", "0", "--lora_target", "q_proj,v_proj", "--merge_lora"))
    assert adapters.parse_targets("q_proj, v_proj,") == ["q_proj", "v_proj"]
    assert adapters.parse_targets("all") is None and adapters.parse_targets(None) is None


@pytest.mark.parametrize(("cuda", "bnb", "message"), [
    (False, True, "needs a CUDA GPU"),
    (True, False, "needs the bitsandbytes package"),
])
def test_quantization_refusals_each_branch(cuda, bnb, message):
    with pytest.raises(tr.UsageError, match=re.escape(message)):
        adapters.plan_quantization(4, cuda_available=cuda, bnb_importable=bnb)


def test_quantization_plan_where_qlora_can_run():
    assert adapters.plan_quantization(None, False, False) is None  # no flag: nothing to decide
    plan = adapters.plan_quantization(4, cuda_available=True, bnb_importable=True)
    assert plan.bnb_kwargs("bfloat16") == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                           "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    # The compute dtype is the precision plan's: bf16 on a bf16 GPU, fp16 on an older one.
    assert rp.plan_runtime(False, True, True, (8, 0), False, finetuning_type="lora",
                           quantization_bit=4).precision.torch_compute_dtype == "bfloat16"
    assert rp.plan_runtime(False, True, False, (7, 5), False, finetuning_type="lora",
                           quantization_bit=4).precision.torch_compute_dtype == "float16"


def test_quantization_config_reaches_from_pretrained(monkeypatch):
    """QLoRA's BitsAndBytesConfig and per-rank device map are what the model is loaded with."""
    import torch
    from transformers import AutoModelForCausalLM

    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kwargs: seen.update(kwargs) or "model")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(adapters, "wrap_model", lambda model, args, base, quantized, gradient_checkpointing:
                        (model, base, quantized))
    plan = run_plan(rp.plan_runtime(False, True, True, (8, 0), False), adapters.plan_quantization(4, True, True))
    args = args_for("--finetuning_type", "lora", "--quantization_bit", "4")
    assert model_setup.load_training_model(args, "Qwen/Qwen2.5-3B", False, plan) == ("model", "Qwen/Qwen2.5-3B", True)
    config = seen["quantization_config"]
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["device_map"] == {"": 1}
    assert adapters.quantization_load_kwargs(None, "bfloat16", 0) == {}


def test_bitsandbytes_is_an_optional_import():
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    assert adapters.bitsandbytes_importable() is False
    assert "bitsandbytes" not in sys.modules  # importing the script and adapters never pulls it in


def test_resume_must_match_the_checkpoint_kind(tmp_path):
    lora_ckpt = tmp_path / "checkpoint-2"
    lora_ckpt.mkdir()
    (lora_ckpt / "adapter_config.json").write_text("{}")
    full_ckpt = tmp_path / "checkpoint-10"
    full_ckpt.mkdir()
    (full_ckpt / "model.safetensors").write_text("x")
    assert checkpoints.checkpoint_kind(str(lora_ckpt)) == "lora"
    assert checkpoints.checkpoint_kind(str(full_ckpt)) == "full"
    assert checkpoints.checkpoint_kind(str(tmp_path / "nope")) is None
    with pytest.raises(tr.UsageError, match="holds a full fine-tuning checkpoint"):
        checkpoints.check_resume(str(full_ckpt), "lora")
    with pytest.raises(tr.UsageError,
                       match="holds a lora fine-tuning checkpoint; resume it with --finetuning_type lora"):
        checkpoints.check_resume(str(lora_ckpt), "full")
    checkpoints.check_resume(str(lora_ckpt), "lora")
    checkpoints.check_resume(None, "full")


def test_base_model_is_recorded_as_given_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    assert adapters.base_model_reference("./models/qwen", "./models/qwen") == str(tmp_path / "models" / "qwen")
    assert adapters.base_model_reference("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B") == "Qwen/Qwen2.5-3B"


# --------------------------------------------------------------------------------------------------------------
# Targets and wrapping on real (tiny) models
# --------------------------------------------------------------------------------------------------------------
def tiny_opt():
    from transformers import AutoModelForCausalLM, OPTConfig

    return AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                      ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))


def test_default_targets_are_the_decoder_block_linears_of_each_architecture(tiny_model):
    from transformers import AutoModelForCausalLM

    qwen = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert adapters.decoder_layer_classes(qwen) == {"Qwen2DecoderLayer"}
    assert adapters.resolve_lora_targets(qwen, None) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                         "up_proj", "v_proj"]
    # Another architecture, other names: derived from the model, not a Qwen list. Never the LM head.
    opt = tiny_opt()
    assert adapters.resolve_lora_targets(opt, "all") == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    # Without _no_split_modules: every linear layer except the LM head.
    opt._no_split_modules = None
    assert "lm_head" not in adapters.resolve_lora_targets(opt, None)


def test_explicit_targets_are_checked_against_the_model(tiny_model):
    from transformers import AutoModelForCausalLM

    qwen = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert adapters.resolve_lora_targets(qwen, "q_proj,v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(tr.UsageError, match=r"no linear layer named qkv, lm_head in this model \(it has: down_proj"):
        adapters.resolve_lora_targets(qwen, "q_proj,qkv,lm_head")


def test_wrap_model_trains_only_the_adapters_and_records_the_base(tiny_model):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    full_counts = adapters.parameter_counts(base)
    assert full_counts[0] == full_counts[1] > 0
    args = args_for("--finetuning_type", "lora", "--lora_rank", "4", "--lora_target", "q_proj,v_proj")
    model = adapters.wrap_model(base, args, "/models/base", quantized=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj"}
    n_trainable, total = adapters.parameter_counts(model)
    # rank 4 on q (64->64) and v (64->32) in 2 layers: 2 * (4*(64+64) + 4*(64+32))
    assert n_trainable == 2 * (4 * 128 + 4 * 96)
    assert total == full_counts[1] + n_trainable
    assert model.peft_config["default"].base_model_name_or_path == "/models/base"
    assert adapters.wrap_model("as loaded", args_for(), "x", False) == "as loaded"  # full: untouched


def test_plain_lora_with_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_model):
    """Frozen embeddings give checkpointed blocks inputs without grad: the adapters must still get gradients,
    equal to those without checkpointing (the same update)."""
    import torch
    from transformers import AutoModelForCausalLM

    args = args_for("--finetuning_type", "lora", "--lora_rank", "4", "--gradient_checkpointing")
    ids = torch.arange(3, 40).unsqueeze(0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = adapters.wrap_model(AutoModelForCausalLM.from_pretrained(tiny_model), args, "base", quantized=False,
                                    gradient_checkpointing=checkpointing)
        for name, p in model.named_parameters():  # lora_B starts at zero: move it so lora_A gets gradients too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Bad flags through the script: one line, nothing written
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--quantization_bit", "4"], "add --finetuning_type lora"),
    (["--finetuning_type", "lora", "--quantization_bit", "4"], "needs a CUDA GPU"),
    (["--lora_rank", "4"], "only used with --finetuning_type lora"),
    (["--finetuning_type", "lora", "--lora_target", "nope_proj"], "no linear layer named nope_proj"),
])
def test_bad_adapter_flags_are_one_line_and_write_nothing(tmp_path, capsys, tiny_model, flags, message):
    out = tmp_path / "run"
    code = tr.main(["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                    "--report_to", "none", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_qlora_without_a_gpu_is_one_line_from_the_command_line(tmp_path, tiny_model):
    import torch

    if torch.cuda.is_available() and adapters.bitsandbytes_importable():
        pytest.skip("QLoRA can run here")
    out = tmp_path / "run"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--finetuning_type", "lora", "--quantization_bit", "4", "--report_to", "none")
    line = one_line_error(proc)  # exit 2, one line, no traceback
    assert "--quantization_bit 4 needs a CUDA GPU" in line or "needs the bitsandbytes package" in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# LoRA end to end
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model) -> Path:
    """Train one phrase, validate on another (validation loss turns up soon), merge the adapter at the end."""
    tmp = tmp_path_factory.mktemp("lora")
    data = write_drift_reviews(tmp)
    out = tmp / "run"
    proc = run_train("--data_file", data, "--output_dir", str(out), "--model_path", tiny_model, "--no_history",
                     "--max_epochs", "20", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                     "--learning_rate", "3e-2", "--warmup_steps", "0", "--early_stopping_patience", "2",
                     "--report_to", "none", "--finetuning_type", "lora", "--lora_rank", "4", "--merge_lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetuning  lora: " in proc.stderr and "parameters trainable" in proc.stderr
    return out


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_run_writes_an_adapter_folder(lora_run, tiny_model):
    names = set(os.listdir(lora_run))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training_config.json", "test_samples.json", "loss_curve.png"} <= names
    assert not names & {"pytorch_model.bin", "model.safetensors"}  # no copy of the frozen base
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_model)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 16, "LORA")
    resolved = read_config(lora_run)["resolved"]
    assert resolved["finetuning_type"] == "lora" and resolved["quantization"] is None
    assert 0 < resolved["trainable_params"] < 0.2 * resolved["total_params"]
    assert resolved["lora_target"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.slow
def test_lora_early_stopping_saves_the_best_adapter(lora_run):
    result = read_config(lora_run)["result"]
    assert result["stopped_early"] is True
    assert result["epochs_run"] == result["best_epoch"] + 2  # patience 2
    saved = adapter_weights(lora_run)
    assert same(saved, adapter_weights(Path(result["best_checkpoint"])))
    last = sorted(lora_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert last != Path(result["best_checkpoint"])
    # The adapter did move after the best epoch: the check means something.
    assert not same(saved, adapter_weights(last))


@pytest.mark.slow
def test_merged_model_loads_plainly_and_matches_base_plus_adapter(lora_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = lora_run / "merged"
    assert {"config.json", "pytorch_model.bin", "tokenizer.json"} <= set(os.listdir(merged_dir))
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert merged.config.use_cache is True
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tokenizer("用户: toy\n请为电影《电影1》写一条影评：\n", return_tensors="pt").input_ids
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(lora_run)).eval()
        adapter_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
        # transformers' own peft integration: the adapter folder loads base + adapter in one call.
        auto_logits = AutoModelForCausalLM.from_pretrained(str(lora_run)).eval()(ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(auto_logits, adapter_logits, atol=1e-5, rtol=1e-4)


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, timeout=300,
                          env=clean_env(), cwd=str(REPO), stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_evaluation_and_generation_read_the_adapter_folder_like_the_merged_one(lora_run, tmp_path):
    """The run folder itself (base + adapter through peft) and merged/ (plain weights) give the same predictions."""
    predictions = {}
    for name, model_dir in (("adapter", lora_run), ("merged", lora_run / "merged")):
        out = tmp_path / name
        proc = run_script("evaluate_movie_review.py", "--model_dir", str(model_dir), "--test_file",
                          str(lora_run / "test_samples.json"), "--output_dir", str(out), "--max_new_tokens", "8",
                          "--device", "cpu", "--no_progress")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("LoRA adapter" in proc.stderr) == (name == "adapter"), proc.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        predictions[name] = [row["prediction"] for row in rows]
    assert len(predictions["adapter"]) == 5
    assert predictions["adapter"] == predictions["merged"]

    proc = run_script("generate_review.py", "--model_dir", str(lora_run), "--movie", "流浪地球", "--greedy",
                      "--max_new_tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["movie"] == "流浪地球" and record["prompt"].endswith("请为电影《流浪地球》写一条影评：\n")


@pytest.mark.slow
def test_lora_resume_continues_from_the_latest_adapter_checkpoint(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    common = ["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model, "--warmup_steps", "0",
              "--learning_rate", "1e-2", "--report_to", "none", "--finetuning_type", "lora",
              "--save_format", "safetensors"]
    first = run_train(*common, "--max_epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_config(out)["result"]
    # The checkpoint holds an adapter: resuming it as a full fine-tune is refused before anything loads.
    as_full = [a for a in common if a not in ("--finetuning_type", "lora")]
    assert tr.main([*as_full, "--max_epochs", "2", "--resume_from_checkpoint"]) == 2
    assert "resume it with --finetuning_type lora" in capsys.readouterr().err
    second = run_train(*common, "--max_epochs", "2", "--resume_from_checkpoint")
    assert second.returncode == 0, second.stderr[-3000:]
    after = read_config(out)["result"]
    assert after["global_steps"] == 4 and sorted(after["train_loss_per_epoch"]) == ["1", "2"]
    assert after["train_loss_per_epoch"]["1"] == before["train_loss_per_epoch"]["1"]  # restored, not retrained
    assert after["eval_loss_per_epoch"]["1"] == before["eval_loss_per_epoch"]["1"]
    assert same(adapter_weights(out), adapter_weights(Path(after["best_checkpoint"])))


@pytest.mark.parametrize(("precision", "compute"), [("auto", "bfloat16"), ("fp16-mixed", "float16")])
def test_qlora_computes_in_the_runs_half_precision(monkeypatch, precision, compute):
    """On a bf16 GPU, --precision fp16-mixed must not leave bitsandbytes computing in bf16 (and auto stays bf16)."""
    args = tr.parse_args(["--data_file", "d.json", "--output_dir", "out", "--finetuning_type", "lora",
                          "--quantization_bit", "4", "--precision", precision])
    bf16_gpu = rp.Hardware(cuda=True, bf16=True, compute_capability=(8, 0), bitsandbytes=True)
    plan = rp.plan_hardware(args, bf16_gpu, world_size=1)
    assert plan.quantization.bnb_kwargs(plan.precision.torch_compute_dtype)["bnb_4bit_compute_dtype"] == compute
