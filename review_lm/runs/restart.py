"""The start of a training run, lock taken: what to do with ``output_dir`` (check, resume, or nothing left to do).

``plan_restart`` (pure, tested branch by branch) lets a torchrun restart resume only what *this* launch started;
``decide_start`` runs every check a start makes before anything slow (the folder's state, the run fingerprint,
the checkpoint to resume from) and refuses with one line; ``record_start`` / ``record_cleared`` /
``undo_record_start`` write and take back what a start records. Intended order in the train script (every rank
unless said): ``lock = RunLock(out, launch_id()).acquire()`` first; ``decide_start``; leader: ``record_start``,
``remove_partial_checkpoints`` before a resume, ``check_disk_space``; after clearing: ``record_cleared``; a failed
save: ``raise explain_save_failure(...) from err``; ``lock.release()`` at exit (or ``with``). No torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from review_lm.runs import run_folder
from review_lm.runs.checkpoints import check_resume, resolve_resume
from review_lm.runs.fingerprint import (
    current_fingerprint,
    foreign_checkpoint_decision,
    read_fingerprint,
    resume_decision,
    write_fingerprint,
)
from review_lm.runs.launch import restart_count
from review_lm.runs.lock import RunLock, write_launch_marker
from review_lm.runs.run_folder import FINGERPRINT_FILE, LAUNCH_MARKER
from review_lm.utils import UsageError


@dataclass(frozen=True)
class LaunchPlan:
    """What a start does with output_dir. ``check``: judge it as a first start (check_output_dir,
    fingerprint); ``remove_previous``: may --overwrite_output_dir delete the previous run's files. ``resume``:
    continue this launch's own run. ``finished``: this launch's run already finished. ``message``: a line to log."""

    action: str  # check | resume | finished
    resume: str | None
    remove_previous: bool
    message: str | None = None


def plan_restart(restarts: int, overwrite: bool, resume: str | None, state: str,
                 marker: Mapping[str, Any] | None, run_id: str | None, output_dir: str = "output_dir") -> LaunchPlan:
    """What a start does with ``output_dir``, given the torchrun restart count, the flags, the folder's state
    ('empty' | 'unfinished' | 'finished') and the launch marker found when the lock was taken. Pure.

    A restart resumes only when the marker says the folder holds *this* launch's files (same run id, phase
    "started"). Otherwise attempt 0 died before it got that far (before taking the lock, before the checks, or
    before --overwrite_output_dir finished clearing): the folder still holds a previous run, so the restart is
    judged as a first start - with --overwrite_output_dir the previous run is removed and training starts over
    (what the user asked for), never resumed from its checkpoints.
    """
    if restarts == 0:
        return LaunchPlan("check", resume, overwrite and resume is None)
    ours = (run_id is not None and marker is not None and marker.get("run_id") == run_id
            and marker.get("phase") == "started")
    if not ours:
        if overwrite and resume is None:
            return LaunchPlan("check", None, True,
                              f"torchrun restart {restarts}: {output_dir} still holds a previous run (this launch "
                              "had not cleared it yet); removing it and starting over")
        return LaunchPlan("check", resume, False,
                          f"torchrun restart {restarts}: this launch had not started in {output_dir} yet; "
                          "checking it as a first start")
    # This launch's own files. Its flags describe the first start, which already did its work.
    if state == "finished":
        return LaunchPlan("finished", None, False,
                          f"torchrun restart {restarts}: {output_dir} already holds this launch's finished run; "
                          "nothing to do")
    if state == "unfinished":  # the train script names the checkpoint it resumes from
        return LaunchPlan("resume", "latest", False)
    explicit = resume if resume not in (None, "latest") else None  # a checkpoint from another folder
    return LaunchPlan("resume", explicit, False,
                      f"torchrun restart {restarts}: no checkpoint of this launch yet; "
                      + (f"starting again from {explicit}" if explicit else "starting from scratch"))


# ==============================================================================================================
# 4. The start of a training run: lock taken, then what to do with output_dir (train script, every rank)
# ==============================================================================================================
@dataclass(frozen=True)
class RunStart:
    """What this start does: ``plan`` (check | resume | finished), the checkpoint to resume from (a complete one,
    or None), the run's fingerprint, and the lines to log (rank 0)."""

    plan: LaunchPlan
    resume: str | None
    fingerprint: dict[str, Any]
    messages: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.plan.action == "finished"


def decide_start(args, lock: RunLock, world_size: int, environ: Mapping[str, str] = os.environ,
                 skipped: Callable[[str], None] | None = None) -> RunStart:
    """Everything a start decides about ``args.output_dir`` before anything slow, refusing with one line.

    A first start is judged by ``run_folder.check_output_dir``; a resume (``--resume_from_checkpoint`` or a
    torchrun restart of this launch) continues only the same run: the same fingerprint (arguments and data
    content), and a finished run only when ``--max_epochs`` grows.
    """
    out = args.output_dir
    restarts = restart_count(environ)
    state = run_folder.output_dir_state(out)
    plan = plan_restart(restarts, args.overwrite_output_dir, args.resume_from_checkpoint, state,
                        lock.marker_at_start, lock.run_id, out)
    messages = [plan.message] if plan.message else []
    if plan.action == "finished":
        return RunStart(plan, None, {}, tuple(messages))
    if plan.action == "check":
        run_folder.check_output_dir(out, plan.remove_previous, plan.resume)
    fingerprint = current_fingerprint(args, world_size)
    resume = resolve_resume(plan.resume, out, restarts, log=skipped or (lambda message: None))
    check_resume(resume, args.finetuning_type)  # the clearer line for a LoRA/full mix-up
    check_foreign_checkpoint(plan.resume, out, fingerprint)
    if plan.resume is not None:  # continuing a run: it must be the same run
        recorded = read_fingerprint(out) or {}
        decision = resume_decision(recorded.get("fingerprint"), fingerprint, state == "finished",
                                   recorded.get("max_epochs"), args.max_epochs, out)
        if decision.action == "refuse":
            raise UsageError(decision.message)
        if decision.message:
            messages.append(decision.message)
        if state == "finished" and os.path.isdir(os.path.join(out, run_folder.EVAL_DIR)):
            messages.append(f"{os.path.join(out, run_folder.EVAL_DIR)} describes the run before this resume: "
                            "evaluate again (evaluate_movie_review.py --overwrite) when training ends")
    return RunStart(plan, resume, fingerprint, tuple(messages))


def check_foreign_checkpoint(resume: str | None, output_dir: str, fingerprint: Mapping[str, Any]) -> None:
    """A checkpoint PATH outside ``output_dir`` is another folder's: resume it only if that folder's run is this
    run (its recorded fingerprint equals this one), checked like a resume inside the folder. One-line refusal."""
    if resume in (None, "latest"):
        return
    checkpoint_run = os.path.dirname(os.path.abspath(resume.rstrip(os.sep) or resume))
    if os.path.realpath(checkpoint_run) == os.path.realpath(output_dir):
        return
    recorded = (read_fingerprint(checkpoint_run) or {}).get("fingerprint")
    decision = foreign_checkpoint_decision(resume, checkpoint_run, recorded, fingerprint)
    if decision.action == "refuse":
        raise UsageError(decision.message)


def record_start(output_dir: str, start: RunStart, run_id: str | None, max_epochs: int) -> None:
    """Leader, right after :func:`decide_start`, before any slow step: name this launch in the folder and record
    the run's fingerprint. A start that will clear a previous run (--overwrite_output_dir) only marks the folder
    "clearing" here: the previous run's files (and fingerprint) stay until :func:`record_cleared`, after the data
    and the model have loaded, so that a bad input loses nothing."""
    if start.plan.remove_previous:
        write_launch_marker(output_dir, run_id, "clearing")
        return
    write_fingerprint(output_dir, start.fingerprint, max_epochs)
    write_launch_marker(output_dir, run_id, "started")


def record_cleared(output_dir: str, start: RunStart, run_id: str | None, max_epochs: int) -> None:
    """Leader, after the previous run's files were removed: the folder now holds this launch's run."""
    write_fingerprint(output_dir, start.fingerprint, max_epochs)
    write_launch_marker(output_dir, run_id, "started")


def undo_record_start(output_dir: str, start: RunStart) -> None:
    """Leader, when a first start fails before it wrote anything else (bad data, a model that does not load):
    remove the fingerprint and marker :func:`record_start` wrote, so the folder is as it was."""
    if start.plan.action == "check" and start.resume is None and not start.plan.remove_previous:
        for name in (FINGERPRINT_FILE, LAUNCH_MARKER):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, name))
