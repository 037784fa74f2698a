"""Sharded training for models that do not fit one GPU: FSDP (through Trainer/accelerate) and DeepSpeed ZeRO.

``--fsdp`` shards weights, gradients and optimizer states across the torchrun processes (full shard, FSDP2 where
torch supports it, one FSDP unit per decoder block taken from the model's ``_no_split_modules``);
``--deepspeed CONFIG.json`` passes a DeepSpeed config through to TrainingArguments (ZeRO-2 and ZeRO-3 configs
ship in ``configs/``, their "auto" values follow the trainer's flags).

``plan_sharding`` (flags + hardware -> plan, or a one-line UsageError) and ``training_kwargs`` (plan ->
TrainingArguments kwargs) are pure and tested branch by branch; neither FSDP nor DeepSpeed runs on CPU here.
The final save must hold whole weights: ``Trainer.save_model`` gathers a full state dict under FSDP
(``state_dict_type: FULL_STATE_DICT``) and ZeRO-3 (``stage3_gather_16bit_weights_on_model_save``), and
``full_weights_to_bin`` re-reads those gathered files for the spec's pytorch_model.bin instead of the (sharded)
in-memory state dict.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from review_lm.data.reviews import ReviewDataError, read_json_file
from review_lm.utils import UsageError, importable, write_atomic

CONFIG_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "configs"))
SHIPPED_DEEPSPEED_CONFIGS = {2: os.path.join(CONFIG_DIR, "deepspeed_zero2.json"),
                             3: os.path.join(CONFIG_DIR, "deepspeed_zero3.json")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sharding (several GPUs, launched with torchrun)")
    group.add_argument("--fsdp", action="store_true",
                       help="FSDP full shard of weights, gradients and optimizer states (CUDA GPUs)")
    group.add_argument("--deepspeed", metavar="CONFIG.json", default=None,
                       help="DeepSpeed config, e.g. configs/deepspeed_zero2.json or configs/deepspeed_zero3.json "
                            "(needs the deepspeed package and CUDA GPUs)")


@dataclass(frozen=True)
class ShardingPlan:
    kind: str  # none | fsdp | deepspeed
    deepspeed_config: str | None = None  # path, as given
    zero_stage: int | None = None

    def describe(self) -> str:
        if self.kind == "fsdp":
            return "FSDP full shard (decoder blocks wrapped, full state dict gathered on save)"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage} ({self.deepspeed_config})"
        return "none"


def deepspeed_importable() -> bool:
    """deepspeed installed and working (it loads torch extensions at import)."""
    return importable("deepspeed")


def load_deepspeed_config(path: str) -> dict[str, Any]:
    """The JSON object in ``path`` (UsageError when missing or not a JSON object)."""
    if not os.path.isfile(path):
        raise UsageError(f"--deepspeed {path}: no such file (shipped: configs/deepspeed_zero2.json, "
                         "configs/deepspeed_zero3.json)")
    try:
        config = read_json_file(path)  # the shared reader: nesting bounded, strings valid Unicode
    except ReviewDataError as err:
        raise UsageError(f"--deepspeed {path}: not valid JSON ({err.problem})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--deepspeed {path}: expected a JSON object, got {type(config).__name__}")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(
        config.get("zero_optimization"), dict) else 0
    return stage if isinstance(stage, int) else -1


def check_combinations(fsdp: bool, deepspeed: str | None, quantization_bit: int | None) -> None:
    """Flags that contradict each other, whatever the hardware."""
    if fsdp and deepspeed:
        raise UsageError("--fsdp and --deepspeed are two ways of sharding: choose one")
    if (fsdp or deepspeed) and quantization_bit is not None:
        raise UsageError(f"--quantization_bit {quantization_bit} (QLoRA) cannot be combined with "
                         f"{'--fsdp' if fsdp else '--deepspeed'}: 4-bit weights are trained unsharded (one replica "
                         "per GPU under torchrun)")


def plan_sharding(fsdp: bool, deepspeed: str | None, deepspeed_config: dict[str, Any] | None,
                  quantization_bit: int | None, cuda_available: bool, deepspeed_ok: bool) -> ShardingPlan:
    """Decide the sharding of this run, or refuse with one line (before any model is loaded). The flags were
    checked against each other first (:func:`check_combinations`, in ``plan.validate_arguments``)."""
    if fsdp:
        if not cuda_available:
            # Measured: with accelerate 1.15, AcceleratorState turns FSDP on only for multi-GPU-like device types;
            # on CPU it silently trains DDP replicas instead, so refuse rather than pretend to shard.
            raise UsageError("--fsdp needs CUDA GPUs (on CPU accelerate would run plain DDP instead of FSDP)")
        return ShardingPlan("fsdp")
    if deepspeed:
        if not deepspeed_ok:
            raise UsageError("--deepspeed needs the deepspeed package (pip install deepspeed; it builds CUDA ops)")
        if not cuda_available:
            raise UsageError("--deepspeed needs CUDA GPUs")
        config = deepspeed_config or {}
        stage = zero_stage(config)
        if stage not in (0, 1, 2, 3):
            raise UsageError(f"--deepspeed {deepspeed}: zero_optimization.stage must be 0-3")
        if stage == 3 and config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save") is not True:
            raise UsageError(f"--deepspeed {deepspeed}: ZeRO-3 must set zero_optimization."
                             "stage3_gather_16bit_weights_on_model_save to true, or the final model is saved "
                             "sharded and does not load with from_pretrained")
        return ShardingPlan("deepspeed", deepspeed, stage)
    return ShardingPlan("none")


def fsdp_version(torch_supports_fsdp2: bool) -> int:
    """FSDP2 (per-parameter sharding, ``fully_shard``) where torch has it; FSDP1 otherwise."""
    return 2 if torch_supports_fsdp2 else 1


# FSDP2 (``torch.distributed.fsdp.fully_shard``) is public API from torch 2.6 on, and accelerate's FSDP2 plugin
# requires that release. Our own statement of the requirement, not accelerate's internal constant (accelerate 1.16
# removed ``accelerate.utils.constants.FSDP2_PYTORCH_VERSION``, which broke every --fsdp run importing it).
FSDP2_MIN_TORCH = "2.6.0"


def torch_supports_fsdp2(torch_version: str | None = None) -> bool:
    """Whether ``torch_version`` (default: the installed torch) has FSDP2; local labels (+cpu, +cu126) ignored."""
    from packaging.version import Version

    if torch_version is None:
        import torch

        torch_version = torch.__version__
    return Version(Version(str(torch_version)).base_version) >= Version(FSDP2_MIN_TORCH)


def training_kwargs(plan: ShardingPlan, layer_classes: set[str], gradient_checkpointing: bool,
                    version: int = 2) -> dict[str, Any]:
    """TrainingArguments kwargs for the plan. FSDP wraps each decoder block (``layer_classes``, from the model)."""
    if plan.kind == "deepspeed":
        return {"deepspeed": plan.deepspeed_config}
    if plan.kind != "fsdp":
        return {}
    if not layer_classes:
        raise UsageError("--fsdp: the model names no decoder-layer class (_no_split_modules) to wrap")
    fsdp_config: dict[str, Any] = {
        "version": version,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": sorted(layer_classes),
        # Gather whole weights when saving, so checkpoints and the final folder load with from_pretrained.
        "state_dict_type": "FULL_STATE_DICT",
        # Each rank loads the model itself (the script loads before Trainer exists); no rank-0 broadcast trick.
        "cpu_ram_efficient_loading": False,
        # FSDP's own activation checkpointing: TrainingArguments' would add a redundant all-gather in backward.
        "activation_checkpointing": gradient_checkpointing,
    }
    if version == 2:
        fsdp_config["reshard_after_forward"] = True  # = FULL_SHARD
    else:
        fsdp_config["reshard_after_forward"] = "FULL_SHARD"
    return {"fsdp": True, "fsdp_config": fsdp_config}


def model_training_kwargs(plan: ShardingPlan, model, gradient_checkpointing: bool) -> dict[str, Any]:
    """:func:`training_kwargs` for this model: FSDP wraps the model's own decoder-layer class."""
    if plan.kind != "fsdp":
        return training_kwargs(plan, set(), gradient_checkpointing)
    from review_lm.training.adapters import decoder_layer_classes

    return training_kwargs(plan, decoder_layer_classes(model), gradient_checkpointing,
                           fsdp_version(torch_supports_fsdp2()))


def save_plain_model(model, tokenizer, folder: str, save_format: str) -> None:
    """A folder plain from_pretrained loads: config, weights in --save_format, tokenizer."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if save_format == "bin":
        full_weights_to_bin(folder)


def full_weights_to_bin(folder: str) -> str:
    """Rewrite the safetensors weights Trainer saved in ``folder`` as one pytorch_model.bin; return its path.

    Read back from disk rather than from ``trainer.model.state_dict()``: under FSDP / ZeRO-3 the in-memory
    weights are shards, while what ``save_model`` wrote was gathered whole. transformers 5 cannot write .bin
    itself; from_pretrained still reads it (torch.load with weights_only=True).
    """
    import torch
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, Any] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    path = os.path.join(folder, "pytorch_model.bin")
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    for name in [*files, *(["model.safetensors.index.json"] if os.path.isfile(index) else [])]:
        os.remove(os.path.join(folder, name))
    return path
