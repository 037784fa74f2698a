"""The run plan: every decision about a training run, made once before anything slow, then only read.

Three steps, each a pure function of what it is given (tested branch by branch without a GPU):

* :func:`validate_arguments` - every flag and flag combination that needs neither data nor hardware, one line
  each (:class:`~review_lm.utils.UsageError`), before anything is read or written;
* :func:`plan_hardware` - given the probed :class:`Hardware`: precision (``precision``), attention
  (:func:`choose_attention`), packing and completion-only logits (``completion_training``), how head + loss
  run over the kept positions (``training.chunked_loss``; the chunk size once the vocabulary is known,
  :meth:`RunPlan.with_vocab`), QLoRA (``adapters``) and sharding (``sharding``); contradictions with the hardware
  are refused here, still before the data is read;
* :meth:`RunPlan.with_splits` / :meth:`RunPlan.with_steps` - once the data is split: whether there is a validation
  split and the checkpoint/evaluation schedule (:func:`checkpoint_schedule`); once it is tokenized: the optimizer steps
  and the logging cadence.

The start summary and ``training_config.json``'s ``resolved`` section are both printed from the plan
(:meth:`RunPlan.record`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from typing import Any

from review_lm.data.chat_layout import TEMPLATE_BUILTIN, TEMPLATE_NONE, TEMPLATE_TOKENIZER
from review_lm.data.prompts import PROMPT_FORMATS
from review_lm.data.splitting import check_ratios
from review_lm.runs import run_folder
from review_lm.training import adapters, lm_head_plan, sharding
from review_lm.training.efficiency import EfficiencyPlan, plan_efficiency
from review_lm.training.precision import PrecisionPlan, optimi_importable, plan_precision
from review_lm.training.progress import logging_cadence
from review_lm.utils import UsageError, check_range, importable

# --------------------------------------------------------------------------------------------------------------
# Prompt format and chat template
# --------------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE_FLAGS = ("auto", "none")  # --chat_template (default: none for spec, auto for conversation)


def default_chat_template(prompt_format: str) -> str:
    """spec: none (the spec's prompt, byte for byte); conversation: auto (an Instruct model's own template)."""
    return "auto" if prompt_format == "conversation" else "none"


def resolve_chat_template(prompt_format: str, requested: str | None, tokenizer_has_template: bool) -> str:
    """The template a run uses (one of RECORDED_TEMPLATES).

    * conversation: ``auto`` = the tokenizer's template when it has one, else the built-in ChatML layout;
      ``none`` = the built-in ChatML layout (a conversation always needs turns).
    * spec: ``none`` = the spec's plain prompt; ``auto`` = the prompt as ONE user turn of the tokenizer's
      template (Instruct models), the plain prompt when the tokenizer has none (a base model reads plain text).
    """
    mode = requested or default_chat_template(prompt_format)
    if mode not in CHAT_TEMPLATE_FLAGS:
        raise UsageError(f"--chat_template must be one of {', '.join(CHAT_TEMPLATE_FLAGS)}, got {mode!r}")
    if mode == "auto" and tokenizer_has_template:
        return TEMPLATE_TOKENIZER
    return TEMPLATE_BUILTIN if prompt_format == "conversation" else TEMPLATE_NONE


# --------------------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------------------
def validate_arguments(args: argparse.Namespace) -> None:
    """Refuse contradicting or out-of-range flags with one line, before anything is read or written."""
    for name in ("batch_size", "gradient_accumulation_steps", "max_epochs", "max_length", "early_stopping_patience"):
        check_range(name, getattr(args, name), 1)
    for name in ("warmup_steps", "logging_steps", "save_steps", "eval_steps"):  # 0: the default cadence
        check_range(name, getattr(args, name), 0)
    check_range("learning_rate", args.learning_rate, 0, inclusive=False)
    prompt_format = getattr(args, "prompt_format", "spec")
    if prompt_format not in PROMPT_FORMATS:
        raise UsageError(f"--prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    resolve_chat_template(prompt_format, getattr(args, "chat_template", None), False)  # the value's check
    check_ratios(args.train_ratio, args.val_ratio, args.test_ratio)
    adapters.check_flags(args)
    sharding.check_combinations(args.fsdp, args.deepspeed, args.quantization_bit)
    # The output folder last, and before the run lock writes into it: never over the inputs, never over a
    # folder that is not a run of this tool (a base model's folder must stay byte-identical).
    output_dir, model_path = getattr(args, "output_dir", None), getattr(args, "model_path", None)
    if output_dir and model_path:
        resume = getattr(args, "resume_from_checkpoint", None)
        run_folder.check_output_not_input(output_dir, run_folder.training_inputs(model_path, resume))
        run_folder.check_not_foreign(output_dir)


# --------------------------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """What this machine can do, probed once (:func:`probe_hardware`); the plan functions only read it."""

    cuda: bool = False
    bf16: bool = False  # the GPU supports bf16 (False without a GPU)
    compute_capability: tuple[int, int] | None = None
    flash_attn: bool = False  # flash_attn importable (only probed with CUDA)
    optimi: bool = True  # torch-optimi importable (bf16-pure's optimizer)
    bitsandbytes: bool = False  # only probed for --quantization_bit
    deepspeed: bool = False  # only probed for --deepspeed
    fused_cross_entropy: dict[str, bool] = field(default_factory=dict)  # liger / cut-cross-entropy (CUDA only)


def flash_attn_importable() -> bool:
    """flash_attn installed and built for this torch/CUDA."""
    return importable("flash_attn")


def probe_hardware(args: argparse.Namespace) -> Hardware:
    import torch

    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
        compute_capability=torch.cuda.get_device_capability() if cuda else None,
        flash_attn=cuda and flash_attn_importable(), optimi=optimi_importable(),
        bitsandbytes=args.quantization_bit is not None and adapters.bitsandbytes_importable(),
        deepspeed=bool(args.deepspeed) and sharding.deepspeed_importable(),
        fused_cross_entropy=lm_head_plan.fused_kernels_importable() if cuda else {},
    )


def choose_attention(disable_flash_attn: bool, flash_attn_ok: bool, cuda_available: bool,
                     compute_dtype: str, compute_capability: tuple[int, int] | None) -> tuple[str, str]:
    """Return (attn_implementation, reason). FlashAttention 2 only when every condition holds.

    ``compute_dtype`` is the dtype the maths runs in (``PrecisionPlan.compute_dtype``): under bf16/fp16 autocast
    the weights may be fp32 and FA2 still runs, because its inputs are half precision.
    We decide ourselves and never ask transformers for "flash_attention_2" when it cannot run: without the
    package it raises, and with the ``kernels`` package installed it may try to fetch a kernel from the hub.
    """
    if disable_flash_attn:
        return "sdpa", "--disable_flash_attn given"
    if not cuda_available:
        return "sdpa", "no CUDA GPU"
    if not flash_attn_ok:
        return "sdpa", "flash_attn is not installed (pip install flash-attn --no-build-isolation)"
    if compute_capability is not None and compute_capability < (8, 0):
        return "sdpa", f"GPU compute capability {compute_capability[0]}.{compute_capability[1]} < 8.0 (Ampere)"
    if compute_dtype not in ("bf16", "fp16"):
        return "sdpa", f"FlashAttention 2 needs fp16/bf16 compute, precision is {compute_dtype}"
    return "flash_attention_2", f"flash_attn available on a CUDA GPU, {compute_dtype} compute"


@dataclass(frozen=True)
class RuntimePlan:
    """What the model is loaded with and trained in on this hardware."""

    precision: PrecisionPlan  # weights dtype, autocast, optimizer (precision.py)
    attention: str  # attn_implementation passed to from_pretrained
    attention_reason: str
    device: str  # cuda | cpu
    pad_to_multiple_of: int | None  # tensor-core friendly shapes on GPU

    @property
    def weights_dtype(self) -> str:
        return self.precision.weights_dtype

    def training_kwargs(self) -> dict[str, Any]:
        return {**self.precision.training_kwargs(), "use_cpu": self.device == "cpu",
                "dataloader_pin_memory": self.device == "cuda"}


def plan_runtime(disable_flash_attn: bool, cuda_available: bool, bf16_supported: bool,
                 compute_capability: tuple[int, int] | None, flash_attn_ok: bool, precision: str = "auto",
                 finetuning_type: str = "full", optimi_available: bool = True, quantization_bit: int | None = None,
                 deepspeed: bool = False) -> RuntimePlan:
    plan = plan_precision(precision, cuda_available, bf16_supported, finetuning_type, optimi_available,
                          quantization_bit, deepspeed)
    attention, reason = choose_attention(disable_flash_attn, flash_attn_ok, cuda_available, plan.compute_dtype,
                                         compute_capability)
    return RuntimePlan(plan, attention, reason, "cuda" if cuda_available else "cpu", 8 if cuda_available else None)


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------
def optimizer_steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """As Trainer counts them: micro-batches per rank, grouped by accumulation, a partial group still steps."""
    micro_batches = math.ceil(num_samples / (batch_size * world_size))
    return max(1, math.ceil(micro_batches / accumulation))


@dataclass(frozen=True)
class RunPlan:
    runtime: RuntimePlan
    efficiency: EfficiencyPlan
    quantization: adapters.QuantizationPlan | None
    sharding: sharding.ShardingPlan
    world_size: int
    effective_batch_size: int
    report_to: str = "none"
    report_message: str | None = None
    resumed_from: str | None = None
    # Known once the data is split (with_data):
    has_val: bool = False
    schedule: dict[str, Any] = field(default_factory=dict)  # TrainingArguments' save/eval strategy and steps
    steps_per_epoch: int = 0
    max_steps: int = 0
    logging_steps: int = 0  # the training loss is logged every this many optimizer steps (and at epoch ends)
    # How head + loss run over the kept positions (chunked_loss); the chunk size once the vocabulary is known.
    lm_head: lm_head_plan.LMHeadLossPlan = lm_head_plan.LMHeadLossPlan("unchunked", "not planned")

    @property
    def precision(self) -> PrecisionPlan:
        return self.runtime.precision

    def with_splits(self, args: argparse.Namespace, has_val: bool) -> RunPlan:
        """The plan completed by the split: whether there is a validation split, and the checkpoint/evaluation
        schedule (a bad --save_steps/--eval_steps pair is refused here, before the tokenizer or model loads)."""
        return replace(self, has_val=has_val, schedule=checkpoint_schedule(args.save_steps, args.eval_steps,
                                                                              has_val))

    def with_steps(self, args: argparse.Namespace, train_sequences: int) -> RunPlan:
        """The plan completed by the number of training sequences (samples; a conversation run's windows, known
        once tokenized): optimizer steps and the logging cadence."""
        steps = optimizer_steps_per_epoch(train_sequences, args.batch_size, self.world_size,
                                          args.gradient_accumulation_steps)
        # Per-epoch strategies ignore the step counts, but Trainer stores them in every checkpoint and warns on
        # resume when they differ from its 500 default: give the epoch's length instead.
        schedule = {"save_steps": steps, "eval_steps": steps, **self.schedule}
        return replace(self, schedule=schedule, steps_per_epoch=steps, max_steps=steps * args.max_epochs,
                       logging_steps=logging_cadence(args.logging_steps, steps))

    def with_vocab(self, vocab_size: int) -> RunPlan:
        """The plan completed by the model's vocabulary (the head's width): the logits chunk size."""
        return replace(self, lm_head=self.lm_head.with_vocab(vocab_size))

    def record(self) -> dict[str, Any]:
        """The decisions as training_config.json's ``resolved`` section records them (model facts come apart)."""
        p = self.precision
        return {
            "precision": p.mode, "precision_reason": p.reason, "optimizer": p.optimizer,
            "optimizer_reason": p.optimizer_reason, "dtype": p.weights_dtype, "attention": self.runtime.attention,
            "attention_reason": self.runtime.attention_reason, "device": self.runtime.device,
            "world_size": self.world_size, "effective_batch_size": self.effective_batch_size,
            "optimizer_steps_per_epoch": self.steps_per_epoch, "max_optimizer_steps": self.max_steps,
            "logging_steps": self.logging_steps,
            "report_to": self.report_to, **self.efficiency.facts(), "resumed_from": self.resumed_from,
            "quantization": f"{self.quantization.bits}-bit nf4" if self.quantization else None,
            "sharding": self.sharding.describe(), **self.lm_head.facts(),
        }


def plan_hardware(args: argparse.Namespace, hw: Hardware, world_size: int, report_to: str = "none",
                  report_message: str | None = None, resumed_from: str | None = None) -> RunPlan:
    """Decide everything the hardware decides, or refuse with one line (nothing is loaded yet)."""
    # QLoRA's prerequisites first: on a machine without a GPU "needs a CUDA GPU" is the useful line.
    quantization = adapters.plan_quantization(args.quantization_bit, hw.cuda, hw.bitsandbytes)
    ds_config = sharding.load_deepspeed_config(args.deepspeed) if args.deepspeed else None
    shard_plan = sharding.plan_sharding(args.fsdp, args.deepspeed, ds_config, args.quantization_bit, hw.cuda,
                                        hw.deepspeed)
    runtime = plan_runtime(args.disable_flash_attn, hw.cuda, hw.bf16, hw.compute_capability, hw.flash_attn,
                           args.precision, args.finetuning_type, hw.optimi, args.quantization_bit,
                           bool(args.deepspeed))
    efficiency = plan_efficiency(args.disable_packing, args.disable_completion_only_logits, runtime.attention,
                                 args.trust_remote_code)
    lm_head = lm_head_plan.choose_lm_head_loss(efficiency.completion_only_logits, shard_plan.kind, hw.cuda,
                                               runtime.precision.compute_dtype, hw.fused_cross_entropy,
                                               getattr(args, "lm_head_loss", "auto"))
    return RunPlan(runtime, efficiency, quantization, shard_plan, world_size,
                   args.batch_size * args.gradient_accumulation_steps * world_size, report_to, report_message,
                   resumed_from, lm_head=lm_head)


# --------------------------------------------------------------------------------------------------------------
# Checkpoint and evaluation cadence
# --------------------------------------------------------------------------------------------------------------
def checkpoint_schedule(save_steps: int, eval_steps: int, has_val: bool) -> dict[str, Any]:
    """TrainingArguments for when to evaluate and save. 0 = once per epoch (the default).

    Reloading the best model at the end needs an evaluation at every checkpoint (transformers requires
    matching strategies and save_steps a multiple of eval_steps), so a step given for one is used for both.
    """
    if has_val and save_steps and eval_steps and save_steps % eval_steps:
        raise UsageError(f"--save_steps {save_steps} must be a multiple of --eval_steps {eval_steps}: the best "
                         "model is reloaded at the end, so every checkpoint needs an evaluation")
    if not has_val:
        eval_steps = 0
    save = save_steps or eval_steps
    evaluate = eval_steps or save_steps
    kwargs: dict[str, Any] = {"save_strategy": "steps" if save else "epoch"}
    if save:
        kwargs["save_steps"] = save
    if has_val:
        kwargs["eval_strategy"] = "steps" if evaluate else "epoch"
        if evaluate:
            kwargs["eval_steps"] = evaluate
    else:
        kwargs["eval_strategy"] = "no"
    return kwargs
