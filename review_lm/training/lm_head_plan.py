"""Where the LM head's memory goes, decided once: which loss path a run takes (chunked, a fused kernel, or the
unchunked head), how many rows a chunk holds, and the memory facts the start summary and training_config.json
state. Pure functions, no torch (the plan makes these decisions before anything loads); the mechanism is
``review_lm.training.chunked_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from review_lm.utils import importable

KINDS = ("chunked", "liger", "cut-cross-entropy", "unchunked")
REQUESTS = ("auto", "chunked", "unchunked")  # the hidden --lm_head_loss switch
LOGITS_BYTES = 4  # the loss upcasts logits to fp32 (transformers' ForCausalLMLoss does the same)
# fp32 logits of one chunk: large enough that each chunk's matmul is efficient (hundreds of rows even for a
# 152k vocabulary), small next to a model's weights and activations (1/8 of what 2 x 512 fully labelled tokens
# with the Qwen vocabulary cost unchunked).
CHUNK_BUDGET_BYTES = 128 * 2**20
CHUNK_ROW_MULTIPLE = 64  # whole tiles for the matmul
MIN_CHUNK_ROWS = 64
MAX_CHUNK_ROWS = 8192  # small vocabularies: the rows of a micro-batch usually fit in one chunk anyway


# --------------------------------------------------------------------------------------------------------------
# Decisions (pure)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMHeadLossPlan:
    """How the loss over the kept positions is computed, and why (``chunk_rows`` is known once the vocabulary is)."""

    kind: str  # one of KINDS
    reason: str
    note: str | None = None  # e.g. an optional fused-kernel package that is not installed
    chunk_rows: int = 0
    chunk_reason: str = ""
    vocab_size: int = 0

    def with_vocab(self, vocab_size: int) -> LMHeadLossPlan:
        rows, why = choose_chunk_rows(vocab_size) if self.kind == "chunked" else (0, "")
        return replace(self, chunk_rows=rows, chunk_reason=why, vocab_size=vocab_size)

    def facts(self) -> dict[str, Any]:
        return {"lm_head_loss": self.kind, "lm_head_loss_reason": self.reason, "lm_head_loss_note": self.note,
                "logits_chunk_rows": self.chunk_rows or None, "logits_chunk_rows_reason": self.chunk_reason or None}


def fused_kernels_importable() -> dict[str, bool]:
    """Which optional fused linear cross-entropy packages import (only probed on a CUDA machine)."""
    return {"liger": importable("liger_kernel"), "cut-cross-entropy": importable("cut_cross_entropy")}


def choose_lm_head_loss(completion_only_logits: bool, sharding_kind: str, cuda: bool, compute_dtype: str,
                        fused: dict[str, bool] | None = None, requested: str = "auto") -> LMHeadLossPlan:
    """Which path computes head + loss over the kept positions (see the module docstring)."""
    fused = fused or {}
    if not completion_only_logits:
        return LMHeadLossPlan("unchunked", "completion-only logits are off: the model's own loss on every position")
    if requested == "unchunked":
        return LMHeadLossPlan("unchunked", "--lm_head_loss unchunked: the kept logits built whole")
    if sharding_kind in ("fsdp", "deepspeed"):
        return LMHeadLossPlan("unchunked", f"{sharding_kind}: the sharded head is gathered only inside the model's own "
                              "forward; gathering it for a separate loss (FSDP2 unshard() / DeepSpeed "
                              "GatheredParameters) is untested here, so the kept logits are built whole")
    if requested == "chunked":
        return LMHeadLossPlan("chunked", "--lm_head_loss chunked: head + loss a chunk of rows at a time")
    if not cuda:
        return LMHeadLossPlan("chunked", "no CUDA GPU: head + loss a chunk of rows at a time (pure PyTorch), "
                              "logits recomputed in the backward pass")
    if fused.get("liger"):
        return LMHeadLossPlan("liger", "Liger Kernel's fused linear cross-entropy (Triton): the logits never "
                              "reach memory whole")
    if fused.get("cut-cross-entropy") and compute_dtype in ("bf16", "fp16"):
        return LMHeadLossPlan("cut-cross-entropy", f"Cut Cross-Entropy's fused kernel ({compute_dtype} compute)")
    note = ("pip install liger-kernel for a fused linear cross-entropy on this GPU"
            if not fused.get("cut-cross-entropy") else
            f"cut-cross-entropy needs bf16/fp16 compute (this run: {compute_dtype}); liger-kernel is not installed")
    return LMHeadLossPlan("chunked", "no fused linear cross-entropy package usable: head + loss a chunk of rows at "
                          "a time (pure PyTorch)", note)


def choose_chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> tuple[int, str]:
    """(rows per chunk, reason): the most whole tiles of rows whose fp32 logits fit the budget."""
    per_row = max(1, vocab_size) * LOGITS_BYTES
    rows = budget_bytes // per_row // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    rows = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows))
    return rows, (f"{rows} rows x {vocab_size:,} vocab x {LOGITS_BYTES} B = {memory_size(rows * per_row)} of fp32 "
                  f"logits per chunk (budget {memory_size(budget_bytes)}, multiples of {CHUNK_ROW_MULTIPLE} rows, "
                  f"{MIN_CHUNK_ROWS}..{MAX_CHUNK_ROWS})")


def memory_size(n: float) -> str:
    """Binary units, as memory is counted (KiB, MiB, GiB); disk sizes use disk_space.human_bytes (decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if n < 10 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GiB"


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def memory_facts(plan: LMHeadLossPlan, total_params: int | None, weights_dtype: str, labelled_tokens: int,
                 sequences: int, batch_size: int, max_length: int) -> dict[str, Any]:
    """The head's peak logits memory per micro-batch (now and unchunked) next to the model's weights.

    Unchunked, a micro-batch's logits are its labelled tokens x vocab x 4 B: on average
    ``labelled_tokens / sequences x batch_size`` tokens, at most ``batch_size x max_length``.
    """
    vocab = plan.vocab_size
    per_row = vocab * LOGITS_BYTES
    average = round(labelled_tokens / max(1, sequences) * batch_size)
    unchunked_avg, unchunked_max = average * per_row, batch_size * max_length * per_row
    if plan.kind == "chunked":
        peak, formula = plan.chunk_rows * per_row, f"{plan.chunk_rows} rows x {vocab:,} vocab x {LOGITS_BYTES} B"
    elif plan.kind == "unchunked":
        peak, formula = unchunked_avg, f"labelled tokens x {vocab:,} vocab x {LOGITS_BYTES} B"
    else:  # fused kernels tile the vocabulary themselves; the logits never exist whole
        peak, formula = None, f"{plan.kind} fused kernel tiles (not materialised)"
    facts = {"lm_head_vocab_size": vocab, "lm_head_peak_logits_bytes": peak, "lm_head_peak_logits_formula": formula,
             "unchunked_logits_bytes_average_micro_batch": unchunked_avg,
             "unchunked_logits_bytes_max_micro_batch": unchunked_max,
             "labelled_tokens_average_micro_batch": average}
    if total_params:
        facts["model_weights_bytes"] = total_params * DTYPE_BYTES.get(weights_dtype, 4)
    return facts


def summary_rows(facts: dict[str, Any]) -> list[str]:
    """Start-summary rows: the head's peak logits per micro-batch (x2 with their gradient) next to the model."""
    if not facts.get("lm_head_vocab_size"):
        return []
    peak = facts["lm_head_peak_logits_bytes"]
    now = (f"{facts['lm_head_peak_logits_formula']} = {memory_size(peak)}" if peak is not None
           else facts["lm_head_peak_logits_formula"])
    if facts.get("lm_head_loss") == "unchunked":
        now += f" (~{facts['labelled_tokens_average_micro_batch']:,} labelled tokens on an average micro-batch)"
    gradient = {"chunked": "its gradient made in the same block", "unchunked": "as much again for its gradient"}
    rows = [f"lm head     {facts['lm_head_loss']}: {facts['lm_head_loss_reason']}",
            f"  logits    peak per micro-batch {now}, {gradient.get(facts.get('lm_head_loss'), 'inside the kernel')}"]
    if facts.get("lm_head_loss") != "unchunked":
        rows.append(f"            (unchunked: labelled tokens x vocab x {LOGITS_BYTES} B = "
                    f"{memory_size(facts['unchunked_logits_bytes_average_micro_batch'])} on an average micro-batch "
                    f"of ~{facts['labelled_tokens_average_micro_batch']:,} labelled tokens, up to "
                    f"{memory_size(facts['unchunked_logits_bytes_max_micro_batch'])} at batch x max_length; "
                    "as much again for the gradient)")
    if facts.get("model_weights_bytes"):
        rows.append(f"  model     {facts.get('total_params', 0):,} parameters = "
                    f"{memory_size(facts['model_weights_bytes'])} of weights")
    if facts.get("lm_head_loss_note"):
        rows.append(f"  note      {facts['lm_head_loss_note']}")
    return rows
