"""Checkpoints a run can resume from: which are complete, which one a resume starts from, and the command that
resumes a run.

What transformers 5.24 guarantees (read in ``Trainer._save_checkpoint``): nothing atomic. A checkpoint is written
straight into ``output_dir/checkpoint-N`` (no temporary folder, no rename), in this order: the model files
(weights, config, tokenizer, training_args.bin), ``optimizer.pt`` + ``scheduler.pt`` (rank 0), the RNG state
(``rng_state.pth``, or ``rng_state_<rank>.pth`` per rank under DDP), and last ``trainer_state.json`` (rank 0).
Each file is a plain ``torch.save``/``save_file`` without fsync. A process killed mid-save therefore leaves a
folder without ``trainer_state.json`` or with a truncated file, and ``transformers.trainer_utils.
get_last_checkpoint`` would pick it anyway (it only looks at the folder name). ``checkpoint_problem`` defines
"complete" from that write order and checks each container cheaply (zip directory / safetensors header), so
the torn case is caught too, not only the missing-file case.

Decisions are pure functions (``resolve_resume``, ``check_resume``, ``resume_command``) tested branch by branch.
What a start or a torchrun restart does with the folder is ``review_lm.runs.restart``; the SIGTERM/SIGINT stop
that saves a checkpoint is ``review_lm.training.graceful_stop``. No torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import struct
import zipfile
from collections.abc import Callable, Mapping

from review_lm.runs import run_folder
from review_lm.runs.run_folder import (
    ADAPTER_WEIGHT_FILES,
    CHECKPOINT_RE,
    FSDP_WEIGHTS_PREFIX,
    TRAINER_STATE,
    WEIGHT_FILES,
    WEIGHT_INDEXES,
)
from review_lm.utils import UsageError

logger = logging.getLogger("movie_review")

# Trainer's save_total_limit: with load_best_model_at_end it keeps the best checkpoint plus the latest. The one
# number of checkpoints a run keeps while it trains (the train script passes it; disk_space counts from it).
CHECKPOINTS_KEPT = 2

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
    except (OSError, struct.error, ValueError, RecursionError):  # RecursionError: a hostile header
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
            except (OSError, ValueError, KeyError, RecursionError):
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
    except (OSError, ValueError, KeyError, RecursionError):
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
    """Paths of ``output_dir``'s checkpoint-N folders, newest step first (``run_folder.checkpoint_names``)."""
    return [os.path.join(output_dir, n) for n in reversed(run_folder.checkpoint_names(output_dir))]


def latest_complete_checkpoint(output_dir: str, log: Callable[[str], None] = logger.warning) -> str | None:
    """The newest complete checkpoint-N in ``output_dir``; each newer incomplete one is skipped with one line."""
    for folder in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"skipping incomplete checkpoint {folder}: {problem}")
    return None


# --------------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------------
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
# The exact command that resumes a run
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


def checkpoint_kind(checkpoint_dir: str) -> str | None:
    """The fine-tuning type ('lora' / 'full') a checkpoint was written by, from the run folder's one
    classifier (:func:`run_folder.model_kind`); None if it holds no model."""
    kind = run_folder.model_kind(checkpoint_dir)
    return {run_folder.KIND_ADAPTER: "lora", run_folder.KIND_FULL: "full"}.get(kind) if kind else None


def check_resume(checkpoint: str | None, finetuning_type: str) -> None:
    """Resuming a LoRA checkpoint as a full run (or the reverse) would fail deep inside Trainer: say so now.

    ``checkpoint`` is the folder the run will resume from (:func:`resolve_resume`), or None.
    """
    if checkpoint is None:
        return
    path = checkpoint
    kind = checkpoint_kind(path)
    if kind is not None and kind != finetuning_type:
        raise UsageError(f"--resume_from_checkpoint {path} holds a {kind} fine-tuning checkpoint; resume it with "
                         f"--finetuning_type {kind}")
