"""Who this process is in a launch: torchrun's launch id (kept across its restarts), the process's role for the
run lock, how many times torchrun restarted the worker group, and the process group a restarted group needs.
No torch: the process group a restarted worker group needs is started by
``review_lm.training.process_group.isolate_restarted_process_group``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


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


def restart_count(environ: Mapping[str, str]) -> int:
    """How many times torchrun restarted this worker group (0: first start, or not under torchrun)."""
    try:
        return max(0, int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def restart_store_prefix(environ: Mapping[str, str]) -> str | None:
    """The store prefix that keeps a restarted worker group's rendezvous apart from the dead one's, or None.

    torchrun shares its rendezvous TCP store with the workers and keeps it across restarts, so the keys the
    previous attempt's process group wrote (each rank's address) are still there. A restarted rank can read a dead
    peer's address and fail with "Gloo connectFullMesh failed ... Connection refused" (NCCL: refused connections,
    then a hang) - pytorch/pytorch#167288; it failed 3 runs in 5 of tests/test_fault_tolerance.py's restart test.
    Only a distributed restart (restart count > 0, world size > 1) needs it.
    """
    world_size = int(environ.get("WORLD_SIZE", "1") or 1)
    restarts = restart_count(environ)
    return f"movie_review/restart_{restarts}" if restarts and world_size > 1 else None
