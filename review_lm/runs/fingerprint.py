"""Run fingerprints: what defines a run, so that a resume continues only the same run.

``run_fingerprint`` records the arguments that change what an optimizer step means, plus a sha256 over the data
files' bytes; ``fingerprint_differences`` names what differs, one short phrase each; ``resume_decision`` turns
that (and ``--max_epochs``) into resume / refuse. Pure functions, tested branch by branch; ``read_fingerprint`` /
``write_fingerprint`` / ``current_fingerprint`` are the thin file-system wrappers. No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from review_lm.data.reviews import expand_data_paths, unreadable_file
from review_lm.runs import run_folder
from review_lm.runs.run_folder import FINGERPRINT_FILE
from review_lm.utils import write_json_atomic

FINGERPRINT_VERSION = 1
_CHUNK = 1 << 20  # data files are hashed in 1 MiB chunks: memory stays flat for any file size


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


def foreign_checkpoint_decision(checkpoint: str, checkpoint_run: str, recorded_fp: Mapping[str, Any] | None,
                                current_fp: Mapping[str, Any]) -> ResumeDecision:
    """May a run resume from ``checkpoint``, a checkpoint outside its own ``--output_dir``? Pure.

    Only when it is the same run: the fingerprint recorded in the checkpoint's run folder (``checkpoint_run``)
    must equal this run's, as for a resume inside the folder. Without a recorded fingerprint nothing says which
    run the checkpoint belongs to, so it is refused (a resume inside an older run's own folder is not)."""
    if recorded_fp is None:
        return ResumeDecision("refuse", f"--resume_from_checkpoint {checkpoint}: it is outside --output_dir and "
                                        f"{checkpoint_run} has no {FINGERPRINT_FILE}, so nothing shows it is this "
                                        "run's checkpoint; resume it in its own run folder, or start a new run")
    differences = fingerprint_differences(recorded_fp, current_fp)
    if differences:
        return ResumeDecision("refuse", f"--resume_from_checkpoint {checkpoint}: it belongs to another run "
                                        f"({checkpoint_run} was trained with other settings: {'; '.join(differences)}"
                                        "); resume with that run's arguments and data, or start a new run")
    return ResumeDecision("resume", None)


def read_fingerprint(output_dir: str) -> dict[str, Any] | None:
    """The fingerprint record of the run in ``output_dir`` (``{"fingerprint": ..., "max_epochs": N}``), if any."""
    return run_folder.read_record(os.path.join(output_dir, FINGERPRINT_FILE))


def write_fingerprint(output_dir: str, fingerprint: Mapping[str, Any], max_epochs: int) -> None:
    write_json_atomic(os.path.join(output_dir, FINGERPRINT_FILE),
                      {"fingerprint": fingerprint, "digest": fingerprint_digest(fingerprint), "max_epochs": max_epochs})


def current_fingerprint(args, world_size: int) -> dict[str, Any]:
    """The run's fingerprint from its arguments and data files (their bytes are hashed, not parsed: seconds for a
    million reviews); a file that cannot be read is the loader's one-line error."""
    files = expand_data_paths(args.data_file)
    for file in files:
        try:
            with open(file, "rb"):
                pass
        except OSError as err:
            raise unreadable_file(file, err) from None
    return run_fingerprint(vars(args), files, {"world_size": world_size})
