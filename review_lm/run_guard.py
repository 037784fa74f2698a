"""Run records that never lie: one run per output folder, resume only the same run, restarts resume only this
launch, and a full disk ends in one line.

Three independent pieces, each decision a pure function (tested branch by branch); the few functions that touch
the file system are thin wrappers around them.

1. **Run fingerprint** - ``run_fingerprint`` records what defines a run (arguments that change what an optimizer
   step means, plus a sha256 over the data files' bytes); ``fingerprint_differences`` names what differs, one
   short phrase each; ``resume_decision`` turns that (and ``--max_epochs``) into resume / refuse.
2. **Run lock** - ``RunLock``: an exclusive, non-blocking ``fcntl.flock`` on ``<output_dir>/.run.lock``, taken by
   one process per launch (global rank 0), with the holder written into the file as JSON. The other ranks of the
   same launch wait until the holder names their launch (``launch_id``) and pass. See ``RunLock``.
3. **Launch marker** - ``<output_dir>/.launch.json`` names the launch whose files the folder holds;
   ``plan_restart`` lets a torchrun restart resume only what *this* launch started.
(Disk space and save failures live in ``disk_space``.)

Intended order in the train script (every rank unless said): ``lock = RunLock(out, launch_id()).acquire()``
first; ``plan_restart(restart_count, overwrite, resume, output_dir_state(out), lock.marker_at_start,
lock.run_id)``; the usual checks (check_output_dir, and ``resume_decision`` against the stored fingerprint when
resuming); leader: ``write_launch_marker(out, lock.run_id, "clearing" if plan.remove_previous else
"started")``, ``remove_partial_checkpoints`` before a resume, ``check_disk_space``; after clearing:
``write_launch_marker(out, lock.run_id)``; a failed save: ``raise explain_save_failure(...) from err``;
``lock.release()`` at exit (or ``with``).

Kept free of torch/transformers imports (like ``run_utils`` and ``fault_tolerance``) so that the checks run
before anything slow.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import data_loader_movie_review as dl
from review_lm import adapters, run_folder
from review_lm.fault_tolerance import (
    resolve_resume,
    restart_count,
)
from review_lm.run_folder import FINGERPRINT_FILE, LAUNCH_MARKER, LOCK_FILE
from review_lm.utils import UsageError, write_json_atomic

logger = logging.getLogger("movie_review")

FINGERPRINT_VERSION = 1
_CHUNK = 1 << 20  # data files are hashed in 1 MiB chunks: memory stays flat for any file size


# ==============================================================================================================
# 1. Run fingerprint
# ==============================================================================================================
# Train-script arguments that may differ on resume: where and how often things are logged or saved, how the
# same maths is computed, and when to stop. They are left out of the fingerprint. --max_epochs is handled by
# resume_decision (it may only grow). Everything else the caller passes defines the run: batch size and
# gradient accumulation (what one optimizer step averages over), learning rate and warmup (the schedule),
# seed (the data order), precision (the optimizer and its state), packing (the sampler), LoRA settings, ...
MAY_CHANGE_ON_RESUME = frozenset({
    "data_file",  # the paths: the data's *content* is what defines the run (moved files resume fine)
    "output_dir", "max_epochs", "early_stopping_patience", "logging_steps", "save_steps", "eval_steps",
    "gradient_checkpointing", "disable_flash_attn", "disable_completion_only_logits", "trust_remote_code",
    "report_to", "wandb_project", "wandb_run_name", "resume_from_checkpoint", "overwrite_output_dir",
    "preview_only", "save_format", "merge_lora", "keep_checkpoints",
})


def files_digest(paths: Iterable[str]) -> str:
    """sha256 over the files' bytes in the given order, read in 1 MiB chunks.

    Each file contributes its byte length (8 bytes, big-endian) before its bytes, so moving bytes from the end of
    one file to the start of the next changes the digest; the names do not enter it (the same data in another
    folder has the same digest)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.getsize(path).to_bytes(8, "big"))
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """The value as it will read back from JSON (tuples become lists, unknown objects their str())."""
    return json.loads(json.dumps(value, default=str, ensure_ascii=False))


def run_fingerprint(arguments: Mapping[str, Any], data_files: Sequence[str] = (),
                    resolved: Mapping[str, Any] | None = None,
                    may_change: frozenset[str] = MAY_CHANGE_ON_RESUME) -> dict[str, Any]:
    """What defines a run, as a plain JSON-able dict (to store in the run folder and compare on resume).

    ``arguments``: command-line options by dest name (e.g. ``vars(args)``), shown as ``--name`` in differences;
    names in ``may_change`` are dropped. ``data_files``: every data file read, in load order (directories
    expanded), hashed with ``files_digest``. ``resolved``: derived facts that define the run too (e.g.
    ``world_size``: with batch size and accumulation it fixes the effective batch), shown by their plain name.
    """
    files = [os.path.abspath(p) for p in data_files]
    return {
        "version": FINGERPRINT_VERSION,
        "arguments": _jsonable({k: v for k, v in sorted(arguments.items()) if k not in may_change}),
        "resolved": _jsonable(dict(sorted((resolved or {}).items()))),
        "data": {"files": files, "bytes": sum(os.path.getsize(p) for p in files), "sha256": files_digest(files)},
    }


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """A short stable id of a fingerprint (sha256 of its canonical JSON, 16 hex digits) for logs and names.

    The data files' paths are left out, like in ``fingerprint_differences``: only their content counts."""
    canonical = dict(fingerprint)
    if isinstance(canonical.get("data"), Mapping):
        canonical["data"] = {k: v for k, v in canonical["data"].items() if k != "files"}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_UNSET = object()


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        text = " ".join(_show(v) for v in value) or "[]"
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one short phrase each (``--max_length 4096 -> 2048``,
    ``--data_file content changed``); empty when they define the same run. Pure."""
    if recorded.get("version") != current.get("version"):
        return [f"run fingerprint format {recorded.get('version')} -> {current.get('version')} (cannot compare)"]
    out = []
    for section, prefix in (("arguments", "--"), ("resolved", "")):
        old, new = recorded.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, _UNSET), new.get(key, _UNSET)
            if a != b:
                out.append(f"{prefix}{key} {_show(a)} -> {_show(b)}")
    old_data, new_data = recorded.get("data") or {}, current.get("data") or {}
    if old_data.get("sha256") != new_data.get("sha256"):
        n_old, n_new = len(old_data.get("files") or []), len(new_data.get("files") or [])
        counts = f" ({n_old} files -> {n_new})" if n_old != n_new else ""
        out.append(f"--data_file content changed{counts}")
    return out


class ResumeDecision(NamedTuple):
    """``action``: "resume" or "refuse". ``message``: for "refuse" the one-line error; for "resume" a line to
    log (or None when there is nothing to say)."""

    action: str
    message: str | None


def resume_decision(recorded_fp: Mapping[str, Any] | None, current_fp: Mapping[str, Any], finished: bool,
                    recorded_max_epochs: int | None, new_max_epochs: int,
                    output_dir: str = "--output_dir") -> ResumeDecision:
    """May ``--resume_from_checkpoint`` continue the run recorded in ``output_dir``? Pure.

    Refused when the fingerprints differ (one line naming each difference), when --max_epochs shrinks, and when
    the run already finished unless --max_epochs grows. A folder without a fingerprint (a run written before
    fingerprints existed) resumes with a warning that nothing could be checked. Note for a run that finished by
    early stopping: Trainer restores the early-stopping state, so more epochs stop again at the next evaluation
    that does not improve.
    """
    where = output_dir
    if recorded_fp is None:
        return ResumeDecision("resume", f"{where} has no run fingerprint (an older run): resuming without "
                                        "checking that the arguments and data are the same")
    differences = fingerprint_differences(recorded_fp, current_fp)
    if differences:
        return ResumeDecision("refuse", f"cannot resume the run in {where}: it was trained with other settings "
                                        f"({'; '.join(differences)}); resume with the same arguments and data, "
                                        "or start a new run in another --output_dir")
    grew = recorded_max_epochs is not None and new_max_epochs > recorded_max_epochs
    if recorded_max_epochs is not None and new_max_epochs < recorded_max_epochs:
        return ResumeDecision("refuse", f"cannot resume the run in {where} with --max_epochs {new_max_epochs}: "
                                        f"it was started with {recorded_max_epochs}, and --max_epochs may only "
                                        "grow on resume")
    if finished and not grew:
        return ResumeDecision("refuse", f"the run in {where} already finished; nothing to resume (pass a "
                                        "larger --max_epochs to train on, or choose another --output_dir)")
    if grew:
        state = "finished" if finished else "was started"
        return ResumeDecision("resume", f"the run in {where} {state} with --max_epochs {recorded_max_epochs}; "
                                        f"training on to {new_max_epochs} epochs (the learning-rate schedule "
                                        "now spans the new length)")
    return ResumeDecision("resume", None)


# ==============================================================================================================
# 2. Run lock
# ==============================================================================================================
def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces
    except (OSError, IndexError):
        return None


def launch_id(environ: Mapping[str, str] = os.environ, agent: str | None = None) -> str | None:
    """An id shared by every rank of one launch on one node and kept across its torchrun restarts; None when
    not under torchrun (a single process: nothing to share).

    ``TORCHELASTIC_RUN_ID`` is unique per launch when torchrun makes it (single node without --master_port: a
    uuid) or when the user passes a per-job --rdzv-id. It is the literal "none" with a static rendezvous
    (--master_port, or --nnodes > 1 without --rdzv-id): then the torchrun agent - the workers' parent process,
    the same for every local rank and for every restart - is added (host, pid and start time). ``agent`` is for
    tests."""
    run_id = environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    if run_id != "none":
        return run_id
    if agent is None:
        parent = os.getppid()
        agent = f"{socket.gethostname()}:{parent}:{_process_start(parent) or '?'}"
    return f"none@{agent}"


def lock_role(environ: Mapping[str, str] = os.environ) -> str:
    """'leader' (global rank 0, or no rank: takes the flock), 'follower' (another rank on the leader's node:
    waits for the leader's holder record) or 'other_node' (a rank on another node: passes unchecked)."""
    if environ.get("RANK", "0") in ("", "0"):
        return "leader"
    return "follower" if environ.get("GROUP_RANK", "0") in ("", "0") else "other_node"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        value = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def describe_holder(holder: Mapping[str, Any] | None) -> str:
    """``pid 1234 on host h, started 2024-05-01 12:00:01`` (or that nothing is recorded)."""
    if not holder:
        return "holder not recorded"
    started = holder.get("started")
    try:
        started = datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        pass
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {started or '?'}"


def lock_holder(output_dir: str) -> dict[str, Any] | None:
    """The holder recorded in ``output_dir``'s lock file (None: none, or released)."""
    return _read_json(os.path.join(output_dir, LOCK_FILE))


class RunLock:
    """One training run per output folder, for the run's whole life.

    *File.* ``<output_dir>/.run.lock``. ``acquire`` creates ``output_dir`` if needed: a refused or failed start
    leaves at most the empty folder and this hidden file, which ``output_dir_state`` counts as 'empty'. The file
    is never deleted (deleting a locked file lets a third process lock a new file of the same name while the
    second still waits on the old one); on release it is emptied. A folder-clearing step must keep it (today's
    ``remove_previous_run`` deletes known names only, so it does) - likewise ``.launch.json``.

    *Who locks.* The leader (global rank 0, or the only process) takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` and
    writes the holder as JSON: pid, host, run id, torchrun restart count, start time, and the launch marker it
    found (``marker_at_start``) - before it changes anything. A second launch is refused at once with one line
    naming the holder. The kernel drops a flock when its process dies, but the holder text stays: a leader that
    finds text in a free lock takes it over and logs one line naming the dead holder.

    *Ranks of one launch.* The other ranks never flock (a shared lock would make the leader's exclusive one
    fail). A follower waits (``timeout`` s, polling) until the holder names its ``launch_id`` *and* its restart
    count, then passes and takes ``marker_at_start`` from the holder, so every rank plans the same start even
    after the leader rewrote the marker. If the leader is refused, it exits with the error and torchrun stops the
    followers; a follower only times out if that does not happen.

    *torchrun restarts.* All workers are restarted, so the previous attempt's leader is dead and its flock free:
    the new leader takes the lock back (the same launch id, a new pid) and logs the takeover.

    *Limitations.* Multi-node: only the leader's node checks. Ranks on other nodes (GROUP_RANK > 0) pass without
    reading the holder (their restart count may differ from node 0's, and with a "none" rendezvous id their
    launch id cannot match), so they have no ``marker_at_start``: take the start plan from rank 0 (broadcast)
    there. flock over NFSv4 works across clients on Linux; some network/FUSE file systems lock per host only.
    A process forked (not exec'ed) from the leader shares the lock while it lives.
    """

    def __init__(self, output_dir: str, run_id: str | None = None, *, environ: Mapping[str, str] = os.environ,
                 log: Callable[[str], None] = logger.warning, timeout: float = 120.0, poll: float = 0.05):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.role = lock_role(environ)
        self.restart = restart_count(environ)
        self.run_id = run_id
        self._log, self._timeout, self._poll = log, timeout, poll
        self._fd: int | None = None
        self._created = False  # this lock made output_dir: a failed start removes it again
        self._created_file = False  # this lock made the lock file: it is removed again on release
        self.holder: dict[str, Any] | None = None  # the leader's record (own, or the one a follower accepted)
        self.verified = False  # True once this process holds the lock or saw its launch's leader hold it

    @property
    def marker_at_start(self) -> dict[str, Any] | None:
        """The launch marker as the leader found it when it took the lock (before it wrote its own)."""
        return (self.holder or {}).get("marker_at_start")

    def acquire(self) -> RunLock:
        if self.role == "leader":
            self._acquire_leader()
        elif self.role == "follower" and self.run_id is not None:
            self._wait_for_leader()
        return self

    def _acquire_leader(self) -> None:
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise UsageError(f"--output_dir {self.output_dir} exists and is not a directory")
        self._created = not os.path.exists(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        self._created_file = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'ed children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._read_holder_soon()
            raise UsageError(f"{self.output_dir} is in use by another training run ({describe_holder(holder)}); "
                             "wait for it or choose another --output_dir") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            previous = _read_json(self.path)
            if previous:
                same = self.run_id is not None and previous.get("run_id") == self.run_id
                self._log(f"{self.output_dir}: taking over the run lock of a dead training run "
                          f"({describe_holder(previous)}){'; an earlier attempt of this launch' if same else ''}")
            self.holder = {
                "pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "restart": self.restart, "started": datetime.now().isoformat(timespec="seconds"),
                "marker_at_start": read_launch_marker(self.output_dir),
            }
            data = (json.dumps(self.holder, ensure_ascii=False) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the flock
            raise
        self._fd = fd
        self.verified = True

    def _read_holder_soon(self) -> dict[str, Any] | None:
        """The holder record; the holder may still be writing it just after it took the flock."""
        deadline = time.monotonic() + 0.5
        while (holder := _read_json(self.path)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return holder

    def _wait_for_leader(self) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            holder = _read_json(self.path)
            if holder and holder.get("run_id") == self.run_id and holder.get("restart") == self.restart:
                self.holder, self.verified = holder, True
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(self._poll)
        other = (f"it is held by another training run ({describe_holder(holder)})" if holder
                 else "it is not held")
        raise UsageError(f"{self.output_dir}: waited {self._timeout:g} s for rank 0 of this launch to take the "
                         f"run lock, but {other}; wait for it or choose another --output_dir")

    def release(self) -> None:
        """Empty the holder record and drop the flock (idempotent; a follower has nothing to release)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder: the next start has nothing "dead" to report
            # Leave the folder as it was found: remove the lock file this lock made (still locked here), and
            # the folder too when this lock made it and nothing else was written. (A third launch that opened
            # the file in the instant before its removal could then lock the removed file: launches racing
            # within milliseconds are not guarded against.)
            if self._created_file:
                os.remove(self.path)
            if self._created and not os.listdir(self.output_dir):
                os.rmdir(self.output_dir)
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ==============================================================================================================
# 3. Launch marker and the restart decision
# ==============================================================================================================
def write_launch_marker(output_dir: str, run_id: str | None, phase: str = "started") -> None:
    """Record (atomically) that ``output_dir`` now belongs to launch ``run_id``. Leader only, under the lock.

    ``phase`` "clearing": written before --overwrite_output_dir deletes the previous run; "started": once the
    folder holds only this launch's files (after the clearing, or at once when nothing is cleared). Write it as
    soon as the start checks passed, before the first slow step (data, model)."""
    if phase not in ("clearing", "started"):
        raise ValueError(f"phase must be 'clearing' or 'started', not {phase!r}")
    write_json_atomic(os.path.join(output_dir, LAUNCH_MARKER),
                      {"run_id": run_id, "phase": phase, "pid": os.getpid(),
                       "written": datetime.now().isoformat(timespec="seconds")})


def read_launch_marker(output_dir: str) -> dict[str, Any] | None:
    """The launch marker, or None when absent or unreadable."""
    return _read_json(os.path.join(output_dir, LAUNCH_MARKER))


@dataclass(frozen=True)
class LaunchPlan:
    """Like ``fault_tolerance.StartPlan``. ``check``: judge output_dir as a first start (check_output_dir,
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


def read_fingerprint(output_dir: str) -> dict[str, Any] | None:
    """The fingerprint record of the run in ``output_dir`` (``{"fingerprint": ..., "max_epochs": N}``), if any."""
    return _read_json(os.path.join(output_dir, FINGERPRINT_FILE))


def write_fingerprint(output_dir: str, fingerprint: Mapping[str, Any], max_epochs: int) -> None:
    write_json_atomic(os.path.join(output_dir, FINGERPRINT_FILE),
                      {"fingerprint": fingerprint, "digest": fingerprint_digest(fingerprint), "max_epochs": max_epochs})


def current_fingerprint(args, world_size: int) -> dict[str, Any]:
    """The run's fingerprint from its arguments and data files (their bytes are hashed, not parsed: seconds for a
    million reviews); a file that cannot be read is the loader's one-line error."""
    files = dl.expand_data_paths(args.data_file)
    for file in files:
        try:
            with open(file, "rb"):
                pass
        except FileNotFoundError:
            raise dl.ReviewDataError(file, "file not found") from None
        except IsADirectoryError:
            raise dl.ReviewDataError(file, "is a directory, not a JSON file") from None
        except OSError as err:
            raise dl.ReviewDataError(file, f"cannot read file: {err.strerror or err}") from None
    return run_fingerprint(vars(args), files, {"world_size": world_size})


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
    adapters.check_resume(resume, args.finetuning_type)  # the clearer line for a LoRA/full mix-up
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
