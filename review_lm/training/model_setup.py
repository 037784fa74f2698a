"""The model and tokenizer as training uses them: the plan's precision and attention, QLoRA's 4-bit config, LoRA
adapters for ``--finetuning_type lora``. Where the model comes from (a local folder or a hub id) is
``review_lm.inference.model_loading``, shared with evaluation and generation.
"""

from __future__ import annotations

import os

from review_lm.inference.model_loading import one_line, pretrained_source_kwargs
from review_lm.training import adapters
from review_lm.utils import UsageError


def load_training_tokenizer(model_path: str, source: str, local_only: bool, trust_remote_code: bool):
    """The base model's tokenizer for training: padded on the right, pad = EOS where it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load model {model_path!r} ({one_line(err, 160)}). Without access to the model hub "
                         "pass a local folder: --model_path /path/to/Qwen2.5-3B") from None
    if tokenizer.pad_token is None:  # pad only fills batches; labels never depend on it
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_training_model(args, source: str, local_only: bool, plan):
    """The base model as training uses it (``plan``: ``review_lm.training.plan.RunPlan``): its precision's dtype, the
    chosen attention, QLoRA's 4-bit config; wrapped with LoRA adapters for ``--finetuning_type lora``."""
    import torch
    from transformers import AutoModelForCausalLM

    precision = plan.precision
    try:
        # safetensors first; a .bin is read with torch.load(weights_only=True) by transformers 5.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, precision.weights_dtype), attn_implementation=plan.runtime.attention,
            trust_remote_code=args.trust_remote_code, **pretrained_source_kwargs(local_only),
            **adapters.quantization_load_kwargs(plan.quantization, precision.torch_compute_dtype,
                                                int(os.environ.get("LOCAL_RANK", "0"))))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load model weights from {args.model_path!r}: {one_line(err, 200)}") from None
    # Full fine-tuning: the model as loaded; LoRA / QLoRA: adapters on the frozen base (peft).
    return adapters.wrap_model(model, args, adapters.base_model_reference(args.model_path, source),
                               quantized=plan.quantization is not None,
                               gradient_checkpointing=args.gradient_checkpointing)
