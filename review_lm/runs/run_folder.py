"""The run folder: every file name in it, what state it is in, and its records (one owner for all of them).

A training run's ``--output_dir`` holds the final model (full weights or a LoRA adapter), the tokenizer, the
spec's data files (``test_samples.json``, ``training_samples_preview.txt``), ``loss_curve.png``, Trainer's
``checkpoint-N/`` folders and, written last, ``training_config.json``: its presence means the run finished.
Evaluation writes ``eval/`` inside it. Training, evaluation, generation, checkpoint checks and the inference
loader all name these files through this module, and read ``training_config.json`` through
:func:`read_run_record` only.

No torch here: checking a folder or reading a record costs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from review_lm.data import prompts
from review_lm.data.chat_layout import RECORDED_TEMPLATES
from review_lm.data.prompts import PROMPT_FORMATS
from review_lm.data.reviews import ReviewData, ReviewDataError, Sample, nested_too_deeply, read_json_file
from review_lm.utils import UsageError, library_versions, write_json_atomic

# --------------------------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------------------------
RUN_RECORD = "training_config.json"  # written last by training: its presence means the run finished
TEST_SAMPLES = "test_samples.json"
TEST_HISTORIES = "test_histories.json"  # each test user's earlier reviews, once (baselines, style metrics)
PREVIEW = "training_samples_preview.txt"
LOSS_CURVE = "loss_curve.png"
WANDB_ID_FILE = "wandb_run_id.txt"  # the W&B run id (never a key): a resumed run logs into the same W&B run
LOCK_FILE = ".run.lock"  # flock'ed by the run's leader (runs.lock.RunLock); holds the holder while the run lives
LAUNCH_MARKER = ".launch.json"  # which launch's files the folder holds (restart.plan_restart)
FINGERPRINT_FILE = "run_fingerprint.json"  # what defines the run (arguments, data digest): resumes must match
EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.jsonl"  # inside EVAL_DIR
SAMPLE_SCORES_FILE = "sample_scores.npz"  # inside EVAL_DIR: per-sample statistics (bootstrap, --compare)
METRICS_FILE = "metrics.json"  # inside EVAL_DIR, written last: its presence means the evaluation finished
STYLE_FIGURE = "style.png"  # inside EVAL_DIR: lengths, punctuation, attribution confusion (style_report)
PREDICTIONS_EVAL_SUFFIX = "_eval"  # --predictions P.jsonl without --output_dir writes P_eval/ beside the file

# What a model folder holds, as transformers and peft write it.
CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded weights
FULL_WEIGHT_FILES = (*WEIGHT_FILES, *WEIGHT_INDEXES)
FSDP_WEIGHTS_PREFIX = "pytorch_model_fsdp"  # FSDP's sharded checkpoint state
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_WEIGHTS = ADAPTER_WEIGHT_FILES[0]  # what peft's save_pretrained writes
ADAPTER_MODEL_CARD = "README.md"  # peft writes it beside an adapter; ours only there
MERGED_DIR = "merged"  # --merge_lora output, beside the adapter
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# Trainer's checkpoints.
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # written last by Trainer: its presence means rank 0 finished the save

# Everything a run writes into output_dir; --overwrite_output_dir removes exactly these (never other files).
RUN_ARTIFACTS = (
    *WEIGHT_FILES, CONFIG, "generation_config.json", *TOKENIZER_FILES, RUN_RECORD, TEST_SAMPLES, TEST_HISTORIES,
    PREVIEW, LOSS_CURVE, FINGERPRINT_FILE, "training_args.bin", EVAL_DIR, WANDB_ID_FILE, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS, MERGED_DIR,
)

KIND_FULL, KIND_ADAPTER = "full", "lora-adapter"


def path(folder: str, name: str) -> str:
    return os.path.join(folder, name)


# --------------------------------------------------------------------------------------------------------------
# What a folder holds
# --------------------------------------------------------------------------------------------------------------
def model_kind(folder: str) -> str | None:
    """:data:`KIND_FULL`, :data:`KIND_ADAPTER`, or None when the folder holds neither kind of model.

    The one classifier of model folders (final outputs and checkpoints alike). Full weights win over an adapter
    beside them: such a folder loads as the full model and needs neither peft nor the base model. FSDP's
    sharded checkpoint states count as full weights. ``config.json`` alone counts as a full model, so that an
    unreadable one fails in the loader with the loader's reason instead of a vague "not a model folder".
    """
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    full_weights = bool(names & set(FULL_WEIGHT_FILES)) or any(n.startswith(FSDP_WEIGHTS_PREFIX) for n in names)
    if full_weights and (CONFIG in names or ADAPTER_CONFIG not in names):
        return KIND_FULL
    if ADAPTER_CONFIG in names:
        return KIND_ADAPTER
    return KIND_FULL if CONFIG in names else None


def has_tokenizer_files(folder: str) -> bool:
    return any(os.path.isfile(path(folder, name)) for name in TOKENIZER_MARKERS)


def checkpoint_step(name: str) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    match = CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoint_names(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``output_dir``, oldest step first: the one lister of checkpoints."""
    if not os.path.isdir(output_dir):
        return []
    found = [(step, n) for n in os.listdir(output_dir)
             if (step := checkpoint_step(n)) is not None and os.path.isdir(os.path.join(output_dir, n))]
    return [n for _, n in sorted(found)]


# A previous run's files renamed aside by remove_previous_run before they are deleted (see there).
PREVIOUS_RUN_ASIDE = ".previous-run-removing"
# Names only a run of this tool writes: a folder with one of them (or a checkpoint) holds a run, not a model.
RUN_MARKERS = (RUN_RECORD, FINGERPRINT_FILE, LAUNCH_MARKER, TEST_SAMPLES, TEST_HISTORIES, PREVIEW)
# Names that are not the run's results but belong to the folder's life (the lock, the launch marker).
_RUN_HOUSEKEEPING = (LOCK_FILE, LAUNCH_MARKER, FINGERPRINT_FILE, ADAPTER_MODEL_CARD, PREVIOUS_RUN_ASIDE)


# Names of our files that vary: sharded weights, FSDP states, an atomic write's temporary file (utils.write_atomic).
_OURS_RE = re.compile(r"^(model-\d+-of-\d+\.safetensors|pytorch_model-\d+-of-\d+\.bin|"
                      + re.escape(FSDP_WEIGHTS_PREFIX) + r".*|.+\.\d+\.tmp)$")


def foreign_files(names: list[str]) -> list[str]:
    """The names in a folder listing that are not a run of this tool, sorted (``[]``: a run's folder or empty).

    Pure. Two kinds: a name this tool never writes (``notes.txt``, a dataset), and a model folder that is not a
    run - config.json / weights / tokenizer files but none of :data:`RUN_MARKERS` and no checkpoint (a base
    model downloaded there). A run killed before its first checkpoint still holds a marker.
    """
    ours = {*RUN_ARTIFACTS, *_RUN_HOUSEKEEPING}
    unknown = sorted(n for n in names if n not in ours and checkpoint_step(n) is None and not _OURS_RE.match(n))
    if unknown:
        return unknown
    if any(n in RUN_MARKERS or checkpoint_step(n) is not None for n in names):
        return []
    return sorted(n for n in names if n not in (LOCK_FILE, LAUNCH_MARKER))


def output_dir_state(output_dir: str) -> str:
    """'empty' (absent, or nothing but a run's own files), 'finished', 'unfinished' (checkpoints but no final
    record), or 'foreign' (anything that is not a run of this tool: :func:`foreign_files`)."""
    if not os.path.isdir(output_dir):
        return "empty"
    if os.path.exists(path(output_dir, RUN_RECORD)):
        return "finished"
    if checkpoint_names(output_dir):
        return "unfinished"
    return "foreign" if foreign_files(os.listdir(output_dir)) else "empty"


def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(p)))


def overlap(output_dir: str, source: str) -> str | None:
    """How ``output_dir`` overlaps the input folder ``source`` ('is', 'is inside', 'contains'), or None. Pure
    apart from resolving symbolic links (realpath), so a link to the model folder counts as the folder."""
    out, src = _real(output_dir), _real(source)
    if out == src:
        return "is"
    if out.startswith(src.rstrip(os.sep) + os.sep):
        return "is inside"
    if src.startswith(out.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def check_output_not_input(output_dir: str, inputs: dict[str, str]) -> None:
    """Refuse (one line) an ``--output_dir`` that is, is inside or contains an input folder (``{flag: path}``:
    the model, a LoRA adapter's base, a checkpoint to resume): training would write over - and
    ``--overwrite_output_dir`` delete - the files it reads. Only inputs that exist locally (a hub id does not)."""
    for flag, source in inputs.items():
        how = overlap(output_dir, source) if source and os.path.exists(source) else None
        # A checkpoint inside output_dir is the ordinary resume of this folder's own run.
        if how and not (how == "contains" and flag == "--resume_from_checkpoint"):
            raise UsageError(f"--output_dir {output_dir} {how} {flag} {source}: training would write over its "
                             "own input; choose a separate output folder")


def check_not_foreign(output_dir: str) -> None:
    """Refuse (one line) a folder holding anything that is not a run of this tool - even with
    --overwrite_output_dir, which replaces a previous run of this tool only: deleting a model's config.json and
    weights that merely share our file names would be data loss. Called before the run lock writes anything."""
    found = foreign_files(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if not found or output_dir_state(output_dir) != "foreign":
        return
    shown = ", ".join(found[:5]) + (f", ... ({len(found) - 5} more)" if len(found) > 5 else "")
    raise UsageError(f"--output_dir {output_dir} holds files that are not a run of this tool ({shown}); "
                     "choose an empty or new folder (--overwrite_output_dir replaces only a previous run)")


def training_inputs(model_path: str, resume: str | None) -> dict[str, str]:
    """The folders a training run reads, by flag: the model, its LoRA base when the model is an adapter folder,
    a checkpoint to resume from (not ``latest``, which is inside output_dir by definition)."""
    inputs = {"--model_path": model_path}
    adapter = path(model_path, ADAPTER_CONFIG)
    if os.path.isfile(adapter):
        try:
            with open(adapter, encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        if isinstance(base, str):
            inputs["(the LoRA base of --model_path)"] = base
    if resume not in (None, "latest"):
        inputs["--resume_from_checkpoint"] = resume
    return inputs


def check_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> None:
    """Never overwrite a previous run silently, and never anything that is not a run of this tool."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} exists and is not a directory")
    state = output_dir_state(output_dir)
    if state == "foreign":
        check_not_foreign(output_dir)
    if resume is not None:
        if resume == "latest" and state == "empty":
            raise UsageError(f"--resume_from_checkpoint: no checkpoint-* folder in {output_dir}")
        if resume != "latest" and not os.path.isdir(resume):
            raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
        return
    if overwrite or state == "empty":
        return
    if state == "finished":
        raise UsageError(f"--output_dir {output_dir} already holds a finished run; choose another folder or pass "
                         "--overwrite_output_dir")
    raise UsageError(f"--output_dir {output_dir} holds an unfinished run (checkpoints); pass "
                     "--resume_from_checkpoint to continue it or --overwrite_output_dir to start over")


def remove_previous_run(output_dir: str) -> list[str]:
    """Delete what an earlier run wrote (known names and checkpoint-* only), return what was removed.

    Renamed aside first (into :data:`PREVIOUS_RUN_ASIDE`, one ``rename`` per name, same file system), then the
    aside folder deleted: a crash or kill mid-way leaves whole files in the aside folder, never a half-deleted
    checkpoint among the run's files; the next removal deletes a leftover aside folder too. The train script
    calls this with signals deferred and only once the new run's files are ready to be written."""
    removed = []
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    ours = set(RUN_ARTIFACTS)
    if ADAPTER_CONFIG in names:  # peft's model card sits beside the adapter it describes
        ours.add(ADAPTER_MODEL_CARD)
    aside = path(output_dir, PREVIOUS_RUN_ASIDE)
    for name in names:
        if name in ours or checkpoint_step(name) is not None:
            os.makedirs(aside, exist_ok=True)
            moved = path(aside, name)
            if os.path.lexists(moved):  # from an earlier removal that was killed: that copy is older
                shutil.rmtree(moved) if os.path.isdir(moved) else os.remove(moved)
            os.replace(path(output_dir, name), moved)
            removed.append(name)
    if os.path.isdir(aside):
        shutil.rmtree(aside)
    return removed


KEEP_CHECKPOINTS = ("all", "best", "none")


def checkpoints_to_remove(names: list[str], keep: str, best: str | None) -> list[str]:
    """Which ``checkpoint-N`` folders ``--keep_checkpoints`` removes after a successful finish. Pure.

    ``all``: none (the run keeps at most two while it trains: the best and the latest). ``best``: all but the
    best one (``best``: its folder name; without a validation split the latest checkpoint, whose weights are the
    final model's). ``none``: every one (the final model is saved beside them; nothing can be resumed then).
    """
    checkpoints = sorted((n for n in names if checkpoint_step(n) is not None), key=checkpoint_step)
    if keep == "all" or not checkpoints:
        return []
    if keep == "none":
        return checkpoints
    kept = best if best in checkpoints else checkpoints[-1]
    return [n for n in checkpoints if n != kept]


def remove_checkpoints(output_dir: str, keep: str, best_checkpoint: str | None) -> tuple[list[str], int]:
    """Apply ``--keep_checkpoints`` (after a successful finish only); return what was removed and its bytes."""
    best = os.path.basename(os.path.normpath(best_checkpoint)) if best_checkpoint else None
    removed = checkpoints_to_remove(checkpoint_names(output_dir), keep, best)
    freed = 0
    for name in removed:
        folder = path(output_dir, name)
        freed += sum(f.stat().st_size for f in os.scandir(folder) if f.is_file())  # Trainer's files are flat
        for sub in (p for p in os.scandir(folder) if p.is_dir()):  # DeepSpeed's global_stepN/
            freed += sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(sub.path) for f in fs)
        shutil.rmtree(folder)
    return removed, freed


# --------------------------------------------------------------------------------------------------------------
# training_config.json: written by training, read by evaluation and generation
# --------------------------------------------------------------------------------------------------------------
DEFAULT_MAX_LENGTH = 4096  # the trainer's --max_length default (also for a record that does not hold one)


def write_run_record(output_dir: str, record: dict[str, Any]) -> None:
    write_json_atomic(path(output_dir, RUN_RECORD), record)


def run_record(args, data: ReviewData, splits: dict[str, list[Sample]], resolved: dict[str, Any],
               outcome: dict[str, Any], fingerprint_digest: str) -> dict[str, Any]:
    """training_config.json: the arguments, every decision, the data, the result and the library versions."""
    from review_lm.data.report import split_summary

    return {
        "arguments": vars(args),
        "resolved": resolved,
        "data": {
            "file": ", ".join(os.path.abspath(p) for p in args.data_file),
            "files": [os.path.abspath(f) for f in data.files],  # every file read (dirs expanded)
            "users": len(data.users),
            "reviews": data.num_reviews, "splits": split_summary(splits),
        },
        "result": outcome,
        "fingerprint": fingerprint_digest,  # run_fingerprint.json holds the whole fingerprint
        "versions": library_versions(("torch", "transformers", "accelerate", "peft", "wandb", "flash-attn",
                                      "torch-optimi", "bitsandbytes", "deepspeed")),
    }


def _path_list(value: Any) -> list[str]:
    """A path or a list of paths (``--data_file`` takes several since multi-file input) as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


@dataclass(frozen=True)
class RunRecord:
    """What a finished run recorded about itself: what the prompt depends on, and the raw record."""

    path: str
    use_profile: bool
    use_history: bool
    max_length: int | None
    data_files: list[str]  # as given to the trainer (relative to where it ran)
    recorded_abs_files: list[str]  # the absolute paths the trainer recorded, if any
    arguments: dict[str, Any] = field(repr=False)
    raw: dict[str, Any] = field(repr=False)
    prompt_format: str = "spec"  # --prompt_format (records older than it: spec)
    chat_template: str = "none"  # the template training used (chat_layout.RECORDED_TEMPLATES; older: none)

    @property
    def builder(self) -> prompts.PromptBuilder:
        return prompts.PromptBuilder(self.use_profile, self.use_history)


def read_run_record(model_dir: str) -> RunRecord:
    """The record of the finished run in ``model_dir``; a one-line UsageError for anything else."""
    if not os.path.exists(model_dir):
        raise UsageError(f"--model_dir {model_dir}: no such folder")
    if not os.path.isdir(model_dir):
        raise UsageError(f"--model_dir {model_dir}: not a folder")
    record_path = path(model_dir, RUN_RECORD)
    if not os.path.isfile(record_path):
        if checkpoint_names(model_dir):
            raise UsageError(f"--model_dir {model_dir}: unfinished training run (checkpoints but no {RUN_RECORD}); "
                             "let it finish or resume it with --resume_from_checkpoint")
        raise UsageError(f"--model_dir {model_dir}: no {RUN_RECORD}, not a finished training run")
    try:
        config = read_json_file(record_path)
    except ReviewDataError as err:
        raise UsageError(str(err)) from None
    arguments = config.get("arguments") if isinstance(config, dict) else None
    if not isinstance(arguments, dict):
        raise UsageError(f"{record_path}: no \"arguments\" object (not written by train_distributed_MovieReview.py?)")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    max_length = arguments.get("max_length", DEFAULT_MAX_LENGTH)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise UsageError(f"{record_path}: arguments.max_length must be a positive integer, got {max_length!r}")
    resolved = config.get("resolved") if isinstance(config.get("resolved"), dict) else {}
    prompt_format = arguments.get("prompt_format") or "spec"
    chat_template = resolved.get("chat_template") or "none"
    if prompt_format not in PROMPT_FORMATS:
        raise UsageError(f"{record_path}: arguments.prompt_format must be {' or '.join(PROMPT_FORMATS)}, got "
                         f"{prompt_format!r}")
    if chat_template not in RECORDED_TEMPLATES:
        names = f"{', '.join(RECORDED_TEMPLATES[:-1])} or {RECORDED_TEMPLATES[-1]}"
        raise UsageError(f"{record_path}: resolved.chat_template must be {names}, got "
                         f"{chat_template!r}")
    return RunRecord(
        path=record_path,
        prompt_format=prompt_format,
        chat_template=chat_template,
        use_profile=bool(arguments.get("use_profile", True)),
        use_history=bool(arguments.get("use_history", True)),
        max_length=max_length,
        data_files=_path_list(arguments.get("data_file")),
        recorded_abs_files=_path_list(data.get("files", data.get("file"))),
        arguments=arguments,
        raw=config,
    )


def recorded_arguments(model_dir: str) -> dict[str, Any] | None:
    """The training run's arguments if ``model_dir`` holds a readable record (a model made by hand has none)."""
    try:
        return read_run_record(model_dir).arguments
    except UsageError:
        return None


def read_record(path: str) -> dict[str, Any] | None:
    """A small JSON record the run writes for itself (lock holder, launch marker, fingerprint): the object, or None
    when the file is absent, empty, unreadable or not an object (a torn write counts as absent)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # A hand-made record nested past any real one counts as unreadable (no RecursionError from json.loads).
        value = json.loads(raw.decode("utf-8")) if raw.strip() and not nested_too_deeply(raw) else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_json(file: str, where: Callable[[Any, list[str | int]], str] | None = None) -> Any:
    """The data loader's JSON reading, with its one-line errors (missing, not UTF-8, bad JSON with position, nested
    too deeply, a lone surrogate named by ``where``: see ``read_json_file``)."""
    try:
        return read_json_file(file, where)
    except ReviewDataError as err:
        raise UsageError(str(err)) from None
