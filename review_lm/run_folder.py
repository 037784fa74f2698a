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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import data_loader_movie_review as dl
from review_lm.utils import UsageError, library_versions, write_atomic, write_json_atomic

# --------------------------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------------------------
RUN_RECORD = "training_config.json"  # written last by training: its presence means the run finished
TEST_SAMPLES = "test_samples.json"
TEST_HISTORIES = "test_histories.json"  # each test user's earlier reviews, once (baselines, style metrics)
PREVIEW = "training_samples_preview.txt"
LOSS_CURVE = "loss_curve.png"
WANDB_ID_FILE = "wandb_run_id.txt"  # the W&B run id (never a key): a resumed run logs into the same W&B run
LOCK_FILE = ".run.lock"  # flock'ed by the run's leader (run_guard.RunLock); holds the holder while the run lives
LAUNCH_MARKER = ".launch.json"  # which launch's files the folder holds (run_guard.plan_restart)
FINGERPRINT_FILE = "run_fingerprint.json"  # what defines the run (arguments, data digest): resumes must match
EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.jsonl"  # inside EVAL_DIR
METRICS_FILE = "metrics.json"  # inside EVAL_DIR, written last: its presence means the evaluation finished
STYLE_FIGURE = "style.png"  # inside EVAL_DIR: lengths, punctuation, attribution confusion (review_lm.style_report)
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
    """The ``checkpoint-N`` folders of ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(step, n) for n in os.listdir(output_dir) if (step := checkpoint_step(n)) is not None]
    return [n for _, n in sorted(found)]


def output_dir_state(output_dir: str) -> str:
    """'empty' (absent or nothing of ours), 'finished', or 'unfinished' (checkpoints but no final record)."""
    if not os.path.isdir(output_dir):
        return "empty"
    if os.path.exists(path(output_dir, RUN_RECORD)):
        return "finished"
    return "unfinished" if checkpoint_names(output_dir) else "empty"


def check_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> None:
    """Never overwrite a previous run silently."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} exists and is not a directory")
    state = output_dir_state(output_dir)
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
    """Delete what an earlier run wrote (known names and checkpoint-* only), return what was removed."""
    removed = []
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    ours = set(RUN_ARTIFACTS)
    if ADAPTER_CONFIG in names:  # peft's model card sits beside the adapter it describes
        ours.add(ADAPTER_MODEL_CARD)
    for name in names:
        target = path(output_dir, name)
        if name in ours or checkpoint_step(name) is not None:
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
            removed.append(name)
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


def run_record(args, data: dl.ReviewData, splits: dict[str, list[dl.Sample]], resolved: dict[str, Any],
               outcome: dict[str, Any], fingerprint_digest: str) -> dict[str, Any]:
    """training_config.json: the arguments, every decision, the data, the result and the library versions."""
    from review_lm.data_report import split_summary

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
    chat_template: str = "none"  # the template training used (plan.RECORDED_TEMPLATES; older records: none)

    @property
    def builder(self) -> dl.PromptBuilder:
        return dl.PromptBuilder(self.use_profile, self.use_history)


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
        config = dl.read_json_file(record_path)
    except dl.ReviewDataError as err:
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
    if prompt_format not in ("spec", "conversation"):
        raise UsageError(f"{record_path}: arguments.prompt_format must be spec or conversation, got {prompt_format!r}")
    if chat_template not in ("tokenizer", "built-in ChatML", "none"):
        raise UsageError(f"{record_path}: resolved.chat_template must be tokenizer, built-in ChatML or none, got "
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


# --------------------------------------------------------------------------------------------------------------
# test_samples.json: written by training (the spec's file), read by evaluation
# --------------------------------------------------------------------------------------------------------------
def write_test_samples(file: str, records: Iterable) -> None:
    """test_samples.json: a JSON list of ``dl.sample_record`` objects (what the spec's Q2 loads), one sample per
    line, written record by record without holding every test prompt in memory at once. One line per sample
    rather than an indented tree: json's C encoder writes it (``indent`` switches to the pure-Python one)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            first = True
            for record in records:
                f.write(("[\n" if first else ",\n") + json.dumps(dl.sample_record(record), ensure_ascii=False))
                first = False
            f.write("[]\n" if first else "\n]\n")

    write_atomic(file, write)


def write_test_histories(file: str, test_samples: list[dl.Sample]) -> None:
    write_json_atomic(file, dl.test_histories(test_samples))


@dataclass
class SampleSet:
    """The test samples of a run, and (when known) each sample's earlier reviews.

    Two layouts are read: the current one (each sample's ``position`` + the user's reviews once, in
    test_histories.json beside test_samples.json) and the earlier one (each sample carrying its own
    ``earlier_reviews`` list).
    """

    path: str
    samples: list[dict[str, Any]]
    histories: dict[int, dict[str, Any]] | None = None  # user_index -> test_histories.json entry (current layout)

    @property
    def references(self) -> list[str]:
        return [s["reference"] for s in self.samples]

    @property
    def has_history(self) -> bool:
        """Every sample's earlier reviews are known, so the baselines (and style metrics) can be computed."""
        return self.histories is not None or all("earlier_reviews" in s for s in self.samples)

    def earlier_reviews(self, i: int) -> list[str]:
        """The review texts the user of sample ``i`` wrote before it, oldest first."""
        sample = self.samples[i]
        if self.histories is None:
            return sample["earlier_reviews"]
        return self.histories[sample["user_index"]]["reviews"][:sample["position"]]

    def all_earlier_reviews(self) -> list[list[str]]:
        return [self.earlier_reviews(i) for i in range(len(self.samples))]

    def reviews_before_test(self) -> dict[int, list[str]]:
        """Per user, the reviews written before the test split (train + validation): never a test review."""
        if self.histories is not None:
            return {u: h["reviews"][:h["test_start"]] for u, h in self.histories.items()}
        before: dict[int, list[str]] = {}
        for s in self.samples:  # the user's earliest test sample has the fewest earlier reviews
            key = s.get("user_index", s.get("user"))
            if key not in before or len(s["earlier_reviews"]) < len(before[key]):
                before[key] = s["earlier_reviews"]
        return before


def read_json(file: str) -> Any:
    """The data loader's JSON reading, with its one-line errors (missing, not UTF-8, bad JSON with position)."""
    try:
        return dl.read_json_file(file)
    except dl.ReviewDataError as err:
        raise UsageError(str(err)) from None


def load_test_samples(file: str) -> SampleSet:
    """Read and check ``test_samples.json``: a non-empty list of objects with string prompt and reference."""
    data = read_json(file)
    expected = f"expected {TEST_SAMPLES} as written by train_distributed_MovieReview.py"
    if not isinstance(data, list):
        raise UsageError(f"{file}: not a list of test samples ({expected})")
    if not data:
        raise UsageError(f"{file}: the test set is empty (no samples to evaluate)")
    for i, sample in enumerate(data):
        if not isinstance(sample, dict):
            raise UsageError(f"{file}: sample #{i} is not an object ({expected})")
        for key in ("prompt", "reference"):
            if not isinstance(sample.get(key), str):
                raise UsageError(f"{file}: sample #{i} has no '{key}' string ({expected})")
        earlier = sample.get("earlier_reviews")
        if earlier is not None and not (isinstance(earlier, list) and all(isinstance(r, str) for r in earlier)):
            raise UsageError(f"{file}: sample #{i}: 'earlier_reviews' must be a list of strings")
    histories_file = path(os.path.dirname(os.path.abspath(file)), TEST_HISTORIES)
    if all("earlier_reviews" in s for s in data) or not os.path.isfile(histories_file):
        return SampleSet(file, data)
    return SampleSet(file, data, load_test_histories(histories_file, file, data))


def load_test_histories(file: str, samples_file: str, samples: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """test_histories.json, checked against the samples it serves (one-line errors naming the file)."""
    data = read_json(file)
    if not (isinstance(data, dict) and data.get("format") == dl.TEST_HISTORIES_FORMAT
            and isinstance(data.get("users"), list)):
        raise UsageError(f"{file}: not a {TEST_HISTORIES} written by train_distributed_MovieReview.py")
    histories: dict[int, dict[str, Any]] = {}
    for k, entry in enumerate(data["users"]):
        reviews = entry.get("reviews") if isinstance(entry, dict) else None
        if not (isinstance(reviews, list) and all(isinstance(r, str) for r in reviews)
                and isinstance(entry.get("user_index"), int) and isinstance(entry.get("test_start"), int)):
            raise UsageError(f"{file}: user entry #{k} needs user_index, test_start and a list of review strings")
        histories[entry["user_index"]] = entry
    for i, s in enumerate(samples):
        entry = histories.get(s.get("user_index"))
        position = s.get("position")
        if entry is None or not isinstance(position, int) or not 0 <= position <= len(entry["reviews"]):
            raise UsageError(f"{samples_file}: sample #{i} (user {s.get('user_index')!r}, position {position!r}) has "
                             f"no earlier reviews in {file}: the two files are not from the same run")
    return histories
