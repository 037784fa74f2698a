"""Long runs survive faults: complete-checkpoint detection, elastic-restart resume, graceful SIGTERM/SIGINT stop,
checkpoint/evaluation cadence.

What transformers 5.24 guarantees (read in ``Trainer._save_checkpoint``): nothing atomic. A checkpoint is written
straight into ``output_dir/checkpoint-N`` (no temporary folder, no rename), in this order: the model files
(weights, config, tokenizer, training_args.bin), ``optimizer.pt`` + ``scheduler.pt`` (rank 0), the RNG state
(``rng_state.pth``, or ``rng_state_<rank>.pth`` per rank under DDP), and last ``trainer_state.json`` (rank 0).
Each file is a plain ``torch.save``/``save_file`` without fsync. A process killed mid-save therefore leaves a
folder without ``trainer_state.json`` or with a truncated file, and ``transformers.trainer_utils.
get_last_checkpoint`` would pick it anyway (it only looks at the folder name). ``checkpoint_problem`` defines
"complete" from that write order and checks each container cheaply (zip directory / safetensors header), so
the torn case is caught too, not only the missing-file case.

Decisions are pure functions (``plan_start``, ``checkpoint_schedule``, ``resume_command``) tested branch by branch;
``GracefulStop`` is the TrainerCallback that turns a signal into "finish this step, save, stop" on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from review_lm.run_folder import (
    ADAPTER_WEIGHT_FILES,
    CHECKPOINT_RE,
    FSDP_WEIGHTS_PREFIX,
    TRAINER_STATE,
    WEIGHT_FILES,
    WEIGHT_INDEXES,
)
from review_lm.utils import UsageError

logger = logging.getLogger("movie_review")

# Weight files of a full model, an adapter (LoRA) or an FSDP sharded state, in Trainer's naming.
_WEIGHTS = (*WEIGHT_FILES, *ADAPTER_WEIGHT_FILES)


# --------------------------------------------------------------------------------------------------------------
# Complete checkpoints
# --------------------------------------------------------------------------------------------------------------
def _zip_problem(path: str) -> str | None:
    """torch.save writes a zip archive whose directory sits at the end: a truncated file has none."""
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return f"{os.path.basename(path)} is truncated or unreadable"


def _safetensors_problem(path: str) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors: the sizes must add up."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return f"{name} is truncated"
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError):
        return f"{name} is truncated or unreadable"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if size == 8 + header_len + end else f"{name} is truncated"


def _file_problem(path: str) -> str | None:
    if path.endswith(".safetensors"):
        return _safetensors_problem(path)
    if path.endswith((".pt", ".pth", ".bin")):
        return _zip_problem(path)
    return None


def _weights_problem(folder: str, names: set[str]) -> str | None:
    for index in WEIGHT_INDEXES:
        if index in names:  # sharded weights: every shard the index names must be there and whole
            try:
                with open(os.path.join(folder, index), encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError):
                return f"{index} is unreadable"
            for shard in shards:
                if shard not in names:
                    return f"missing weight shard {shard}"
                if problem := _file_problem(os.path.join(folder, shard)):
                    return problem
            return None
    present = [n for n in _WEIGHTS if n in names]
    if not present:
        if any(n.startswith(FSDP_WEIGHTS_PREFIX) for n in names):  # FSDP sharded state dict (a folder)
            return None
        return "no model weights"
    for name in present:
        if problem := _file_problem(os.path.join(folder, name)):
            return problem
    return None


def checkpoint_problem(folder: str) -> str | None:
    """None when ``folder`` is a complete Trainer checkpoint, else what is wrong (for a log line)."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return "not a readable folder"
    if TRAINER_STATE not in names:
        return f"no {TRAINER_STATE} (the save was interrupted)"
    try:
        with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as f:
            step = json.load(f)["global_step"]
    except (OSError, ValueError, KeyError):
        return f"{TRAINER_STATE} is truncated or unreadable"
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
    if match and int(match.group(1)) != step:
        return f"{TRAINER_STATE} says step {step}"
    if problem := _weights_problem(folder, names):
        return problem
    if DEEPSPEED_LATEST in names:  # DeepSpeed keeps optimizer (and its scheduler) states in its own folder
        optimizer, problem = _deepspeed_states(folder)
        if problem:
            return problem
    else:
        optimizer = [n for n in names if n in ("optimizer.pt", "optimizer.bin") or n.endswith("-optimizer.pt")
                     or n.startswith("optimizer_")]  # plain, per-rank and FSDP sharded optimizer states
        if not optimizer:
            return "no optimizer.pt"
        if "scheduler.pt" not in names:
            return "no scheduler.pt"
    # Rank 0's RNG file precedes trainer_state.json; other ranks' may lag behind it (no barrier in between), so
    # require one and check that every one present is whole (a torn file would crash torch.load on resume).
    rng = sorted(n for n in names if re.match(r"^rng_state(_\d+)?\.pth$", n))
    if not rng:
        return "no rng_state*.pth"
    for name in [*optimizer, *(["scheduler.pt"] if "scheduler.pt" in names else []), *rng]:
        if problem := _file_problem(os.path.join(folder, name)):
            return problem
    return None


DEEPSPEED_LATEST = "latest"  # DeepSpeed's save_checkpoint: names the global_stepN folder holding the states


def _deepspeed_states(folder: str) -> tuple[list[str], str | None]:
    """The optimizer/model state files of a DeepSpeed checkpoint (relative to ``folder``), or what is missing.

    Under ``--deepspeed`` Trainer writes no optimizer.pt: ``engine.save_checkpoint`` writes ``latest`` and a
    ``global_stepN/`` folder with ``*_optim_states.pt`` (one per rank) and ``*_model_states.pt``.
    """
    try:
        with open(os.path.join(folder, DEEPSPEED_LATEST), encoding="utf-8") as f:
            tag = f.read().strip()
        states = os.listdir(os.path.join(folder, tag))
    except OSError:
        return [], "DeepSpeed 'latest' names no readable state folder"
    optim = sorted(os.path.join(tag, n) for n in states if n.endswith("optim_states.pt"))
    model = sorted(os.path.join(tag, n) for n in states if n.endswith("model_states.pt"))
    if not optim or not model:
        return [], f"no DeepSpeed {'optimizer' if not optim else 'model'} states in {tag}/"
    return optim + model, None


def checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: str, log: Callable[[str], None] = logger.warning) -> str | None:
    """The newest complete checkpoint-N in ``output_dir``; each newer incomplete one is skipped with one line."""
    for folder in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"skipping incomplete checkpoint {folder}: {problem}")
    return None


# --------------------------------------------------------------------------------------------------------------
# What to do with output_dir at start
# --------------------------------------------------------------------------------------------------------------
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


def isolate_restarted_process_group(environ: Mapping[str, str]) -> str | None:
    """Initialise the default process group of a restarted worker group on a store prefixed by its restart count.

    Done before TrainingArguments: accelerate reuses an initialised default group (``if not
    torch.distributed.is_initialized()``). Same store as torch's env:// rendezvous would make (agent store: every
    rank a client; otherwise rank 0 hosts it), same default backend choice (gloo for CPU tensors, NCCL for CUDA).
    Returns the prefix used, or None when nothing was needed.
    """
    prefix = restart_store_prefix(environ)
    if prefix is None:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return None
    rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    timeout = timedelta(minutes=30)  # torch's default process-group timeout
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=not agent_store)
    dist.init_process_group(store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                            timeout=timeout)
    return prefix


@dataclass(frozen=True)
class StartPlan:
    """``check``: a first start, judged by the train script's check_output_dir as before. ``resume``: an elastic
    restart continuing from the latest complete checkpoint (or from scratch when there is none yet).
    ``finished``: an elastic restart that finds the run already finished: nothing to do."""

    action: str  # check | resume | finished
    resume: str | None  # what to pass on as --resume_from_checkpoint ("latest", a path, or None)
    remove_previous: bool  # may --overwrite_output_dir delete the previous run's files?


def plan_start(state: str, resume: str | None, overwrite: bool, restarts: int) -> StartPlan:
    """Decide from output_dir's state ('empty' | 'unfinished' | 'finished'), the flags and the restart count.

    A restarted worker group runs the same command line as the first start, so its flags describe the first
    start: --overwrite_output_dir already did its work then (deleting again would delete this job's own
    checkpoints), and the newest progress is in output_dir, not in an explicitly given older checkpoint.
    """
    if restarts == 0:
        return StartPlan("check", resume, overwrite and resume is None)
    if state == "finished":  # the group died after the final marker was written (e.g. during teardown)
        return StartPlan("finished", None, False)
    if state == "unfinished":
        return StartPlan("resume", "latest", False)
    # No checkpoint yet: an explicitly given checkpoint (from another folder) is still the right start point.
    return StartPlan("resume", resume if resume not in (None, "latest") else None, False)


def resolve_resume(resume: str | None, output_dir: str, restarts: int,
                   log: Callable[[str], None] = logger.warning) -> str | None:
    """Turn --resume_from_checkpoint (None | 'latest' | PATH) into a complete checkpoint folder, or raise.

    On a restart with no complete checkpoint yet, None: the restarted group starts from scratch."""
    if resume is None:
        return None
    if resume != "latest":
        problem = checkpoint_problem(resume)
        if problem:
            raise UsageError(f"--resume_from_checkpoint {resume}: incomplete checkpoint ({problem})")
        return resume
    found = latest_complete_checkpoint(output_dir, log)
    if found is None and restarts == 0:
        raise UsageError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {output_dir}")
    return found


# --------------------------------------------------------------------------------------------------------------
# Checkpoint and evaluation cadence
# --------------------------------------------------------------------------------------------------------------
def checkpoint_schedule(save_steps: int, eval_steps: int, has_val: bool) -> dict[str, Any]:
    """TrainingArguments for when to evaluate and save. 0 = once per epoch (the default).

    Reloading the best model at the end needs an evaluation at every checkpoint (transformers requires
    matching strategies and save_steps a multiple of eval_steps), so a step given for one is used for both.
    """
    if has_val and save_steps and eval_steps and save_steps % eval_steps:
        raise UsageError(f"--save_steps {save_steps} must be a multiple of --eval_steps {eval_steps}: the best "
                         "model is reloaded at the end, so every checkpoint needs an evaluation")
    if not has_val:
        eval_steps = 0
    save = save_steps or eval_steps
    evaluate = eval_steps or save_steps
    kwargs: dict[str, Any] = {"save_strategy": "steps" if save else "epoch"}
    if save:
        kwargs["save_steps"] = save
    if has_val:
        kwargs["eval_strategy"] = "steps" if evaluate else "epoch"
        if evaluate:
            kwargs["eval_steps"] = evaluate
    else:
        kwargs["eval_strategy"] = "no"
    return kwargs


# --------------------------------------------------------------------------------------------------------------
# Graceful stop on SIGTERM / SIGINT
# --------------------------------------------------------------------------------------------------------------
def resume_command(argv: list[str], script: str, environ: Mapping[str, str]) -> str:
    """The command that continues this run: the same arguments with a bare --resume_from_checkpoint."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--resume_from_checkpoint":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        if arg.startswith("--resume_from_checkpoint=") or arg == "--overwrite_output_dir":
            continue
        kept.append(arg)
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        launcher = ["torchrun", f"--nproc_per_node={environ.get('LOCAL_WORLD_SIZE', environ['WORLD_SIZE'])}"]
        if int(environ.get("GROUP_WORLD_SIZE", "1")) > 1:
            launcher.append(f"--nnodes={environ['GROUP_WORLD_SIZE']}")
    else:
        launcher = ["python"]
    return shlex.join([*launcher, script, *kept, "--resume_from_checkpoint"])


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
