"""What only a GPU can check: run on the first GPU machine with ``python -m pytest -m gpu`` (skipped elsewhere).

FlashAttention 2's variable-length path on packed rows, a bf16-mixed step that really moves fp32 weights at the
spec's learning rate, a QLoRA step through bitsandbytes, and FSDP across 2 GPUs through the real script.
"""

from __future__ import annotations

import importlib.util

import pytest

from review_lm.training import completion_training as ct
from tests.helpers import EXAMPLE, read_config, run_train

pytestmark = pytest.mark.gpu


def _samples(eos: int, lengths=((20, 6), (9, 4), (30, 8))) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for prompt, target in lengths:
        ids = torch.randint(1, 900, (prompt + target,), generator=gen).tolist()
        ids[-1] = eos
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _model(tokenizer, attention: str, dtype):
    from review_lm.testing.tiny_model import build_tiny_model

    model = build_tiny_model(tokenizer, hidden_size=128, num_layers=2, num_heads=4, max_positions=512, seed=0)
    model.set_attn_implementation(attention)
    return model.to("cuda", dtype)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed")
def test_flash_attention_packed_loss_equals_each_sample_alone(bpe_tokenizer, tmp_path):
    import torch
    from transformers import TrainingArguments

    model = _model(bpe_tokenizer, "flash_attention_2", torch.bfloat16)
    samples = _samples(bpe_tokenizer.eos_token_id)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=True)
    trainer = ct.CompletionTrainer(model=model, args=args)
    collate = ct.make_data_collator(bpe_tokenizer, packing=True)
    with torch.no_grad():
        packed = trainer.compute_loss(model, {k: v.cuda() for k, v in collate(samples).items()},
                                      num_items_in_batch=None)
        alone = [trainer.compute_loss(model, {k: v.cuda() for k, v in collate([s]).items()}) for s in samples]
    counts = [sum(x != -100 for x in s["labels"][1:]) for s in samples]
    expected = sum(loss.item() * n for loss, n in zip(alone, counts, strict=True)) / sum(counts)
    assert packed.item() == pytest.approx(expected, rel=2e-2)  # bf16 kernels: close, not bit-equal


def test_bf16_mixed_step_moves_the_fp32_weights_at_the_spec_learning_rate(tmp_path, tiny_model):
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(tmp_path / "run"), "--model_path", tiny_model,
                     "--max_epochs", "1", "--warmup_steps", "0", "--learning_rate", "1e-5", "--report_to", "none",
                     "--precision", "bf16-mixed", "--keep_checkpoints", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run")).state_dict()
    moved = sum(int((after[k] != before[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
    assert moved > 0.9  # bf16 weights with plain AdamW would leave most of them where they were
    assert read_config(tmp_path / "run")["resolved"]["dtype"] == "float32"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_step_trains_the_adapters_on_a_4_bit_base(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--max_epochs", "1", "--warmup_steps", "0", "--learning_rate", "1e-3", "--report_to", "none",
                     "--finetuning_type", "lora", "--quantization_bit", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = read_config(out)["resolved"]
    assert resolved["quantization"] == "4-bit nf4" and 0 < resolved["trainable_params"] < resolved["total_params"]
    assert (out / "adapter_model.safetensors").is_file()


def test_fsdp_on_two_gpus_trains_and_saves_whole_weights(tmp_path, tiny_model):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "run"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                     "--max_epochs", "1", "--warmup_steps", "0", "--report_to", "none", "--fsdp", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(loaded[k].shape == reference[k].shape for k in loaded)  # gathered whole, not shards
