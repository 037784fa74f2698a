"""Whether a run packs its samples and computes completion-only logits, and why: the pure decision (flags + the
attention implementation -> what is used), tested branch by branch. No torch: the plan makes it before anything
loads; ``review_lm.training.completion_training`` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Attention implementations for which transformers keeps packed samples apart using position ids alone:
# FlashAttention 2 through its varlen kernel; SDPA and eager through masking_utils' packed-sequence mask.
# Checked in the installed transformers and, for sdpa/eager, by tests (per-sample loss packed == alone).
PACKING_SAFE_ATTENTION = {
    "flash_attention_2": "FlashAttention 2 variable-length path (position ids restart per sample)",
    "sdpa": "SDPA with a block-diagonal causal mask built from position ids",
    "eager": "eager attention with a block-diagonal causal mask built from position ids",
}


@dataclass(frozen=True)
class EfficiencyPlan:
    """What the loss computation and the batches look like, and why."""

    packing: bool
    packing_reason: str
    completion_only_logits: bool
    completion_only_reason: str

    @property
    def train_sampling_strategy(self) -> str:
        # Length grouping only reduces padding; packed rows have none, so plain shuffling is kept there.
        return "random" if self.packing else "group_by_length"

    def facts(self) -> dict[str, Any]:
        return {"packing": self.packing, "packing_reason": self.packing_reason,
                "completion_only_logits": self.completion_only_logits,
                "completion_only_logits_reason": self.completion_only_reason,
                "train_sampling_strategy": self.train_sampling_strategy}


def choose_packing(disable_packing: bool, attention: str, custom_model_code: bool) -> tuple[bool, str]:
    """Return (pack, reason). Pack only where transformers is known to keep the packed samples apart."""
    if disable_packing:
        return False, "--disable_packing given"
    if custom_model_code:
        return False, "--trust_remote_code: the model's own attention code may let packed samples see each other"
    if attention not in PACKING_SAFE_ATTENTION:
        return False, f"attention {attention!r} is not known to keep packed samples apart"
    return True, PACKING_SAFE_ATTENTION[attention]


def choose_completion_only_logits(disable: bool, custom_model_code: bool) -> tuple[bool, str]:
    """Return (on, reason). Needs a transformers causal LM whose forward takes a 2-D bool ``logits_to_keep``."""
    if disable:
        return False, "--disable_completion_only_logits given"
    if custom_model_code:
        return False, "--trust_remote_code: the model's own forward may not accept a logits_to_keep mask"
    return True, "LM head only at labelled positions (logits_to_keep)"


def plan_efficiency(disable_packing: bool, disable_completion_only_logits: bool, attention: str,
                    custom_model_code: bool) -> EfficiencyPlan:
    pack, pack_reason = choose_packing(disable_packing, attention, custom_model_code)
    logits, logits_reason = choose_completion_only_logits(disable_completion_only_logits, custom_model_code)
    return EfficiencyPlan(pack, pack_reason, logits, logits_reason)
