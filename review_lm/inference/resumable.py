"""Resumable, shardable generation bookkeeping: the batch plan, the partial files and their fingerprint.

Evaluation generates the test prompts in a fixed plan of batches (:func:`plan_batches`: longest prompts first,
``batch_size`` per batch, numbered 0..B-1). Each process appends every finished batch, as one JSON line, to its
own partial file in the output folder (``predictions.partial.rank<R>.jsonl``, :class:`PartialWriter`); the
first line of each file is a header holding the :func:`fingerprint` of what decides the predictions (the model
folder's contents, the test file's digest, the generation settings). A rerun of the same command reads every
partial file (:func:`read_done`), keeps the complete batch lines, and generates only the batches not done:
since a batch is always the same prompts and its sampling seed is derived from its number
(:func:`batch_seed`), the result is the same as an uninterrupted run whatever the number of processes of
either run. A torn last line (SIGKILL in the middle of a write) is not a complete batch and is regenerated.
A partial file whose header differs is refused (:class:`UsageError`, one line), never mixed in or deleted.

The same files are how data-parallel generation gathers: every rank writes its batches, the main process reads
all of them in plan order once every rank is done (the output folder must be shared by the processes, as it is
on one machine). Pure functions over plain data, except the file reading and writing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from review_lm.utils import UsageError

PARTIAL_PREFIX = "predictions.partial.rank"
PARTIAL_SUFFIX = ".jsonl"
FORMAT = 1
DIGEST_BYTES = 1 << 20  # head and tail of each weight file go into the model digest (full hashes of GBs: minutes)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".py")


def partial_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"{PARTIAL_PREFIX}{rank}{PARTIAL_SUFFIX}")


def partial_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}")))


# --------------------------------------------------------------------------------------------------------------
# What the predictions depend on
# --------------------------------------------------------------------------------------------------------------
def file_digest(path: str, whole: bool = True) -> str:
    """sha256 of the file, or (``whole=False``) of its size, first and last MiB: enough to tell two trainings'
    weights apart without reading gigabytes."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if whole or size <= 2 * DIGEST_BYTES:
            for chunk in iter(lambda: f.read(DIGEST_BYTES), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            h.update(f.read(DIGEST_BYTES))
            f.seek(size - DIGEST_BYTES)
            h.update(f.read(DIGEST_BYTES))
    return h.hexdigest()


def model_digest(model_dir: str) -> str:
    """Digest of the model folder's weights, configs and tokenizer files (top level; eval/ and checkpoints are
    not the model)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and name.endswith(MODEL_FILE_SUFFIXES) and not name.startswith("."):
            h.update(name.encode())
            h.update(file_digest(path, whole=not name.endswith((".safetensors", ".bin"))).encode())
    return h.hexdigest()


def fingerprint(model_dir: str, test_file: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Header of a partial file: a partial with another fingerprint holds other predictions."""
    return {"format": FORMAT, "model": model_digest(model_dir), "test_file": file_digest(test_file),
            "settings": dict(settings), "model_dir": os.path.abspath(model_dir)}


def differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words ("model", "test file", "batch_size 8 -> 4")."""
    out = []
    if found.get("format") != expected.get("format"):
        return [f"format {found.get('format')!r}"]
    if found.get("model") != expected.get("model"):
        out.append(f"model ({found.get('model_dir')})")
    if found.get("test_file") != expected.get("test_file"):
        out.append("test file")
    a, b = found.get("settings") or {}, expected.get("settings") or {}
    out += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------
def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches, longest prompt first (batches of similar length waste less on padding, and an
    out-of-memory error shows up in the first batch); ties keep the test order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def interleave(batch_ids: Sequence[int], processes: int) -> list[int]:
    """``batch_ids`` reordered so that cutting the list into ``processes`` contiguous pieces (what
    ``PartialState.split_between_processes`` does: the first ``len % processes`` pieces one longer) deals them
    round-robin: every process gets long and short prompts alike instead of rank 0 getting all the long ones."""
    positions = sorted(range(len(batch_ids)), key=lambda i: (i % max(1, processes), i))
    return [batch_ids[i] for i in positions]


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of one batch: set before it, so its samples do not depend on which process made it, or
    on what was generated before it in this run."""
    return seed + batch


# --------------------------------------------------------------------------------------------------------------
# Partial files
# --------------------------------------------------------------------------------------------------------------
def read_partial(path: str) -> tuple[dict[str, Any] | None, dict[int, list[dict[str, Any]]]]:
    """(header, batch number -> rows) of the complete lines; a last line without its newline (a write cut by
    a kill) and lines that are not valid batch records are ignored."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")[:-1]  # the part after the last newline is incomplete (or empty)
    header, batches = None, {}
    for number, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if number == 0:
            header = obj.get("header") if isinstance(obj, dict) else None
        elif isinstance(obj, dict) and isinstance(obj.get("batch"), int) and isinstance(obj.get("rows"), list):
            batches[obj["batch"]] = obj["rows"]
    return header, batches


def read_done(out_dir: str, expected: Mapping[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Batches already generated by earlier (or other ranks') runs with the same fingerprint. A partial file
    with another fingerprint is refused in one line; nothing is changed on disk."""
    done: dict[int, list[dict[str, Any]]] = {}
    for path in partial_files(out_dir):
        header, batches = read_partial(path)
        if header is None:  # killed before its header was complete: holds nothing
            continue
        diff = differences(expected, header)
        if diff:
            raise UsageError(f"{path}: partial predictions of another generation ({', '.join(diff)}); delete it to "
                             "start over, or choose another --output_dir")
        done.update(batches)
    return done


class PartialWriter:
    """Appends one process's batches to its partial file; each batch is one line, written with one write()
    and fsync'ed, so after a crash a batch is either complete or a torn last line."""

    def __init__(self, path: str, header: Mapping[str, Any]):
        self.path = path
        fresh = not os.path.exists(path) or read_partial(path)[0] is None
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if fresh else os.O_APPEND), 0o644)
        if fresh:
            self._write({"header": dict(header)})
        else:  # a torn last line from a kill: cut it, so the next batch starts on its own line
            with open(path, "rb") as f:
                raw = f.read()
            os.ftruncate(self.fd, raw.rfind(b"\n") + 1)
            os.lseek(self.fd, 0, os.SEEK_END)

    def _write(self, obj: Any) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        os.write(self.fd, data)
        os.fsync(self.fd)

    def write_batch(self, batch: int, rows: list[dict[str, Any]]) -> None:
        self._write({"batch": batch, "rows": rows})

    def close(self) -> None:
        os.close(self.fd)


def remove_partials(out_dir: str) -> None:
    """After metrics.json is written the partial files are redundant (predictions.jsonl holds everything)."""
    for path in partial_files(out_dir):
        os.remove(path)
