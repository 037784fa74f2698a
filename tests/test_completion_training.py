"""Tests for completion_training.py: each optimisation against the plain computation it replaces.

Completion-only logits vs Trainer's full-logits loss (value and gradient), packed rows vs samples alone,
gradient accumulation vs one larger batch, and the decisions branch by branch. A tiny random Qwen2 with a small
BPE vocabulary (pad id == EOS id, like Qwen2.5 base) is built in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from review_lm.testing.tiny_model import build_tiny_model
from review_lm.training import completion_training as ct
from review_lm.training import efficiency
from tests.helpers import EXAMPLE, read_config, run_train, write_reviews


# --------------------------------------------------------------------------------------------------------------
# Decisions (pure)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disable,attention,custom,expected,reason_part", [
    (True, "sdpa", False, False, "--disable_packing"),
    (False, "sdpa", True, False, "--trust_remote_code"),
    (False, "flex_attention", False, False, "not known to keep packed samples apart"),
    (False, "sdpa", False, True, "block-diagonal"),
    (False, "eager", False, True, "block-diagonal"),
    (False, "flash_attention_2", False, True, "variable-length"),
])
def test_packing_choice_each_branch(disable, attention, custom, expected, reason_part):
    packing, reason = efficiency.choose_packing(disable, attention, custom)
    assert packing is expected
    assert reason_part in reason


@pytest.mark.parametrize("disable,custom,expected,reason_part", [
    (True, False, False, "--disable_completion_only_logits"),
    (False, True, False, "--trust_remote_code"),
    (False, False, True, "logits_to_keep"),
])
def test_completion_only_logits_choice_each_branch(disable, custom, expected, reason_part):
    on, reason = efficiency.choose_completion_only_logits(disable, custom)
    assert on is expected
    assert reason_part in reason


def test_plan_facts_and_length_grouping_only_without_packing():
    packed = efficiency.plan_efficiency(False, False, "sdpa", False)
    assert packed.facts() == {
        "packing": True, "packing_reason": efficiency.PACKING_SAFE_ATTENTION["sdpa"], "completion_only_logits": True,
        "completion_only_logits_reason": "LM head only at labelled positions (logits_to_keep)",
        "train_sampling_strategy": "random"}
    padded = efficiency.plan_efficiency(True, True, "sdpa", False)
    assert (padded.packing, padded.completion_only_logits, padded.train_sampling_strategy) == (
        False, False, "group_by_length")


# --------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny model and hand-made samples
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    assert bpe_tokenizer.pad_token_id == bpe_tokenizer.eos_token_id  # the case the labels must survive
    return bpe_tokenizer


def tiny_model(tokenizer, attention: str = "sdpa", seed: int = 0):
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, max_positions=512, seed=seed)
    model.set_attn_implementation(attention)
    return model


def make_sample(gen: torch.Generator, eos: int, prompt: int, target: int, truncated: bool = False) -> dict:
    """prompt ids (label -100) + target ids (+ EOS unless the target was truncated at the token budget)."""
    ids = torch.randint(1, 900, (prompt + target,), generator=gen).tolist()
    if not truncated:
        ids[-1] = eos
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    eos = tokenizer.eos_token_id
    # Different lengths (padding in a padded batch), different labelled counts, one truncated target that is
    # not the longest sample (so pad == EOS ids follow it and must stay unlabelled).
    return [make_sample(gen, eos, 24, 6), make_sample(gen, eos, 7, 3), make_sample(gen, eos, 15, 5, truncated=True),
            make_sample(gen, eos, 12, 1), make_sample(gen, eos, 31, 9)]


def training_args(tmp_path: Path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", seed=0, remove_unused_columns=False)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def labelled_count(batch: dict) -> torch.Tensor:
    """Trainer's num_items_in_batch for one micro-batch: labelled next tokens."""
    return (ct.next_token_labels(batch["labels"]) != -100).sum()


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_logits_to_keep_support_is_read_from_the_causal_lm_even_behind_a_wrapper(tokenizer):
    class Wrapper(torch.nn.Module):  # like peft.PeftModel: forward(**kwargs), get_base_model()
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, **kwargs):
            return self.base(**kwargs)

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids, labels=None):
            return input_ids

    model = tiny_model(tokenizer)
    assert ct.model_accepts_logits_to_keep(model)
    assert ct.model_accepts_logits_to_keep(Wrapper(model))
    assert not ct.model_accepts_logits_to_keep(NoKeep())


# --------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------
def test_collators_need_no_attention_mask_and_keep_labels(tokenizer, samples):
    padded = ct.make_data_collator(tokenizer, packing=False)(samples)
    longest = max(len(s["input_ids"]) for s in samples)
    assert padded["input_ids"].shape == (len(samples), longest)
    assert padded["attention_mask"].sum() == sum(len(s["input_ids"]) for s in samples)
    # Padding uses the pad id (== EOS) in inputs but -100 in labels: EOS is learned only where it is labelled.
    assert (padded["labels"][padded["attention_mask"] == 0] == -100).all()

    packed = ct.make_data_collator(tokenizer, packing=True)(samples)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in samples))
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(samples)
    assert labelled_count(packed) == labelled_count(padded)  # same num_items_in_batch either way


# --------------------------------------------------------------------------------------------------------------
# Completion-only logits == full logits
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_completion_only_loss_and_gradient_equal_full_logits(tmp_path, tokenizer, samples, packing):
    model = tiny_model(tokenizer)
    args = training_args(tmp_path)
    full, completion = Trainer(model=model, args=args), ct.CompletionTrainer(model=model, args=args)
    batch = ct.make_data_collator(tokenizer, packing)(samples)
    for items in (None, labelled_count(batch) + 7):  # mean, and sum / items as under gradient accumulation
        expected = full.compute_loss(model, dict(batch), num_items_in_batch=items)
        loss, outputs = completion.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=items)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        # The LM head really ran at the labelled positions only.
        assert outputs.logits.shape == (int(labelled_count(batch)), model.config.vocab_size)
        expected_grads, grads = grads_of(model, expected), grads_of(model, loss)
        assert expected_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)
    assert batch["labels"].ne(-100).sum() == sum(sum(x != -100 for x in s["labels"]) for s in samples)


@pytest.mark.slow
def test_gradient_checkpointing_keeps_the_packed_completion_only_loss_and_gradient(tmp_path, tokenizer, samples):
    batch = ct.make_data_collator(tokenizer, packing=True)(samples)
    results = []
    for checkpointing in (False, True):
        model = tiny_model(tokenizer).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        trainer = ct.CompletionTrainer(model=model, args=training_args(tmp_path))
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=labelled_count(batch))
        results.append((loss.detach(), grads_of(model, loss)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_completion_only_loss_in_evaluation_equals_full_logits(tmp_path, tokenizer, samples):
    model = tiny_model(tokenizer)
    collator = ct.make_data_collator(tokenizer, packing=False)
    args = training_args(tmp_path, per_device_eval_batch_size=2)
    full = ct.CompletionTrainer(model=model, args=args, eval_dataset=samples, data_collator=collator,
                                completion_only_logits=False)
    ours = ct.CompletionTrainer(model=model, args=args, eval_dataset=samples, data_collator=collator)
    assert ours.evaluate()["eval_loss"] == pytest.approx(full.evaluate()["eval_loss"], rel=1e-5)


def test_eval_loss_is_the_token_weighted_mean_over_the_split_packed_or_not(tmp_path, tokenizer, samples):
    """Trainer weights each batch's mean by its row count (1 for a packed row): not the split's mean."""
    model = tiny_model(tokenizer).eval()
    token_losses = []
    with torch.no_grad():  # the plain computation: every sample alone, every labelled token's loss
        for s in samples:
            logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(s["labels"][1:])
            kept = labels != -100
            token_losses.append(torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="none"))
    expected = torch.cat(token_losses).mean().item()
    results = {}
    for packing in (True, False):
        for batch in (2, 3):
            args = training_args(tmp_path, per_device_eval_batch_size=batch)
            trainer = ct.CompletionTrainer(model=model, args=args, eval_dataset=samples,
                                           data_collator=ct.make_data_collator(tokenizer, packing=packing))
            results[packing, batch] = trainer.evaluate()["eval_loss"]
    assert results == pytest.approx(dict.fromkeys(results, expected), rel=1e-5)
    plain = Trainer(model=model, args=training_args(tmp_path, per_device_eval_batch_size=3), eval_dataset=samples,
                    data_collator=ct.make_data_collator(tokenizer, packing=True))
    assert plain.evaluate()["eval_loss"] != pytest.approx(expected, rel=1e-5)  # the defect this replaces


# --------------------------------------------------------------------------------------------------------------
# Packed samples stay apart
# --------------------------------------------------------------------------------------------------------------
def per_sample_losses(model, row_ids, position_ids, lengths) -> list[torch.Tensor]:
    """Summed next-token loss of each sample in one row (full logits, no trick of ours)."""
    with torch.no_grad():
        logits = model(input_ids=row_ids, position_ids=position_ids, use_cache=False).logits[0]
    losses, start = [], 0
    for n in lengths:
        losses.append(torch.nn.functional.cross_entropy(logits[start:start + n - 1], row_ids[0, start + 1:start + n],
                                                        reduction="sum"))
        start += n
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_packed_sample_has_the_loss_it_has_alone(tokenizer, samples, attention):
    model = tiny_model(tokenizer, attention).eval()
    packed = ct.make_data_collator(tokenizer, packing=True)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    alone = [per_sample_losses(model, torch.tensor([s["input_ids"]]), None, [len(s["input_ids"])])[0]
             for s in samples]
    together = per_sample_losses(model, packed["input_ids"], packed["position_ids"], lengths)
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # Control: the same row without restarting positions lets later samples see earlier ones.
    leaky = per_sample_losses(model, packed["input_ids"], torch.arange(sum(lengths))[None], lengths)
    assert not torch.allclose(leaky[-1], alone[-1], rtol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# Gradient accumulation == one larger batch
# --------------------------------------------------------------------------------------------------------------
def one_step(tmp_path, tokenizer, samples, trainer_cls, packing, batch, accumulation, **trainer_kwargs):
    model = tiny_model(tokenizer, seed=1)
    # Plain SGD: the update is proportional to the gradient, so a mis-normalised loss shows (AdamW's first
    # step is ~lr * sign(gradient) and would hide it).
    args = training_args(tmp_path / f"{trainer_cls.__name__}-{packing}-{batch}", optim="sgd", learning_rate=0.5,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                         lr_scheduler_type="constant", save_strategy="no", logging_strategy="no",
                         train_sampling_strategy="sequential")
    trainer_cls(model=model, args=args, train_dataset=samples[:4],
                data_collator=ct.make_data_collator(tokenizer, packing), **trainer_kwargs).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_gradient_accumulation_gives_the_update_of_one_larger_batch(tmp_path, tokenizer, samples):
    before = tiny_model(tokenizer, seed=1).state_dict()
    reference = one_step(tmp_path, tokenizer, samples, Trainer, False, batch=4, accumulation=1)
    changed = [k for k in reference if not torch.equal(reference[k], before[k])]
    assert changed  # the step did something
    for packing in (False, True):
        # Micro-batches of 2 samples hold 9 and 6 labelled tokens: dividing each by its own count would differ.
        accumulated = one_step(tmp_path, tokenizer, samples, ct.CompletionTrainer, packing, batch=2, accumulation=2)
        for key in reference:
            torch.testing.assert_close(accumulated[key], reference[key], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The training script with the optimisations on (default) and off
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script_model(tmp_path_factory) -> str:
    from review_lm.testing.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), tokenizer_kind="bpe", corpus=[EXAMPLE],
                           vocab_size=1000, hidden_size=64, num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize("flags,packing,completion", [
    ((), True, True),
    (("--disable_packing", "--disable_completion_only_logits"), False, False),
], ids=["default", "both-off"])
def test_script_learns_and_reports_what_it_used(tmp_path, script_model, flags, packing, completion):
    data = write_reviews(tmp_path / "toy.json", ["好看好看好看"] * 20)
    out = tmp_path / "run"
    proc = run_train("--data_file", data, "--output_dir", str(out), "--model_path", script_model, "--no_history",
                     "--max_epochs", "4", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                     "--learning_rate", "5e-3", "--warmup_steps", "0", "--report_to", "none", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_config(out)
    resolved = config["resolved"]
    assert (resolved["packing"], resolved["completion_only_logits"]) == (packing, completion)
    assert resolved["train_sampling_strategy"] == ("random" if packing else "group_by_length")
    assert f"packing     {'on' if packing else 'off'}: {resolved['packing_reason']}" in proc.stderr
    assert ("labelled positions only" if completion else "every position") in proc.stderr
    losses = config["result"]["eval_loss_per_epoch"]
    assert losses["4"] < 0.5 * losses["1"], losses
    assert json.loads((out / "training_config.json").read_text(encoding="utf-8"))["arguments"][
        "disable_packing"] is (not packing)
