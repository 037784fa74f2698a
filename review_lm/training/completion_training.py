"""Make training cost follow what is learned: completion-only logits and padding-free packing.

A training sample is a long prompt (the user's history, up to --max_length tokens) and a short labelled target
(one review + EOS). Two things here remove the work spent on positions that are not learned:

* **Completion-only logits.** ``CompletionTrainer.compute_loss`` asks the model, through its own
  ``logits_to_keep`` argument, for logits only at positions whose next token is labelled (a 2-D bool mask,
  ``modeling_utils.slice_logits_to_keep``), so the LM head (hidden x 151,936 for Qwen) runs on ~5% of the
  positions instead of all of them. The model is still called through whatever wraps it (DDP, later FSDP/PEFT),
  and the loss is the model's own ``loss_function`` with the same shifted labels, the same sum /
  ``num_items_in_batch`` normalisation under gradient accumulation, and the same multi-process scaling as
  ``Trainer.compute_loss``. Evaluation loss (early stopping, best model) goes through the same method.
* **Padding-free packing.** ``DataCollatorWithFlattening`` turns a micro-batch into one row of concatenated
  samples whose position ids restart at each sample: no pad token is computed. transformers keeps the samples
  apart from those position ids: FlashAttention 2 takes its variable-length path, SDPA/eager get a
  block-diagonal causal mask (``masking_utils.packed_sequence_mask_function``, only when there is no
  attention_mask and no KV cache, hence ``use_cache=False`` on every loss forward here).

``review_lm.training.efficiency.plan_efficiency`` is the pure decision (flags + attention implementation -> what
is used and why), tested branch by branch; ``make_data_collator`` and ``CompletionTrainer`` carry it out.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer

from review_lm.data.prompts import IGNORE_INDEX


def make_data_collator(tokenizer, packing: bool, pad_to_multiple_of: int | None = None):
    """Packed rows (one row per micro-batch + position ids), or dynamic padding to the longest sample.

    Features need only "input_ids" and "labels"; an "attention_mask" is neither required nor used when packing.
    """
    if packing:
        # separator_id: the first label of every sample is ignored, so no sample learns to predict the next
        # sample's first token across the boundary (it is a prompt token, already -100, in our data).
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE_INDEX)


def next_token_labels(labels):
    """Label of the token each position predicts (labels shifted left by one, -100 at the end of each row).

    Exactly what transformers' ``ForCausalLMLoss`` does before its cross entropy.
    """
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def model_accepts_logits_to_keep(model) -> bool:
    """Does the causal LM's own forward take ``logits_to_keep``? A PEFT wrapper passes it on to its base model."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class CompletionTrainer(Trainer):
    """``Trainer`` whose loss computes the LM head only at labelled positions (``completion_only_logits``).

    Overrides ``compute_loss``, Trainer's documented extension point; "labels" stay in the batch, so Trainer
    still counts ``num_items_in_batch`` and computes the evaluation loss, both through this method.

    The evaluation loss is the token-weighted mean over the whole split (every labelled token counts once),
    whatever the batching: Trainer's own averages each batch's mean loss weighted by the batch's row count,
    which is 1 for a packed row of many samples, so ``eval_loss`` would depend on how samples were packed.
    ``evaluation_loop`` (public, shared by evaluate/predict) is wrapped to replace it with the sums kept by
    ``compute_loss`` (summed over processes).
    """

    def __init__(self, *args, completion_only_logits: bool = True, lm_head_loss: str = "unchunked",
                 logits_chunk_rows: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.completion_only_logits = completion_only_logits
        # How head + loss run over the kept positions (chunked_loss): "unchunked" builds the kept logits whole.
        self.lm_head_loss, self.logits_chunk_rows = lm_head_loss, logits_chunk_rows
        self._eval_sums: list[torch.Tensor] = []  # per evaluation batch: (loss sum, labelled tokens)

    def evaluation_loop(self, *args, **kwargs):
        self._eval_sums = []
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_sums and f"{prefix}_loss" in output.metrics:
            total = self.accelerator.reduce(torch.stack(self._eval_sums).sum(0), reduction="sum")
            output.metrics[f"{prefix}_loss"] = (total[0] / total[1].clamp(min=1)).item()
        self._eval_sums = []
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # No KV cache in a loss forward; with packed rows a cache would also switch off the mask that keeps
        # the samples apart.
        inputs = {**inputs, "use_cache": False}
        evaluating = not model.training and "labels" in inputs
        if evaluating:  # this batch's own token mean; the split's mean is made in evaluation_loop
            num_items_in_batch = None
        result = self._loss(model, inputs, return_outputs, num_items_in_batch)
        if evaluating:
            loss = result[0] if return_outputs else result
            tokens = (next_token_labels(inputs["labels"]) != IGNORE_INDEX).sum()
            self._eval_sums.append(torch.stack([loss.detach().float() * tokens, tokens.float()]))
        return result

    def _loss(self, model, inputs, return_outputs, num_items_in_batch):
        if not self.completion_only_logits:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        targets = next_token_labels(inputs["labels"])
        keep = targets != IGNORE_INDEX  # 2-D bool: the model returns logits (num_kept, vocab), row-major
        unwrapped = self.accelerator.unwrap_model(model)
        if self.lm_head_loss != "unchunked":  # head + loss a chunk at a time, or a fused kernel (chunked_loss)
            from review_lm.training import chunked_loss

            summed, outputs = chunked_loss.summed_kept_loss(self.lm_head_loss, model, unwrapped, forward_inputs,
                                                            keep, targets[keep], self.logits_chunk_rows)
            # The same normalisation as the model's loss_function: / num_items_in_batch, else the token mean.
            divisor = keep.sum() if num_items_in_batch is None else num_items_in_batch
            loss = summed / (divisor.to(summed.device) if torch.is_tensor(divisor) else divisor)
        else:
            outputs = model(**forward_inputs, logits_to_keep=keep)
            # The model's own causal-LM loss on the kept logits: shift_labels given, so it does not shift again;
            # sum / num_items_in_batch when Trainer passes it (gradient accumulation), mean otherwise.
            loss = unwrapped.loss_function(logits=outputs.logits, labels=None, vocab_size=outputs.logits.shape[-1],
                                           num_items_in_batch=num_items_in_batch, shift_labels=targets[keep])
        # Same as Trainer.compute_loss: num_items_in_batch counts every process's tokens, DDP averages gradients.
        if (self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func)
                and num_items_in_batch is not None):
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss
