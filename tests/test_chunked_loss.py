"""Tests for chunked_loss.py: the chunked (and, on a GPU, fused) linear cross-entropy against the plain computation.

Every loss and every parameter's gradient is compared with the model's own ``loss_function`` on full logits
(transformers' ``Trainer.compute_loss``): chunk boundaries inside a review, a chunk larger than the rows, a single
labelled token, tied and untied heads, LoRA, gradient accumulation, packed and padded batches, both prompt formats,
gradient checkpointing, bf16 autocast, evaluation; then a 2-process gloo DDP step against one process. The
decisions are tested branch by branch. Run as a script under torchrun, this file is the DDP worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Trainer, TrainingArguments

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also imported as a torchrun script (the DDP worker below)
    sys.path.insert(0, str(REPO))

import data_loader_movie_review as dl  # noqa: E402
from review_lm.data import datasets as rd  # noqa: E402
from review_lm.testing.tiny_model import build_tiny_model, train_bpe_tokenizer  # noqa: E402
from review_lm.training import chunked_loss as cl  # noqa: E402
from review_lm.training import completion_training as ct  # noqa: E402
from review_lm.training import lm_head_plan as lhp  # noqa: E402

EXAMPLE = str(REPO / "example_movie_review_data.json")
QWEN_VOCAB = 151_936


# --------------------------------------------------------------------------------------------------------------
# Decisions (pure)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion,sharding,cuda,dtype,fused,requested,kind,reason_part", [
    (False, "none", False, "fp32", {}, "auto", "unchunked", "completion-only logits are off"),
    (True, "none", False, "fp32", {}, "unchunked", "unchunked", "--lm_head_loss unchunked"),
    (True, "fsdp", True, "bf16", {"liger": True}, "auto", "unchunked", "unshard()"),
    (True, "deepspeed", True, "bf16", {}, "chunked", "unchunked", "GatheredParameters"),
    (True, "none", True, "bf16", {"liger": True}, "chunked", "chunked", "--lm_head_loss chunked"),
    (True, "none", False, "fp32", {"liger": True}, "auto", "chunked", "no CUDA GPU"),
    (True, "none", True, "bf16", {"liger": True, "cut-cross-entropy": True}, "auto", "liger", "Liger"),
    (True, "none", True, "bf16", {"cut-cross-entropy": True}, "auto", "cut-cross-entropy", "bf16 compute"),
    (True, "none", True, "fp32", {"cut-cross-entropy": True}, "auto", "chunked", "no fused"),
    (True, "none", True, "bf16", {}, "auto", "chunked", "no fused"),
])
def test_lm_head_loss_choice_each_branch(completion, sharding, cuda, dtype, fused, requested, kind, reason_part):
    plan = lhp.choose_lm_head_loss(completion, sharding, cuda, dtype, fused, requested)
    assert plan.kind == kind
    assert reason_part in plan.reason


def test_an_absent_fused_package_is_a_one_line_note_not_a_failure():
    plan = lhp.choose_lm_head_loss(True, "none", True, "bf16", {"liger": False, "cut-cross-entropy": False})
    assert plan.kind == "chunked" and "pip install liger-kernel" in plan.note and "\n" not in plan.note
    fp32 = lhp.choose_lm_head_loss(True, "none", True, "fp32", {"cut-cross-entropy": True})
    assert "bf16/fp16" in fp32.note
    assert lhp.choose_lm_head_loss(True, "none", False, "fp32").note is None  # a CPU run has nothing to install


@pytest.mark.parametrize("vocab,rows", [(QWEN_VOCAB, 192), (1000, lhp.MAX_CHUNK_ROWS), (10**7, lhp.MIN_CHUNK_ROWS),
                                        (32_000, 1024)])
def test_chunk_rows_fit_the_budget_in_whole_tiles(vocab, rows):
    chosen, reason = lhp.choose_chunk_rows(vocab)
    assert chosen == rows and chosen % lhp.CHUNK_ROW_MULTIPLE == 0
    assert chosen * vocab * 4 <= lhp.CHUNK_BUDGET_BYTES or chosen == lhp.MIN_CHUNK_ROWS
    assert f"{chosen} rows x {vocab:,} vocab x 4 B" in reason


def test_plan_records_the_path_the_chunk_and_the_memory_next_to_the_model():
    plan = lhp.choose_lm_head_loss(True, "none", False, "fp32").with_vocab(QWEN_VOCAB)
    facts = {**plan.facts(), **lhp.memory_facts(plan, 494_032_768, "float32", labelled_tokens=18_000, sequences=20,
                                               batch_size=2, max_length=4096), "total_params": 494_032_768}
    assert facts["lm_head_loss"] == "chunked" and facts["logits_chunk_rows"] == 192
    assert facts["lm_head_peak_logits_bytes"] == 192 * QWEN_VOCAB * 4
    assert facts["labelled_tokens_average_micro_batch"] == 1800
    assert facts["unchunked_logits_bytes_average_micro_batch"] == 1800 * QWEN_VOCAB * 4
    assert facts["unchunked_logits_bytes_max_micro_batch"] == 2 * 4096 * QWEN_VOCAB * 4
    assert facts["model_weights_bytes"] == 494_032_768 * 4
    rows = "\n".join(lhp.summary_rows(facts))
    assert "peak per micro-batch 192 rows x 151,936 vocab x 4 B = 111 MiB" in rows
    assert "unchunked: labelled tokens x vocab x 4 B = 1.02 GiB on an average micro-batch of ~1,800" in rows
    assert "494,032,768 parameters = 1.84 GiB of weights" in rows
    unchunked = lhp.choose_lm_head_loss(True, "none", False, "fp32", requested="unchunked").with_vocab(QWEN_VOCAB)
    before = lhp.memory_facts(unchunked, None, "float32", 18_000, 20, 2, 4096)
    assert before["lm_head_peak_logits_bytes"] == 1800 * QWEN_VOCAB * 4 and unchunked.chunk_rows == 0


def test_run_plan_decides_chunked_on_this_machine_and_records_it():
    import train_distributed_MovieReview as tr
    from review_lm.training.plan import Hardware, plan_hardware

    args = tr.parse_args(["--data_file", EXAMPLE, "--output_dir", "/tmp/unused"])
    plan = plan_hardware(args, Hardware(), 1).with_vocab(QWEN_VOCAB)
    record = plan.record()
    assert record["lm_head_loss"] == "chunked" and record["logits_chunk_rows"] == 192
    assert "192 rows" in record["logits_chunk_rows_reason"]
    hidden = tr.parse_args(["--data_file", EXAMPLE, "--output_dir", "/tmp/unused", "--lm_head_loss", "unchunked"])
    assert plan_hardware(hidden, Hardware(), 1).record()["lm_head_loss"] == "unchunked"
    gpu_hw = Hardware(cuda=True, bf16=True, compute_capability=(9, 0), fused_cross_entropy={"liger": True})
    gpu = plan_hardware(args, gpu_hw, 1)
    assert gpu.lm_head.kind == "liger"


# --------------------------------------------------------------------------------------------------------------
# The autograd function against torch's own cross-entropy
# --------------------------------------------------------------------------------------------------------------
def reference_sum(hidden, weight, bias, targets):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)


@pytest.mark.parametrize("rows", [1, 3, 8, 37, 500], ids=lambda r: f"chunk{r}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_function_matches_cross_entropy_at_every_chunk_size(rows, with_bias):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(101, 16, generator=gen, requires_grad=True)
    bias = torch.randn(101, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 101, (37,), generator=gen)
    targets[[3, 20]] = -100  # ignored rows contribute nothing
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    expected = reference_sum(hidden, weight, bias, targets)
    loss = cl.chunked_linear_cross_entropy(hidden, weight, bias, targets, rows)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    for got, want in zip(torch.autograd.grad(loss * 0.37, inputs), torch.autograd.grad(expected * 0.37, inputs),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_function_single_row_frozen_weight_and_no_rows():
    hidden = torch.randn(1, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # frozen head (LoRA): no weight gradient is computed
    targets = torch.tensor([7])
    loss = cl.chunked_linear_cross_entropy(hidden, weight, None, targets, 192)
    torch.testing.assert_close(loss, reference_sum(hidden, weight, None, targets))
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(grad, torch.autograd.grad(reference_sum(hidden, weight, None, targets), hidden)[0])
    empty = torch.zeros(0, 8, requires_grad=True)
    zero = cl.chunked_linear_cross_entropy(empty, weight, None, torch.zeros(0, dtype=torch.long), 4)
    assert zero.item() == 0.0 and torch.autograd.grad(zero, empty)[0].shape == (0, 8)
    with pytest.raises(ValueError):
        cl.chunked_linear_cross_entropy(hidden, weight, None, targets, 0)


def test_function_under_bf16_autocast_matches_the_heads_bf16_logits():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=gen, requires_grad=True)
    weight = torch.randn(300, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_sum(hidden, weight, None, targets)  # linear in bf16, loss in fp32 (as the model)
        loss = cl.chunked_linear_cross_entropy(hidden, weight, None, targets, 16)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight)),
                         strict=True):
        assert got.dtype == want.dtype == torch.float32
        # bf16 matmuls: each chunk's gradient is rounded to bf16 once, the whole batch's once unchunked
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


# --------------------------------------------------------------------------------------------------------------
# Through the trainer: CompletionTrainer(chunked) == Trainer (the model's loss_function on full logits)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    return bpe_tokenizer


def tiny(tokenizer, tied: bool = True, seed: int = 0):
    if tied:
        model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, max_positions=1024, seed=seed)
    else:
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(config)
    model.set_attn_implementation("sdpa")
    return model


def format_items(tokenizer, prompt_format: str, count: int, max_length: int = 384) -> list[dict]:
    """Real training sequences of the example user, as the trainer reads them (spec samples or conversation
    windows, where many reviews of one sequence are labelled)."""
    data = dl.load_review_data([EXAMPLE])
    splits = dl.split_chronologically(data, 0.7, 0.15, 0.15)
    fmt = rd.chat_format_for(tokenizer, "built-in ChatML" if prompt_format == "conversation" else "none")
    train = rd.build_datasets(splits, tokenizer, max_length, dl.PromptBuilder(), fmt, prompt_format)["train"]
    return [train[i] for i in range(min(count, len(train)))]


@pytest.fixture(scope="module")
def items(tokenizer) -> dict[str, list[dict]]:
    # spec: the 3 longest-prompt samples are late ones; conversation: the user's windows (2 at this length)
    return {"spec": format_items(tokenizer, "spec", 20)[-3:], "conversation": format_items(tokenizer, "conversation",
                                                                                            2, max_length=256)}


def training_args(tmp_path: Path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", seed=0, remove_unused_columns=False)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def labelled(batch) -> torch.Tensor:
    return (ct.next_token_labels(batch["labels"]) != -100).sum()


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model, batch, reference_trainer, trainer, items_in_batch):
    expected = reference_trainer.compute_loss(model, dict(batch), num_items_in_batch=items_in_batch)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=items_in_batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert outputs.logits.shape[0] == 0  # the model's own head ran on no row: no kept logits were built
    want, got = grads_of(model, expected), grads_of(model, loss)
    assert want.keys() == got.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("prompt_format", ["spec", "conversation"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_and_every_gradient_equal_full_logits(tmp_path, tokenizer, items, prompt_format, packing, tied):
    model = tiny(tokenizer, tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    args = training_args(tmp_path)
    batch = ct.make_data_collator(tokenizer, packing)(items[prompt_format])
    rows = 4  # chunk boundaries fall inside reviews (each review + EOS is several labelled tokens)
    assert labelled(batch) > 3 * rows
    chunked = ct.CompletionTrainer(model=model, args=args, lm_head_loss="chunked", logits_chunk_rows=rows)
    for items_in_batch in (None, labelled(batch) + 7):  # token mean, and sum / num_items_in_batch (accumulation)
        assert_same_loss_and_grads(model, batch, Trainer(model=model, args=args), chunked, items_in_batch)


@pytest.mark.parametrize("rows", [1, 100_000], ids=["one-row-chunks", "chunk-larger-than-rows"])
def test_chunk_sizes_from_one_row_to_more_than_the_batch(tmp_path, tokenizer, items, rows):
    model = tiny(tokenizer)
    args = training_args(tmp_path)
    batch = ct.make_data_collator(tokenizer, True)(items["spec"][:1])
    chunked = ct.CompletionTrainer(model=model, args=args, lm_head_loss="chunked", logits_chunk_rows=rows)
    assert_same_loss_and_grads(model, batch, Trainer(model=model, args=args), chunked, labelled(batch))


def test_a_single_labelled_token(tmp_path, tokenizer):
    eos = tokenizer.eos_token_id
    sample = {"input_ids": list(range(5, 17)) + [eos], "labels": [-100] * 12 + [eos]}  # only EOS is learned
    model = tiny(tokenizer)
    args = training_args(tmp_path)
    batch = ct.make_data_collator(tokenizer, False)([sample])
    assert labelled(batch) == 1
    chunked = ct.CompletionTrainer(model=model, args=args, lm_head_loss="chunked", logits_chunk_rows=192)
    assert_same_loss_and_grads(model, batch, Trainer(model=model, args=args), chunked, None)


def test_lora_with_a_frozen_head(tmp_path, tokenizer, items):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(tokenizer), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    for module in model.modules():  # LoRA's B starts at zero: make the adapters matter for the comparison
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    assert not model.get_output_embeddings().weight.requires_grad
    assert cl.plain_head(model) is not None
    args = training_args(tmp_path)
    batch = ct.make_data_collator(tokenizer, True)(items["conversation"])
    chunked = ct.CompletionTrainer(model=model, args=args, lm_head_loss="chunked", logits_chunk_rows=16)
    assert_same_loss_and_grads(model, batch, Trainer(model=model, args=args), chunked, labelled(batch))


def test_gradient_checkpointing_and_bf16_autocast(tmp_path, tokenizer, items):
    batch = ct.make_data_collator(tokenizer, True)(items["conversation"])
    model = tiny(tokenizer).train()
    model.activation_checkpointing_enable()
    args = training_args(tmp_path)
    chunked = ct.CompletionTrainer(model=model, args=args, lm_head_loss="chunked", logits_chunk_rows=16)
    assert_same_loss_and_grads(model, batch, Trainer(model=model, args=args), chunked, labelled(batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = Trainer(model=model, args=args).compute_loss(model, dict(batch))
        loss = chunked.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)


def test_a_head_that_is_not_a_plain_linear_layer_is_refused(tmp_path, tokenizer, items):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(tokenizer), LoraConfig(r=4, task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                      modules_to_save=["lm_head"]))
    assert cl.plain_head(model) is None
    chunked = ct.CompletionTrainer(model=model, args=training_args(tmp_path), lm_head_loss="chunked",
                                   logits_chunk_rows=16)
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        chunked.compute_loss(model, dict(ct.make_data_collator(tokenizer, True)(items["spec"][:1])))


def test_eval_loss_is_the_same_token_weighted_mean(tmp_path, tokenizer, items):
    model = tiny(tokenizer)
    samples = items["spec"] + items["conversation"]
    results = {}
    for kind in ("unchunked", "chunked"):
        for packing in (True, False):
            trainer = ct.CompletionTrainer(model=model, args=training_args(tmp_path, per_device_eval_batch_size=2),
                                           eval_dataset=samples, data_collator=ct.make_data_collator(tokenizer,
                                                                                                     packing),
                                           lm_head_loss=kind, logits_chunk_rows=16)
            results[kind, packing] = trainer.evaluate()["eval_loss"]
    assert results == pytest.approx(dict.fromkeys(results, results["unchunked", True]), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Gradient accumulation and DDP: the optimizer step
# --------------------------------------------------------------------------------------------------------------
def one_sgd_step(out: str, model, tokenizer, samples, batch: int, accumulation: int, trainer_cls, **kwargs):
    """One plain-SGD step (the update is proportional to the gradient: a mis-normalised loss shows)."""
    args = training_args(Path(out), optim="sgd", learning_rate=0.5, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation, max_steps=1, lr_scheduler_type="constant",
                         save_strategy="no", logging_strategy="no", train_sampling_strategy="sequential",
                         ddp_find_unused_parameters=False)
    trainer_cls(model=model, args=args, train_dataset=samples, data_collator=ct.make_data_collator(tokenizer, True),
                **kwargs).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_gradient_accumulation_gives_the_update_of_one_larger_batch(tmp_path, tokenizer, items):
    samples = items["spec"][:2] + items["conversation"]  # micro-batches of different labelled counts
    before = tiny(tokenizer, seed=1).state_dict()
    reference = one_sgd_step(str(tmp_path / "ref"), tiny(tokenizer, seed=1), tokenizer, samples, 4, 1, Trainer)
    assert any(not torch.equal(reference[k], before[k]) for k in reference)
    accumulated = one_sgd_step(str(tmp_path / "acc"), tiny(tokenizer, seed=1), tokenizer, samples, 2, 2,
                               ct.CompletionTrainer, lm_head_loss="chunked", logits_chunk_rows=16)
    for key in reference:
        torch.testing.assert_close(accumulated[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


def ddp_samples(tokenizer) -> list[dict]:
    return format_items(tokenizer, "spec", 20)[-2:] + format_items(tokenizer, "conversation", 2, max_length=256)


def ddp_worker(out: str) -> None:
    """torchrun worker: one chunked SGD step with 2 samples per process; rank 0 saves the weights."""
    tokenizer = train_bpe_tokenizer([EXAMPLE], 2000)
    state = one_sgd_step(out, tiny(tokenizer, seed=1), tokenizer, ddp_samples(tokenizer), 2, 1, ct.CompletionTrainer,
                         lm_head_loss="chunked", logits_chunk_rows=16)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, os.path.join(out, "state.pt"))


@pytest.mark.slow
def test_two_process_ddp_step_equals_one_process_on_the_same_global_batch(tmp_path, tokenizer):
    import subprocess

    from tests.helpers import clean_env

    out = tmp_path / "ddp"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, "--ddp-worker", str(out)], capture_output=True, text=True, timeout=300,
                          env=clean_env(), cwd=str(REPO), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = torch.load(out / "state.pt")
    # One process, the same 4 samples in one batch, the model's own loss on full logits.
    single = one_sgd_step(str(tmp_path / "one"), tiny(tokenizer, seed=1), tokenizer, ddp_samples(tokenizer), 4, 1,
                          Trainer)
    assert distributed.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-4, atol=1e-6, msg=key)


# --------------------------------------------------------------------------------------------------------------
# The script: recorded decision and the memory told in the start summary
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_script_records_the_chunked_head_and_its_memory(tmp_path, tiny_model):
    from tests.helpers import read_config, run_train, write_reviews

    data = write_reviews(tmp_path / "toy.json", ["好看好看好看，真的好看"] * 12)
    out = tmp_path / "run"
    proc = run_train("--data_file", data, "--output_dir", str(out), "--model_path", tiny_model, "--max_epochs", "1",
                     "--batch_size", "2", "--gradient_accumulation_steps", "1", "--warmup_steps", "0",
                     "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = read_config(out)["resolved"]
    assert resolved["lm_head_loss"] == "chunked" and resolved["logits_chunk_rows"] == lhp.MAX_CHUNK_ROWS
    assert resolved["lm_head_peak_logits_bytes"] == lhp.MAX_CHUNK_ROWS * 1000 * 4
    assert resolved["model_weights_bytes"] == resolved["total_params"] * 4
    assert "lm head     chunked: no CUDA GPU" in proc.stderr
    assert f"peak per micro-batch {lhp.MAX_CHUNK_ROWS} rows x 1,000 vocab x 4 B" in proc.stderr


# --------------------------------------------------------------------------------------------------------------
# Fused GPU kernels against the chunked path
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind,module", [("liger", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy")])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_kernel_equals_the_chunked_path(kind, module, autocast):
    pytest.importorskip(module)
    if kind == "cut-cross-entropy" and not autocast:
        pytest.skip("the plan uses Cut Cross-Entropy only with bf16/fp16 compute")
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda", generator=gen, requires_grad=True)
    weight = (0.05 * torch.randn(32_000, 256, device="cuda", generator=gen)).requires_grad_()
    targets = torch.randint(0, 32_000, (1000,), device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        chunked = cl.chunked_linear_cross_entropy(hidden, weight, None, targets, 192)
        fused = cl.fused_linear_cross_entropy(kind, hidden, weight, None, targets)
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fused, chunked, **tolerance)
    for got, want in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(chunked, (hidden, weight)),
                         strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance["rtol"],
                                   atol=tolerance["atol"] * want.abs().max().item())


if __name__ == "__main__":  # the DDP worker (test_two_process_ddp_step_equals_one_process_on_the_same_global_batch)
    parser = argparse.ArgumentParser()
    parser.add_argument("--ddp-worker", required=True)
    ddp_worker(parser.parse_args().ddp_worker)
