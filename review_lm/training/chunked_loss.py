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

Decisions (pure, tested branch by branch) live in ``review_lm.training.lm_head_plan``: ``choose_lm_head_loss``
(which path) and ``choose_chunk_rows`` (how many rows per chunk), recorded in training_config.json through
``plan.RunPlan.record``; ``memory_facts`` / ``summary_rows`` say in the start summary where the head's memory goes.
"""

from __future__ import annotations

from typing import Any

import torch

from review_lm.data.prompts import IGNORE_INDEX


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
        if dtype is None and hidden.dtype != weight.dtype:  # bf16-pure weights, fp32 hidden states: a plain head
            dtype = weight.dtype  # layer would need one dtype too; the matmul runs in the weights' dtype
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
