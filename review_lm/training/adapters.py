"""LoRA and QLoRA fine-tuning through peft: flags, the decisions behind them, wrapping the model, merging.

``--finetuning_type lora`` trains low-rank adapters on a frozen base model (peft ``LoraConfig`` +
``get_peft_model``); ``--quantization_bit 4`` additionally loads the frozen base in 4-bit NF4 through
bitsandbytes (QLoRA: double quantisation, bf16 compute, ``prepare_model_for_kbit_training``). A LoRA run's
output folder is an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, the base model
recorded in ``base_model_name_or_path``); ``--merge_lora`` also writes the merged full model to
``OUTPUT_DIR/merged``.

Every decision that depends on the flags or the hardware is a pure function (``check_flags``,
``plan_quantization``, ``checkpoint_kind``) so it can be tested branch by branch without a GPU. bitsandbytes is an
optional import: only the QLoRA path touches it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from review_lm.runs import run_folder
from review_lm.utils import UsageError, check_range, importable

FINETUNING_TYPES = ("full", "lora")
# Defaults of the LoRA flags, kept here so that check_flags can tell a flag the user set from its default.
LORA_DEFAULTS: dict[str, Any] = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapters (LoRA / QLoRA)")
    group.add_argument("--finetuning_type", choices=FINETUNING_TYPES, default="full",
                       help="full: train every weight (spec); lora: train LoRA adapters on a frozen base (peft)")
    group.add_argument("--lora_rank", type=int, default=LORA_DEFAULTS["lora_rank"], help="LoRA rank r")
    group.add_argument("--lora_alpha", type=int, default=LORA_DEFAULTS["lora_alpha"],
                       help="LoRA scaling alpha (update scaled by alpha / r)")
    group.add_argument("--lora_dropout", type=float, default=LORA_DEFAULTS["lora_dropout"],
                       help="dropout on the LoRA input")
    group.add_argument("--lora_target", default=LORA_DEFAULTS["lora_target"],
                       help="comma-separated module names to adapt (e.g. q_proj,v_proj), or 'all'; unset: every "
                            "linear layer of the decoder blocks (never the LM head or the embeddings)")
    group.add_argument("--merge_lora", action="store_true",
                       help="also write base + adapter merged into one model to OUTPUT_DIR/merged (--save_format)")
    group.add_argument("--quantization_bit", type=int, choices=[4], default=None,
                       help="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA GPU; needs lora)")


# --------------------------------------------------------------------------------------------------------------
# Decisions (pure functions)
# --------------------------------------------------------------------------------------------------------------
def check_flags(args: argparse.Namespace) -> None:
    """Refuse adapter flags that contradict each other (one-line UsageError), before anything is loaded."""
    lora = args.finetuning_type == "lora"
    if args.quantization_bit is not None and not lora:
        raise UsageError(f"--quantization_bit {args.quantization_bit} (QLoRA) trains LoRA adapters on a quantized "
                         "base: add --finetuning_type lora")
    if args.merge_lora and not lora:
        raise UsageError("--merge_lora merges LoRA adapters: it needs --finetuning_type lora")
    if not lora:
        changed = [f"--{name}" for name, default in LORA_DEFAULTS.items() if getattr(args, name) != default]
        if changed:
            raise UsageError(f"{', '.join(changed)}: only used with --finetuning_type lora (this run is full)")
        return
    check_range("lora_rank", args.lora_rank, 1)
    check_range("lora_alpha", args.lora_alpha, 1)
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.lora_target is not None and not parse_targets(args.lora_target):
        raise UsageError(f"--lora_target {args.lora_target!r}: no module names given")


def parse_targets(lora_target: str | None) -> list[str] | None:
    """None for the default (every decoder-block linear layer, also spelled 'all'), else the listed names."""
    if lora_target is None or lora_target.strip().lower() == "all":
        return None
    return [name.strip() for name in lora_target.split(",") if name.strip()]


@dataclass(frozen=True)
class QuantizationPlan:
    """How the frozen base is quantized for QLoRA (bitsandbytes 4-bit).

    The dtype the 4-bit weights are de-quantized to for each matmul is the run's half precision, decided by the
    precision plan alone (``PrecisionPlan.torch_compute_dtype``: bf16 as in the QLoRA paper, fp16 on GPUs
    without bf16 or under ``--precision fp16-mixed``) and passed in where the config is built.
    """

    bits: int

    def bnb_kwargs(self, compute_dtype: str) -> dict[str, Any]:
        """Keyword arguments of transformers' ``BitsAndBytesConfig`` (the QLoRA paper's recipe)."""
        return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": compute_dtype}


def plan_quantization(quantization_bit: int | None, cuda_available: bool,
                      bnb_importable: bool) -> QuantizationPlan | None:
    """None without --quantization_bit; a QuantizationPlan where QLoRA can run; UsageError everywhere else."""
    if quantization_bit is None:
        return None
    # QLoRA without --finetuning_type lora is refused by check_flags, a bit width other than 4 by argparse.
    if not cuda_available:
        raise UsageError("--quantization_bit 4 needs a CUDA GPU (bitsandbytes 4-bit kernels); without one use "
                         "--finetuning_type lora alone")
    if not bnb_importable:
        raise UsageError("--quantization_bit 4 needs the bitsandbytes package (pip install bitsandbytes)")
    return QuantizationPlan(4)


def base_model_reference(model_path: str, source: str) -> str:
    """What the adapter records as its base: a hub id as given, a local folder as an absolute path (so the
    adapter folder loads from any working directory)."""
    return os.path.abspath(source) if os.path.isdir(source) else model_path


# --------------------------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------------------------
def decoder_layer_classes(model) -> set[str]:
    """Class names of the model's repeated decoder blocks, from transformers' ``_no_split_modules``
    (e.g. {'Qwen2DecoderLayer'}): the unit LoRA targets live in and the unit FSDP wraps."""
    names = getattr(model, "_no_split_modules", None) or []
    return set(names)


def linear_module_names(model) -> dict[str, bool]:
    """Leaf name of every nn.Linear (bitsandbytes' Linear4bit is one too) -> whether one sits in a decoder block."""
    import torch

    block_classes = decoder_layer_classes(model)
    blocks = [name for name, m in model.named_modules() if type(m).__name__ in block_classes]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, bool] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        in_block = any(name.startswith(block + ".") for block in blocks)
        leaf = name.rsplit(".", 1)[-1]
        found[leaf] = found.get(leaf, False) or in_block
    return found


def resolve_lora_targets(model, lora_target: str | None) -> list[str]:
    """The module names LoRA adapts. Default: every linear layer inside the decoder blocks, derived from the
    model (q/k/v/o/gate/up/down_proj for Qwen2 and Llama-like models) rather than a hard-coded list."""
    linears = linear_module_names(model)
    wanted = parse_targets(lora_target)
    if wanted is None:
        in_blocks = sorted(name for name, in_block in linears.items() if in_block)
        if not in_blocks:  # no _no_split_modules: every linear layer except the LM head (peft's "all-linear")
            in_blocks = sorted(linears)
        if not in_blocks:
            raise UsageError("--finetuning_type lora: the model has no linear layers to adapt; pass --lora_target")
        return in_blocks
    unknown = [name for name in wanted if name not in linears]
    if unknown:
        raise UsageError(f"--lora_target: no linear layer named {', '.join(unknown)} in this model (it has: "
                         f"{', '.join(sorted(linears))})")
    return wanted


# --------------------------------------------------------------------------------------------------------------
# Loading, wrapping, counting
# --------------------------------------------------------------------------------------------------------------
def bitsandbytes_importable() -> bool:
    """bitsandbytes installed and working (its CUDA build loads)."""
    return importable("bitsandbytes")


def quantization_load_kwargs(plan: QuantizationPlan | None, compute_dtype: str, local_rank: int) -> dict[str, Any]:
    """Extra from_pretrained kwargs for QLoRA: the 4-bit config, and the whole model on this rank's GPU
    (bitsandbytes quantizes while placing the weights, so the device must be known at load time)."""
    if plan is None:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(**plan.bnb_kwargs(compute_dtype)),
            "device_map": {"": local_rank}}


def wrap_model(model, args: argparse.Namespace, base_reference: str, quantized: bool,
               gradient_checkpointing: bool = False):
    """Full fine-tuning: the model as loaded. LoRA: a peft model whose only trainable weights are the adapters."""
    if args.finetuning_type != "lora":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Casts norms to fp32, freezes the base and makes the embeddings' output require grads (needed for
        # gradient checkpointing through frozen layers).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=resolve_lora_targets(model, args.lora_target), bias="none", task_type="CAUSAL_LM",
    )
    # get_peft_model keeps the adapters in fp32 when the base is bf16/fp16 (autocast_adapter_dtype=True).
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_reference
    return peft_model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights counted as the parameters they stand for."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a peft model: knows about packed 4-bit weights
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())  # parameters() yields a tied weight once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(args: argparse.Namespace, model) -> dict[str, Any]:
    """Model facts for training_config.json and the start summary (the quantization is the plan's)."""
    facts: dict[str, Any] = {"finetuning_type": args.finetuning_type}
    if model is not None:
        trainable, total = parameter_counts(model)
        facts.update(trainable_params=trainable, total_params=total)
        if args.finetuning_type == "lora":
            facts["lora_target"] = sorted(model.peft_config["default"].target_modules)
    return facts


# --------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------
def save_merged_model(adapter_dir: str, base, save: Any) -> str:
    """Write base + adapter merged into one plain model to ADAPTER_DIR/merged; return that folder.

    ``base``: the base model re-loaded unquantized on the CPU (``model_loading.load_plain_model``); the saved
    adapter is applied to it, rather than merging the training model in place: that works the same after DDP,
    FSDP or ZeRO-3 (whose training weights are sharded) and after QLoRA (merging into 4-bit weights would round
    the update away). The merged model goes
    to its own folder because transformers' ``from_pretrained`` on a folder holding both config.json and
    adapter_config.json applies the adapter again on top of the weights. ``save(model, folder)`` writes the
    weights in the run's --save_format.
    """
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    out = os.path.join(adapter_dir, run_folder.MERGED_DIR)
    save(merged, out)
    return out
