"""Live feedback during training: when the loss is logged, and how progress reads in a terminal and in a log file.

* :func:`logging_cadence` - by default the training loss is logged at the first optimizer step (within the first
  minute of any run), about five times per epoch, and at the end of every epoch (:class:`EpochEndLog`), so that
  each epoch's logged windows add up to exactly that epoch's steps (``run_report.epoch_losses``).
* :func:`progress_callback` - in a terminal one progress bar for training (Trainer's own, with evaluation's bar
  beside it) and the logs as readable lines above it; when stderr is not a terminal (a log file, a pipe, a job
  scheduler) no bars at all - tqdm's redraws and cursor moves (``\\r``, ``ESC[A``) would end up in the file - just
  the same readable lines through the ``movie_review`` logger.
* :func:`format_log` - ``step 12/100 (epoch 1.20): loss 2.3456, lr 9.80e-06, grad_norm 1.23`` instead of a dict.

transformers is imported inside :func:`progress_callback` only.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

logger = logging.getLogger("movie_review")
LOGS_PER_EPOCH = 5


def logging_cadence(logging_steps: int, steps_per_epoch: int) -> int:
    """``--logging_steps`` if given (> 0), else about :data:`LOGS_PER_EPOCH` logs per epoch."""
    if logging_steps > 0:
        return logging_steps
    return max(1, math.ceil(steps_per_epoch / LOGS_PER_EPOCH))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4g}"
    return str(value)


def format_log(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One readable line for a Trainer log entry (training loss, evaluation, or the final summary)."""
    epoch = logs.get("epoch")
    where = f"step {step}/{max_steps}" + (f" (epoch {epoch:.2f})" if isinstance(epoch, float | int) else "")
    if "eval_loss" in logs:
        extra = [f"{k[5:]} {_number(v)}" for k, v in logs.items()
                 if k.startswith("eval_") and k != "eval_loss" and k.endswith(("runtime", "samples_per_second"))]
        return f"eval at {where}: loss {logs['eval_loss']:.4f}" + (f" ({', '.join(extra)})" if extra else "")
    if "train_runtime" in logs:
        return (f"training finished at {where}: {_number(logs['train_runtime'])} s, mean loss "
                f"{_number(logs.get('train_loss'))}")
    parts = [f"loss {logs['loss']:.4f}"] if "loss" in logs else []
    names = {"learning_rate": "lr", "grad_norm": "grad_norm"}
    parts += [f"{names[k]} {_number(logs[k])}" for k in names if k in logs]
    parts += [f"{k} {_number(v)}" for k, v in logs.items()
              if k not in (*names, "loss", "epoch", "total_flos") and isinstance(v, int | float)]
    return f"{where}: " + ", ".join(parts)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def progress_callback(terminal: bool):
    """A TrainerCallback in place of Trainer's ProgressCallback / PrinterCallback (see the module docstring)."""
    from transformers import ProgressCallback, TrainerCallback

    if terminal:
        class ReadableProgress(ProgressCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and self.training_bar is not None and logs:
                    self.training_bar.write(format_log(logs, state.global_step, state.max_steps))

        return ReadableProgress()

    class PlainLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                logger.info(format_log(logs, state.global_step, state.max_steps))

    return PlainLines()


def epoch_end_log():
    """A TrainerCallback that logs the training loss at the end of every epoch as well as every N steps."""
    from transformers import TrainerCallback

    class EpochEndLog(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_log = True  # Trainer logs only if a step passed since its last log

    return EpochEndLog()
