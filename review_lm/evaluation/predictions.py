"""Read a system's outputs for the test samples from a JSONL file (one JSON object per line).

Each line: ``{"index": i, "prediction": "..."}`` where ``i`` is the test sample's position 0..n-1 in
``test_samples.json``; optional ``user_index`` / ``record_index`` must equal that sample's (a check that the
file belongs to this test set). Other keys are ignored, so ``predictions.jsonl`` written by evaluation reads
too. Blank lines are skipped. Every problem raises :class:`UsageError` with one line naming the file, the line
number and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from review_lm.data.reviews import MAX_JSON_DEPTH, lone_surrogate, nested_too_deeply
from review_lm.utils import UsageError

CHECKED_KEYS = ("user_index", "record_index")
MISSING_SHOWN = 5  # missing indices named in the error


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_predictions(path: str, samples: Sequence[Mapping[str, Any]], field: str = "prediction") -> list[str]:
    """The ``field`` string of each test sample, in sample order (``samples``: the test_samples.json dicts)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a predictions file") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read file: {err.strerror or err}") from None
    if nested_too_deeply(raw):  # checked once for the whole file: every line is a document of its own
        raise UsageError(f"{path}: nested too deeply (more than {MAX_JSON_DEPTH} levels of [ and {{); no valid "
                         "predictions file nests that deep")
    n = len(samples)
    found: list[str | None] = [None] * n
    seen_on: dict[int, int] = {}  # index -> line number
    for number, line in enumerate(raw.split(b"\n"), start=1):
        def fail(problem: str, number: int = number) -> UsageError:
            return UsageError(f"{path}: line {number}: {problem}".replace("\r", "\\r").replace("\n", "\\n"))

        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise fail(f"not UTF-8 text (byte {err.start + 1} of the line)") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise fail(f"not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise fail(f"expected a JSON object, got {_json_type(obj)}")
        if "index" not in obj:
            raise fail("missing 'index'")
        index = obj["index"]
        if not _is_int(index):
            raise fail(f"'index' must be an integer, got {_json_type(index)}")
        if not 0 <= index < n:
            raise fail(f"index {index} is out of range (the test set has {n} samples: 0..{n - 1})"
                       if n else f"index {index} is out of range (the test set is empty)")
        if index in seen_on:
            raise fail(f"duplicate index {index} (already on line {seen_on[index]})")
        if field not in obj:
            raise fail(f"missing '{field}'")
        value = obj[field]
        if not isinstance(value, str):
            raise fail(f"'{field}' must be a string, got {_json_type(value)}")
        if (problem := lone_surrogate(value)) is not None:
            user = samples[index].get("user", samples[index].get("user_index"))
            raise fail(f"index {index} (user {user}): '{field}' is {problem}")
        for key in CHECKED_KEYS:
            if key in obj:
                given, expected = obj[key], samples[index].get(key)
                if not (given is None or _is_int(given)):
                    raise fail(f"'{key}' must be an integer, got {_json_type(given)}")
                if given != expected or type(given) is not type(expected):
                    raise fail(f"{key} {given!r} does not match test sample {index} ({key} {expected!r}): "
                               "the file is for another test set")
        seen_on[index] = number
        found[index] = value
    if not seen_on:
        raise UsageError(f"{path}: the file is empty (no predictions)")
    missing = [i for i, v in enumerate(found) if v is None]
    if missing:
        shown = ", ".join(map(str, missing[:MISSING_SHOWN])) + (", ..." if len(missing) > MISSING_SHOWN else "")
        raise UsageError(f"{path}: no prediction for {len(missing)} of {n} test samples (index {shown})")
    return [v for v in found if v is not None]
