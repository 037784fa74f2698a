"""LM-head memory that does not grow with the labelled tokens: the loss over the kept positions, a chunk at a time.

Completion-only logits (``completion_training``) already run the LM head only where the next token is labelled, but
the kept logits are still built whole: ``labelled tokens x vocab x 4 B`` (fp32, the loss upcasts them), plus as much
again for their gradient. In the conversation format almost every review token is labelled, so this term grows
with the batch: 1,000 labelled tokens x Qwen's 151,936 vocabulary = 0.6 GB of logits, 1.2 GB with the gradient.

Here the model runs without its head (``logits_to_keep`` selects no position, ``output_hidden_states`` gives the
final, normed hidden states: transformers documents that ``hidden_states[-1]`` is ``last_hidden_state`` for language
models), the hidden states at the labelled positions are taken out, and head + cross-entropy run on them:

* ``chunked`` (every device, pure PyTorch): :class:`ChunkedLinearCrossEntropy` computes the summed loss a chunk of
  rows at a time and keeps only one float per row (its log-sum-exp); the backward pass recomputes each chunk's
  logits, turns them into that chunk's gradient in place and multiplies it into the hidden-state and head-weight
  gradients. At most one ``chunk x vocab`` block of logits is alive, in the forward and in the backward pass.
* ``liger`` / ``cut-cross-entropy`` (a CUDA GPU with the package installed): the library's fused linear
  cross-entropy on the same kept hidden states (Triton kernels that never write the logits to memory).
* ``unchunked``: the model's own head and ``loss_function`` on the kept logits (completion_training's path).
  Kept for sharded heads (below), for the benchmark and for the equality tests.

The model is still called through whatever wraps it (DDP, PEFT): DDP only synchronises gradients of a forward that
went through its wrapper, so the decoder is not called directly. The head's weight is read from
``get_output_embeddings()`` only when it is a plain ``torch.nn.Linear`` (tied or not, frozen under LoRA or trained).

Sharded heads: FSDP and DeepSpeed ZeRO-3 gather the head's weight only inside the model's own forward (FSDP2 in the
root module's pre-forward hook, ZeRO-3 in the head module's hooks); a loss computed outside it would need FSDP2's
``FSDPModule.unshard()`` / DeepSpeed's ``deepspeed.zero.GatheredParameters`` around the forward *and* the backward
recomputation. Neither runs on this project's CPU test machines, so those runs keep the unchunked path, with the
reason recorded (:func:`choose_lm_head_loss`).

Decisions (pure, tested branch by branch): :func:`choose_lm_head_loss` (which path) and :func:`choose_chunk_rows`
(how many rows per chunk), recorded in training_config.json through ``plan.RunPlan.record``;
:func:`memory_facts` / :func:`summary_rows` say in the start summary where the head's memory goes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from review_lm.utils import importable

IGNORE_INDEX = -100
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
    return rows, (f"{rows} rows x {vocab_size:,} vocab x {LOGITS_BYTES} B = {human_bytes(rows * per_row)} of fp32 "
                  f"logits per chunk (budget {human_bytes(budget_bytes)}, multiples of {CHUNK_ROW_MULTIPLE} rows, "
                  f"{MIN_CHUNK_ROWS}..{MAX_CHUNK_ROWS})")


def human_bytes(n: float) -> str:
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
    now = (f"{facts['lm_head_peak_logits_formula']} = {human_bytes(peak)}" if peak is not None
           else facts["lm_head_peak_logits_formula"])
    if facts.get("lm_head_loss") == "unchunked":
        now += f" (~{facts['labelled_tokens_average_micro_batch']:,} labelled tokens on an average micro-batch)"
    gradient = {"chunked": "its gradient made in the same block", "unchunked": "as much again for its gradient"}
    rows = [f"lm head     {facts['lm_head_loss']}: {facts['lm_head_loss_reason']}",
            f"  logits    peak per micro-batch {now}, {gradient.get(facts.get('lm_head_loss'), 'inside the kernel')}"]
    if facts.get("lm_head_loss") != "unchunked":
        rows.append(f"            (unchunked: labelled tokens x vocab x {LOGITS_BYTES} B = "
                    f"{human_bytes(facts['unchunked_logits_bytes_average_micro_batch'])} on an average micro-batch "
                    f"of ~{facts['labelled_tokens_average_micro_batch']:,} labelled tokens, up to "
                    f"{human_bytes(facts['unchunked_logits_bytes_max_micro_batch'])} at batch x max_length; "
                    "as much again for the gradient)")
    if facts.get("model_weights_bytes"):
        rows.append(f"  model     {facts.get('total_params', 0):,} parameters = "
                    f"{human_bytes(facts['model_weights_bytes'])} of weights")
    if facts.get("lm_head_loss_note"):
        rows.append(f"  note      {facts['lm_head_loss_note']}")
    return rows


# --------------------------------------------------------------------------------------------------------------
# The chunked linear cross-entropy
# --------------------------------------------------------------------------------------------------------------
def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run the head's matmul in here, or None (autocast off)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype | None) -> torch.Tensor:
    """fp32 logits of one chunk, computed as the model's head would compute them (under autocast: in ``dtype``,
    then upcast as ``ForCausalLMLoss`` does). Autocast is applied by hand: backward runs outside autocast."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden, weight, bias).float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, a chunk of rows at a time.

    Forward keeps one fp32 log-sum-exp per row; backward recomputes each chunk's logits, turns them in place into
    ``softmax - one_hot`` and multiplies that into the hidden-state / weight / bias gradients. Rows whose target is
    ``IGNORE_INDEX`` contribute nothing.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int):
        dtype = _autocast_dtype(hidden.device)
        rows = hidden.shape[0]
        lse = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk_rows):
            end = min(rows, start + chunk_rows)
            logits = _chunk_logits(hidden[start:end], weight, bias, dtype)
            target = targets[start:end]
            valid = target != IGNORE_INDEX
            picked = logits.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
            # log-sum-exp in place: the chunk's logits are not needed again in the forward pass
            top = logits.amax(1)
            chunk_lse = top + logits.sub_(top[:, None]).exp_().sum(1).log_()
            lse[start:end] = chunk_lse
            total += torch.where(valid, chunk_lse - picked, 0.0).sum()
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias and bias is not None else None
        matmul_weight = weight.to(dtype) if dtype is not None else weight
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            end = min(hidden.shape[0], start + ctx.chunk_rows)
            chunk_hidden = hidden[start:end]
            grad = _chunk_logits(chunk_hidden, weight, bias, dtype)
            target = targets[start:end]
            valid = target != IGNORE_INDEX
            grad.sub_(lse[start:end, None]).exp_()  # softmax
            grad.scatter_add_(1, target.clamp(min=0)[:, None], -valid[:, None].to(grad.dtype))  # - one_hot
            if not bool(valid.all()):
                grad.mul_(valid[:, None])
            matmul_grad = grad.to(dtype) if dtype is not None else grad
            with torch.autocast(hidden.device.type, enabled=False):
                if grad_hidden is not None:
                    grad_hidden[start:end] = matmul_grad @ matmul_weight
                if grad_weight is not None:
                    rows_in = chunk_hidden.to(dtype) if dtype is not None else chunk_hidden
                    grad_weight += matmul_grad.t() @ rows_in
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
            del grad, matmul_grad
        # grad_total (d loss / d sum) is applied once to the small results, not to every chunk x vocab block.
        scale = grad_total.float()
        return (None if grad_hidden is None else (grad_hidden * scale).to(hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(weight.dtype),
                None if grad_bias is None else (grad_bias * scale).to(bias.dtype),
                None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Summed (fp32) cross-entropy of the head applied to ``hidden`` (rows x hidden) against ``targets`` (rows)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)


def fused_linear_cross_entropy(kind: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy through an optional fused GPU kernel (imported only here, on the path that uses it).

    Under autocast the inputs are cast to the autocast dtype, as the model's head would see them.
    """
    dtype = _autocast_dtype(hidden.device)
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
            weight, hidden, targets, bias).float()
    if kind == "cut-cross-entropy":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX,
                                    reduction="sum").float()
    raise ValueError(f"not a fused kind: {kind!r}")


# --------------------------------------------------------------------------------------------------------------
# The model side: hidden states at the kept positions, the head's weight
# --------------------------------------------------------------------------------------------------------------
def plain_head(model) -> torch.nn.Linear | None:
    """The model's output embeddings when they are a plain ``nn.Linear`` (weight read directly), else None
    (a PEFT adapter or a quantized layer on the head: only its own forward is right)."""
    head = model.get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None


def kept_hidden_states(model, forward_inputs: dict[str, Any], keep: torch.Tensor):
    """(final hidden states at the ``keep`` positions as rows x hidden, the model's outputs).

    The model is called through its wrappers with ``logits_to_keep`` selecting no position (its head runs on zero
    rows) and ``output_hidden_states=True``; ``hidden_states[-1]`` is the normed ``last_hidden_state`` the head reads.
    """
    outputs = model(**forward_inputs, logits_to_keep=torch.zeros_like(keep), output_hidden_states=True)
    hidden = outputs.hidden_states[-1][keep]
    outputs.hidden_states = None  # not handed on: evaluation would otherwise carry every layer's states
    return hidden, outputs


def summed_kept_loss(kind: str, model, unwrapped, forward_inputs: dict[str, Any], keep: torch.Tensor,
                     kept_targets: torch.Tensor, chunk_rows: int):
    """(summed loss over the kept positions, outputs) by ``kind`` ("chunked" or a fused kernel)."""
    head = plain_head(unwrapped)
    if head is None:
        raise ValueError("the LM head is not a plain torch.nn.Linear: use the unchunked path")
    hidden, outputs = kept_hidden_states(model, forward_inputs, keep)
    hidden = hidden.to(head.weight.device)
    kept_targets = kept_targets.to(head.weight.device)
    if kind == "chunked":
        return chunked_linear_cross_entropy(hidden, head.weight, head.bias, kept_targets, chunk_rows), outputs
    return fused_linear_cross_entropy(kind, hidden, head.weight, head.bias, kept_targets), outputs
