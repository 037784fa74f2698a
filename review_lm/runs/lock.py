"""One training run per output folder: the run lock, and the launch marker that says which launch's files the
folder holds.

``RunLock``: an exclusive, non-blocking ``fcntl.flock`` on ``<output_dir>/.run.lock``, taken by one process per
launch (global rank 0), with the holder written into the file as JSON. The other ranks of the same launch wait
until the holder names their launch (``launch_id``) and pass. ``<output_dir>/.launch.json`` (the launch marker)
names the launch whose files the folder holds; ``review_lm.runs.restart.plan_restart`` reads it so that a torchrun
restart resumes only what *this* launch started.

Kept free of torch/transformers imports so that the checks run before anything slow.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from review_lm.runs import run_folder
from review_lm.runs.launch import lock_role, restart_count
from review_lm.runs.run_folder import LAUNCH_MARKER, LOCK_FILE
from review_lm.utils import UsageError, write_json_atomic

logger = logging.getLogger("movie_review")


# ==============================================================================================================
# 2. Run lock
# ==============================================================================================================
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
            previous = run_folder.read_record(self.path)
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
        while (holder := run_folder.read_record(self.path)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return holder

    def _wait_for_leader(self) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            holder = run_folder.read_record(self.path)
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
# Is a run folder being trained right now? Read without taking the lock
# ==============================================================================================================
def _flocked_inodes(proc_locks: str) -> set[tuple[str, int]] | None:
    """``(maj:min, inode)`` of every flock in /proc/locks' text (devices in hex, as the kernel prints them)."""
    found = set()
    for line in proc_locks.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].count(":") == 2:
            device, _, inode = fields[5].rpartition(":")
            if inode.isdigit():
                found.add((device, int(inode)))
    return found


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def training_holder(output_dir: str) -> dict[str, Any] | None:
    """The holder record of the training run that holds ``output_dir``'s run lock now, or None when none does.

    Read without taking the lock (a probe flock, even a shared one released at once, could make a training
    start that races it fail its exclusive one): the kernel's list of flocks in /proc/locks says whether the lock
    file is locked; where that list cannot be read, a holder record whose pid is alive on this host counts."""
    lock_path = os.path.join(output_dir, LOCK_FILE)
    try:
        st = os.stat(lock_path)
    except OSError:
        return None
    holder = run_folder.read_record(lock_path)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            locked = _flocked_inodes(f.read())
    except OSError:
        locked = None
    if locked is not None:
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        # Some file systems (overlay) list another device number than stat reports: the inode and a holder
        # record (emptied on every clean release) decide then.
        held = (device, st.st_ino) in locked or (bool(holder) and any(i == st.st_ino for _, i in locked))
    else:
        held = bool(holder) and holder.get("host") == socket.gethostname() and _pid_alive(holder.get("pid"))
    return (holder or {}) if held else None


def check_not_in_training(model_dir: str) -> None:
    """Refuse (one line) to evaluate a run folder that a live training run holds: what is on disk may change
    under the evaluation. A finished checkpoint folder (``RUN/checkpoint-N``) holds no lock and passes."""
    holder = training_holder(model_dir)
    if holder is not None:
        raise UsageError(f"--model_dir {model_dir} is being trained right now ({describe_holder(holder)}): its files "
                         "may change while they are read; wait for the run to finish, or evaluate one of its "
                         "finished checkpoints with --model_dir " + os.path.join(model_dir, "checkpoint-N"))


# ==============================================================================================================
# Launch marker
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
    return run_folder.read_record(os.path.join(output_dir, LAUNCH_MARKER))
