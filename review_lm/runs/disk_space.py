"""Disk space and save failures: warn before a run that will not fit, and end a failed save in one line.

``estimate_run_bytes`` / ``disk_space_warning`` before training; ``is_disk_full`` / ``describe_save_failure`` /
``remove_partial_checkpoints`` when a save fails.

Measured here (torch 2.13, safetensors, tmpfs): a full disk does *not* always raise ``OSError(ENOSPC)``.
``torch.save`` (optimizer.pt, rng_state.pth, pytorch_model.bin) raises ``RuntimeError('[enforce fail at
inline_container.cc:672] . unexpected pos 576 vs 534')`` with no errno; safetensors raises ``SafetensorError(
'... No space left on device (os error 28)')``; plain ``open().write`` raises ``OSError(28)``. ``is_disk_full``
recognises all three. No torch here.
"""

from __future__ import annotations

import errno
import gc
import logging
import shutil
import traceback
from collections.abc import Callable, Sequence

from review_lm.runs.checkpoints import (
    CHECKPOINTS_KEPT,
    checkpoint_problem,
    checkpoints_newest_first,
    latest_complete_checkpoint,
)
from review_lm.utils import UsageError, nearest_existing

logger = logging.getLogger("movie_review")


# Optimizer state bytes per trainable parameter, as saved in optimizer.pt (or DeepSpeed's optim states).
OPTIMIZER_BYTES = {
    "adamw": 8,  # torch AdamW, fp32 exp_avg + exp_avg_sq (fp32 / bf16-mixed / fp16-mixed: weights are fp32)
    "adamw_kahan_bf16": 6,  # torch-optimi AdamW on bf16 weights: exp_avg, exp_avg_sq, Kahan buffer, bf16 each
    "deepspeed_adamw": 12,  # DeepSpeed ZeRO: fp32 master weights + exp_avg + exp_avg_sq
}


def estimate_run_bytes(num_params: int, trainable_params: int, weights_bytes_per_param: int,
                       optimizer_bytes_per_trainable_param: int = OPTIMIZER_BYTES["adamw"],
                       checkpoints_kept: int = 3, final_copies: int = 1, saved_params: int | None = None,
                       overhead_bytes: int = 0) -> int:
    """Peak bytes a run writes into output_dir. Pure.

        per checkpoint = saved_params * weights_bytes_per_param
                         + trainable_params * optimizer_bytes_per_trainable_param + overhead_bytes
        total          = per checkpoint * checkpoints_kept
                         + final_copies * (saved_params * weights_bytes_per_param + overhead_bytes)

    ``saved_params``: parameters whose weights a checkpoint holds (default ``num_params``; LoRA: the adapter's,
    i.e. ``trainable_params``). ``weights_bytes_per_param``: 4 for fp32 weights (also bf16-/fp16-mixed, whose
    weights stay fp32), 2 for bf16-pure. ``checkpoints_kept``: the most on disk at once - Trainer writes a new
    checkpoint before it rotates old ones, so ``save_total_limit + 1``. ``final_copies``: 2 with
    ``--save_format bin`` (pytorch_model.bin is written next to model.safetensors before that is removed).
    ``overhead_bytes``: per copy (tokenizer.json - 11 MB for the Qwen vocabulary -, config, rng, scheduler).
    """
    saved = num_params if saved_params is None else saved_params
    weights = saved * weights_bytes_per_param
    per_checkpoint = weights + trainable_params * optimizer_bytes_per_trainable_param + overhead_bytes
    return per_checkpoint * checkpoints_kept + final_copies * (weights + overhead_bytes)


def human_bytes(n: float) -> str:
    """Decimal units, as df -H and file managers show them: 950 B, 12 KB, 3.4 MB, 7.5 GB, 1.2 TB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def disk_space_warning(path: str, needed_bytes: int, free_bytes: int) -> str | None:
    """One line when ``free_bytes`` is below ``needed_bytes``, else None. Pure."""
    if free_bytes >= needed_bytes:
        return None
    return (f"only {human_bytes(free_bytes)} free for {path}, but the run needs about {human_bytes(needed_bytes)} "
            "(checkpoints and the final model): free space or choose another --output_dir")


def free_bytes(path: str) -> int:
    """Free bytes on the file system that holds (or will hold) ``path``."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_disk_space(path: str, needed_bytes: int) -> str | None:
    """``disk_space_warning`` with the free space read from the file system (None when it cannot be read)."""
    try:
        free = free_bytes(path)
    except OSError:
        return None
    return disk_space_warning(path, needed_bytes, free)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch.save's zip writer reports a short write without an errno: "basic_ios::clear: iostream error", then (its
# context) "unexpected pos N vs M" from closing the archive; older versions "file write failed".
_TORCH_WRITE_TEXT = ("unexpected pos", "iostream error", "file write failed", "pytorchstreamwriter failed")
_NEARLY_FULL = 64 * 1024 * 1024


def _chain(err: BaseException) -> list[BaseException]:
    """The error and its causes / contexts, each once."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is not None and all(e is not seen for seen in out):
            out.append(e)
            todo += [e.__cause__, e.__context__]
    return out


def is_disk_full(err: BaseException, free: int | None = None) -> bool:
    """Did this save fail because the disk (or quota) is full? Pure. ``free``: the bytes free now, which
    decides torch.save's errno-less short-write error (a nearly full disk: yes)."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXT):
            return True
        if free is not None and free < _NEARLY_FULL and any(t in text for t in _TORCH_WRITE_TEXT):
            return True
    return False


def describe_save_failure(err: BaseException, output_dir: str, needed_bytes: int | None,
                          last_complete_checkpoint: str | None, resume_cmd: str,
                          free: int | None = None) -> str:
    """One line for a failed save: the folder, why (with the space needed and free when the disk is full), the
    last complete checkpoint and the exact command that continues from it. Pure."""
    if is_disk_full(err, free):
        space = []
        if needed_bytes:
            space.append(f"the run needs about {human_bytes(needed_bytes)}")
        if free is not None:
            space.append(f"{human_bytes(free)} free now")
        cause = "the disk is full" + (f" ({', '.join(space)})" if space else "")
        fix = "free space"
    else:
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:
            lines = str(err).strip().splitlines()
            reason = lines[0] if lines else "no message"
        where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
        cause = f"{type(err).__name__}: {reason}{where}"
        fix = "fix that"
    if last_complete_checkpoint:
        after = f"last complete checkpoint: {last_complete_checkpoint}; {fix}, then resume with: {resume_cmd}"
    else:
        after = f"no complete checkpoint yet; {fix}, then start again (--overwrite_output_dir)"
    return f"saving to {output_dir} failed: {cause}; {after}"


def partial_to_remove(checkpoints: Sequence[tuple[str, str | None]]) -> list[str]:
    """Which checkpoints to delete, given (path, problem) newest first (problem None = complete). Pure.

    Only the incomplete ones newer than the newest complete checkpoint: that is what an interrupted save leaves
    (and Trainer's rotation would count it). An incomplete one older than a complete one is kept - it is not
    what a crash leaves, so it may be something a person wants to look at."""
    out = []
    for path, problem in checkpoints:
        if problem is None:
            break
        out.append(path)
    return out


def remove_partial_checkpoints(output_dir: str, log: Callable[[str], None] = logger.warning) -> list[str]:
    """Delete the interrupted checkpoints (see ``partial_to_remove``), one log line each; return their paths.

    Run it in the lock's leader only (no other process may be saving) and before resuming or after a failed
    save (it frees the space the partial files took)."""
    entries = [(p, checkpoint_problem(p)) for p in checkpoints_newest_first(output_dir)]
    removed = partial_to_remove(entries)
    problems = dict(entries)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed incomplete checkpoint {path}: {problems[path]}")
    return removed


def explain_save_failure(err: BaseException, output_dir: str, needed_bytes: int | None, resume_cmd: str,
                         log: Callable[[str], None] = logger.warning) -> UsageError:
    """After a save raised ``err``: remove the partial checkpoint, then return the one-line UsageError to raise
    (``raise explain_save_failure(...) from err``). Leader only.

    It first clears the local variables of the frames in the error's tracebacks (and its causes'): a
    ``torch.save`` that failed keeps its file open for as long as those frames live (its first error's traceback
    holds the zip writer), so deleting the partial checkpoint would not give the space back - measured on tmpfs:
    still 0 bytes free after the rmtree until the frames were cleared. The tracebacks' lines stay.
    """
    for e in _chain(err):
        traceback.clear_frames(e.__traceback__)
    gc.collect()
    remove_partial_checkpoints(output_dir, log)
    last = latest_complete_checkpoint(output_dir, log)
    try:
        free = free_bytes(output_dir)
    except OSError:
        free = None
    return UsageError(describe_save_failure(err, output_dir, needed_bytes, last, resume_cmd, free))


CHECKPOINTS_ON_DISK = CHECKPOINTS_KEPT + 1  # Trainer rotates old checkpoints only after writing the next one
OVERHEAD_BYTES = 20 * 1024 * 1024  # per copy: tokenizer files (11 MB for Qwen's vocabulary), config, rng, scheduler


def run_bytes(total_params: int, trainable_params: int, weights_dtype: str, optimizer: str, finetuning_type: str,
              save_format: str, deepspeed: bool = False) -> int:
    """What a training run writes at its peak (:func:`estimate_run_bytes` for this run's settings). Pure."""
    lora = finetuning_type == "lora"
    weights = 4 if lora or weights_dtype == "float32" else 2  # LoRA saves its fp32 adapters only
    if deepspeed:
        optimizer_bytes = OPTIMIZER_BYTES["deepspeed_adamw"]
    else:
        optimizer_bytes = OPTIMIZER_BYTES["adamw_kahan_bf16" if optimizer == "optimi_adamw_kahan" else "adamw"]
    return estimate_run_bytes(total_params, trainable_params, weights, optimizer_bytes, CHECKPOINTS_ON_DISK,
                              final_copies=2 if save_format == "bin" and not lora else 1,
                              saved_params=trainable_params if lora else total_params,
                              overhead_bytes=OVERHEAD_BYTES)


def is_save_failure(err: BaseException) -> bool:
    """An error a save can end in that is the machine's, not the code's: any OSError, or a full disk however the
    writer reports it (torch.save's RuntimeError, safetensors' SafetensorError)."""
    return isinstance(err, OSError) or is_disk_full(err)


def save_failure(output_dir: str, rank: int, err: BaseException, needed_bytes: int, resume_cmd: str) -> UsageError:
    """The one line a failed save ends in, on every rank; the leader also removes the partial checkpoint (no
    other process saves then)."""
    if rank == 0:
        return explain_save_failure(err, output_dir, needed_bytes, resume_cmd)
    return UsageError(f"rank {rank}: {describe_save_failure(err, output_dir, needed_bytes, None, resume_cmd)}")
