"""Tests for sharding.py (FSDP, DeepSpeed ZeRO) and its use by the training script.

Neither FSDP nor DeepSpeed runs on this CPU machine (accelerate runs DDP instead of FSDP on CPU; DeepSpeed is not
installed and needs CUDA): their decisions and the configuration they produce are tested, down to the FSDP
auto-wrap policy accelerate builds from it. What does run on CPU is tested for real: a 2-process torchrun LoRA
run, and the whole-weights save that the sharded paths rely on.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import train_distributed_MovieReview as tr
from review_lm.training import sharding
from tests.helpers import EXAMPLE, read_config, run_train

ZERO2 = sharding.SHIPPED_DEEPSPEED_CONFIGS[2]
ZERO3 = sharding.SHIPPED_DEEPSPEED_CONFIGS[3]


def plan(fsdp=False, deepspeed=None, config=None, quantization_bit=None, cuda=True, deepspeed_ok=True):
    return sharding.plan_sharding(fsdp, deepspeed, config, quantization_bit, cuda, deepspeed_ok)


# --------------------------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------------------------
def test_no_sharding_by_default():
    args = tr.parse_args(["--data_file", "d.json", "--output_dir", "out"])
    assert (args.fsdp, args.deepspeed) == (False, None)
    assert plan(cuda=False) == sharding.ShardingPlan("none")
    assert sharding.training_kwargs(sharding.ShardingPlan("none"), set(), False) == {}


@pytest.mark.parametrize(("fsdp", "deepspeed", "quantization_bit", "message"), [
    (True, ZERO3, None, "--fsdp and --deepspeed are two ways of sharding: choose one"),
    (True, None, 4, "cannot be combined with --fsdp"),
    (False, ZERO2, 4, "cannot be combined with --deepspeed"),
])
def test_contradicting_sharding_flags_are_refused(fsdp, deepspeed, quantization_bit, message, tmp_path, capsys):
    with pytest.raises(tr.UsageError, match=re.escape(message)):
        sharding.check_combinations(fsdp, deepspeed, quantization_bit)
    # ... and from the command line, before anything is read or written.
    flags = (["--fsdp"] if fsdp else []) + (["--deepspeed", deepspeed] if deepspeed else [])
    flags += ["--finetuning_type", "lora", "--quantization_bit", "4"] if quantization_bit else []
    out = tmp_path / "out"
    assert tr.main(["--data_file", "missing.json", "--output_dir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fsdp": True, "cuda": False}, "--fsdp needs CUDA GPUs (on CPU accelerate would run plain DDP"),
    ({"deepspeed": ZERO2, "config": {}, "deepspeed_ok": False}, "needs the deepspeed package"),
    ({"deepspeed": ZERO2, "config": {}, "cuda": False}, "--deepspeed needs CUDA GPUs"),
    ({"deepspeed": "ds.json", "config": {"zero_optimization": {"stage": 5}}}, "stage must be 0-3"),
    ({"deepspeed": "ds.json", "config": {"zero_optimization": {"stage": 3}}},
     "stage3_gather_16bit_weights_on_model_save to true"),
])
def test_sharding_refusals_each_branch(kwargs, message):
    with pytest.raises(tr.UsageError, match=re.escape(message)):
        plan(**kwargs)


def test_fsdp_plan_and_its_trainer_configuration(tiny_model):
    """The kwargs reach TrainingArguments and accelerate wraps exactly the model's decoder blocks."""
    from accelerate import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM, TrainingArguments

    fsdp = plan(fsdp=True)
    assert fsdp.kind == "fsdp" and "FSDP full shard" in fsdp.describe()
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = tr.parse_args(["--data_file", "d.json", "--output_dir", "out", "--fsdp"])
    kwargs = sharding.model_training_kwargs(fsdp, model, args.gradient_checkpointing)
    assert kwargs["fsdp"] is True
    assert kwargs["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]  # from the model
    assert sharding.torch_supports_fsdp2() and kwargs["fsdp_config"]["version"] == 2  # torch 2.13: FSDP2
    training_args = TrainingArguments(output_dir="unused", use_cpu=True, **kwargs)
    assert training_args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "Qwen2DecoderLayer", "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": False, "reshard_after_forward": True,
    }
    plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    plugin.set_auto_wrap_policy(model)
    wrapped = [n for n, m in model.named_modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["model.layers.0", "model.layers.1"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # Trainer.save_model gathers whole weights then


def test_fsdp_variants():
    fsdp = sharding.ShardingPlan("fsdp")
    checkpointed = sharding.training_kwargs(fsdp, {"LlamaDecoderLayer"}, gradient_checkpointing=True)
    assert checkpointed["fsdp_config"]["activation_checkpointing"] is True  # FSDP's own, not Trainer's
    assert sharding.fsdp_version(False) == 1 and sharding.fsdp_version(True) == 2
    # The requirement is ours (torch >= 2.6), read from torch's version string, local build labels ignored.
    assert not sharding.torch_supports_fsdp2("2.5.1+cu121") and sharding.torch_supports_fsdp2("2.6.0")
    assert sharding.torch_supports_fsdp2("2.13.0+cpu") and sharding.torch_supports_fsdp2("2.6.0.dev20241201")
    v1 = sharding.training_kwargs(fsdp, {"LlamaDecoderLayer"}, False, version=1)["fsdp_config"]
    assert (v1["version"], v1["reshard_after_forward"]) == (1, "FULL_SHARD")
    with pytest.raises(tr.UsageError, match="no decoder-layer class"):
        sharding.training_kwargs(fsdp, set(), False)


@pytest.mark.parametrize(("path", "stage"), [(ZERO2, 2), (ZERO3, 3)])
def test_shipped_deepspeed_configs(path, stage):
    config = sharding.load_deepspeed_config(path)
    ds = plan(deepspeed=path, config=config)
    assert (ds.kind, ds.zero_stage) == ("deepspeed", stage)
    assert f"ZeRO-{stage}" in ds.describe()
    assert sharding.training_kwargs(ds, set(), False) == {"deepspeed": path}
    # "auto": Trainer fills these from its own flags (batch size, accumulation, clipping, precision).
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert config["zero_optimization"]["reduce_bucket_size"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # Trainer's AdamW + linear schedule
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_config_file_errors(tmp_path):
    with pytest.raises(tr.UsageError, match="no such file"):
        sharding.load_deepspeed_config(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(tr.UsageError, match="not valid JSON"):
        sharding.load_deepspeed_config(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(tr.UsageError, match="expected a JSON object, got list"):
        sharding.load_deepspeed_config(str(bad))


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--fsdp"], "--fsdp needs CUDA GPUs"),
    (["--fsdp", "--deepspeed", ZERO3], "choose one"),
    (["--deepspeed", ZERO3], "needs the deepspeed package"),
    (["--deepspeed", "no-such-ds.json"], "no such file"),
    (["--deepspeed", ZERO2, "--finetuning_type", "lora", "--quantization_bit", "4"], "cannot be combined"),
])
def test_bad_sharding_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = tr.main(["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", str(tmp_path / "no-model"),
                    "--report_to", "none", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# Whole-weights save
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_full_weights_to_bin_rewrites_what_save_pretrained_wrote(tmp_path, tiny_model, shard_size):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() is bool(shard_size)
    path = sharding.full_weights_to_bin(str(tmp_path))
    assert path == str(tmp_path / "pytorch_model.bin")
    assert not any(n.endswith(".safetensors") or n.endswith(".index.json") for n in os.listdir(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).state_dict()
    original = model.state_dict()
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


# --------------------------------------------------------------------------------------------------------------
# torchrun, 2 processes, LoRA
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_train_lora_in_step_and_save_a_loadable_adapter(tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ddp-lora"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--max_epochs", "2", "--warmup_steps", "0", "--learning_rate", "1e-2", "--report_to", "none",
                     "--finetuning_type", "lora", "--merge_lora", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_config(out)
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["finetuning_type"] == "lora"
    assert config["result"]["global_steps"] == 2  # 19 samples, 2 ranks: 1 optimizer step per epoch
    assert proc.stderr.count("training setup") == 1  # only rank 0 prints and writes
    best = Path(config["result"]["best_checkpoint"])
    saved = load_file(str(out / "adapter_model.safetensors"))
    at_best = load_file(str(best / "adapter_model.safetensors"))
    assert saved.keys() == at_best.keys() and all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapter was trained
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
