"""Run records that never lie: one run per output folder, resume only the same run, restarts resume only this
launch, and a full disk ends in one line.

Four independent pieces, each decision a pure function (tested branch by branch); the few functions that touch
the file system are thin wrappers around them.

1. **Run fingerprint** - ``run_fingerprint`` records what defines a run (arguments that change what an optimizer
   step means, plus a sha256 over the data files' bytes); ``fingerprint_differences`` names what differs, one
   short phrase each; ``resume_decision`` turns that (and ``--max_epochs``) into resume / refuse.
2. **Run lock** - ``RunLock``: an exclusive, non-blocking ``fcntl.flock`` on ``<output_dir>/.run.lock``, taken by
   one process per launch (global rank 0), with the holder written into the file as JSON. The other ranks of the
   same launch wait until the holder names their launch (``launch_id``) and pass. See ``RunLock``.
3. **Launch marker** - ``<output_dir>/.launch.json`` names the launch whose files the folder holds;
   ``plan_restart`` lets a torchrun restart resume only what *this* launch started.
4. **Disk space and save failures** - ``estimate_run_bytes`` / ``disk_space_warning`` before training;
   ``is_disk_full`` / ``describe_save_failure`` / ``remove_partial_checkpoints`` when a save fails.

Measured here (torch 2.13, safetensors, tmpfs): a full disk does *not* always raise ``OSError(ENOSPC)``.
``torch.save`` (optimizer.pt, rng_state.pth, pytorch_model.bin) raises ``RuntimeError('[enforce fail at
inline_container.cc:672] . unexpected pos 576 vs 534')`` with no errno; safetensors raises ``SafetensorError(
'... No space left on device (os error 28)')``; plain ``open().write`` raises ``OSError(28)``. ``is_disk_full``
recognises all three.

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

import errno
import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from fault_tolerance import (
    checkpoint_problem,
    checkpoints_newest_first,
    latest_complete_checkpoint,
    restart_count,
)
from run_utils import UsageError, write_json_atomic

logger = logging.getLogger("movie_review")

LOCK_FILE = ".run.lock"  # flock'ed by the run's leader; holds the holder as JSON while the run lives
LAUNCH_MARKER = ".launch.json"  # which launch's files the folder holds (see plan_restart)
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
    "preview_only", "save_format", "merge_lora",
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
        os.makedirs(self.output_dir, exist_ok=True)
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
    if state == "unfinished":
        return LaunchPlan("resume", "latest", False,
                          f"torchrun restart {restarts}: resuming this launch's latest complete checkpoint")
    explicit = resume if resume not in (None, "latest") else None  # a checkpoint from another folder
    return LaunchPlan("resume", explicit, False,
                      f"torchrun restart {restarts}: no checkpoint of this launch yet; "
                      + (f"starting again from {explicit}" if explicit else "starting from scratch"))


# ==============================================================================================================
# 4. Disk space and save failures
# ==============================================================================================================
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


def existing_parent(path: str) -> str:
    """``path`` itself, or its nearest existing parent folder (the output folder may not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(path: str) -> int:
    """Free bytes on the file system that holds (or will hold) ``path``."""
    return shutil.disk_usage(existing_parent(path)).free


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
