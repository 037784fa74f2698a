"""Graceful stop on SIGTERM / SIGINT: finish the step, save a complete checkpoint, stop, on every rank.

``GracefulStop`` is the TrainerCallback that turns a signal (a preemption, a scheduler's time limit, Ctrl-C) into
"finish this step, save, stop"; ``report_stop`` tells the user the exact command that resumes the run.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("movie_review")


def _all_ranks_max(value: int, device) -> int:
    """The largest ``value`` over all ranks (one tiny all_reduce; the value itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    import torch

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _epoch_complete(epoch: float | None) -> bool:
    return epoch is not None and abs(epoch - round(epoch)) < 1e-6


class GracefulStop:
    """On SIGTERM/SIGINT: finish the current optimizer step, save a checkpoint, stop training (all ranks).

    The signal handler only records the signal (signal handlers must not do real work). At every optimizer
    step end the ranks all_reduce that record, so a signal seen by any one rank stops every rank at the same
    step: nobody waits in a collective for a rank that left. A second signal exits at once (os._exit: no
    cleanup, like a second Ctrl-C in most tools). The checkpoint goes through Trainer's own save (should_save),
    so it is an ordinary checkpoint-N that --resume_from_checkpoint continues.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, exit_now: Callable[[int], None] = os._exit):
        self._exit_now = exit_now
        self._received = 0  # signal number seen by this process (0: none)
        self._previous: dict[int, Any] = {}
        self.signum = 0  # the signal all ranks agreed to stop on (0: not stopped)
        self.stopped_step: int | None = None
        self.checkpoint: str | None = None

    # -- signal handling -------------------------------------------------------------------------------------
    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._received:
            os.write(2, f"\n{name} again: exiting now without a checkpoint\n".encode())
            self._exit_now(128 + signum)
            return
        self._received = signum
        # os.write, not logging: logging takes locks that the interrupted code may hold.
        os.write(2, f"\n{name} received: finishing the current optimizer step, then saving a checkpoint "
                    f"(send it again to exit at once)\n".encode())

    # -- Trainer events --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        import threading

        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            self.install()

    def on_step_end(self, args, state, control, **kwargs):
        agreed = _all_ranks_max(self._received, args.device)
        if agreed and self.stopped_step is None:
            self.signum, self.stopped_step = agreed, state.global_step
            control.should_training_stop = True
            # On an epoch's last step the epoch-end handling evaluates and saves as usual (see on_epoch_end).
            if not _epoch_complete(state.epoch):
                control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_step is None:
            return control
        if _epoch_complete(state.epoch):
            control.should_save = True  # the epoch's usual evaluation runs too: the resume starts the next epoch
        else:  # left mid-epoch: no epoch-end log/evaluation for a partial epoch (the resume finishes the epoch)
            control.should_log = control.should_evaluate = control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_step is not None:
            self.checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()
        return control

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0


def graceful_stop_callback(exit_now: Callable[[int], None] = os._exit) -> GracefulStop:
    """A GracefulStop that is also a transformers TrainerCallback (no-op defaults for the other events).

    Built here rather than at import so that this module, like the train script's early checks, stays free
    of the slow torch/transformers import.
    """
    from transformers import TrainerCallback

    callback_class = type("GracefulStopCallback", (GracefulStop, TrainerCallback), {})
    return callback_class(exit_now)


def report_stop(trainer, stop: GracefulStop, resume_cmd: str) -> None:
    """After SIGTERM/SIGINT (rank 0): where the run stopped and the exact command that continues it."""
    if trainer.is_world_process_zero():
        logger.warning("stopped by %s after optimizer step %d; checkpoint %s. To resume: %s",
                       signal.Signals(stop.signum).name, stop.stopped_step, stop.checkpoint, resume_cmd)
