"""Douban review histories: the data model, reading and validating review files.

``load_review_file`` / ``load_review_data`` read the spec's JSON (one object per user, or a list of them; several
files and/or directories of ``.json`` files load as one data set, users numbered globally so users from different
files stay distinct), validate every record and sort each user's reviews by time (stable).

Data errors raise :class:`ReviewDataError`, whose message is one line naming the file, the user (index and
name), the record index and what is wrong. Imports no torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from tqdm.auto import tqdm

REVIEW_TYPE = "movie_review"

# Accepted timestamps: a date, optionally followed by a time ("2010-08-22", "2010-08-22 13:05",
# "2010-08-22T13:05:09", "2010-08-22T13:05:09.123+08:00", "...Z"). Anything else is an input error.
_TIMESTAMP_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}"
    r"(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})?)?$"
)
# "电影名: " -> "电影名". Only one trailing colon (ASCII or full-width) plus at most one space is removed, so a
# title that itself ends in a colon or a space survives.
_PREFIX_SUFFIX_RE = re.compile(r"[:：] ?$")


class ReviewDataError(ValueError):
    """Bad input. ``str(err)`` is one line: file, user (index and name), record index, what is wrong."""

    def __init__(self, path: str, problem: str, user_index: int | None = None,
                 user_name: str | None = None, record_index: int | None = None,
                 collection: tuple[int, int] | None = None):
        self.path, self.problem = path, problem
        self.user_index, self.user_name, self.record_index = user_index, user_name, record_index
        where = [str(path)] if path else []  # no path: a flag error, the message names the flag
        if user_index is not None:
            where.append(f"user #{user_index}" + (f" ({user_name})" if user_name else ""))
        if collection is not None:  # a user with several movie_review collections: where it is in the file
            where.append(f"task_behavior_collections[{collection[0]}] record #{collection[1]}")
        elif record_index is not None:
            where.append(f"record #{record_index}")
        # One line, whatever the data holds (names and titles may contain newlines).
        message = "".join(f"{w}: " for w in where) + problem
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


# --------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)  # slots: a million reviews must not each carry a __dict__
class Review:
    user_index: int
    user_name: str
    # Index inside its collection's "data" list in the file; with several movie_review collections, inside their
    # concatenation (unique per user: test_samples.json and predictions identify a review by it).
    record_index: int
    movie: str
    text: str  # stripped of leading/trailing whitespace; inner newlines kept
    timestamp: str  # as written in the file
    time: datetime  # parsed, naive (aware times converted to UTC), used for ordering only
    collection: tuple[int, int] | None = None  # (collection, index in it) when the user has several collections


@dataclass
class UserHistory:
    index: int
    name: str
    description: str
    reviews: list[Review]  # non-empty reviews, oldest first (stable for equal times)
    skipped_empty: int = 0
    ignored_collections: int = 0
    file: str = ""  # the file this user came from
    file_index: int | None = None  # position inside that file (``index`` is global across all input files)


@dataclass
class ReviewData:
    path: str  # the input as given: one file, or several paths joined with ", "
    users: list[UserHistory]
    files: list[str] = field(default_factory=list)  # every file read, in load order (users are numbered in it)

    @property
    def num_reviews(self) -> int:
        return sum(len(u.reviews) for u in self.users)


@dataclass(frozen=True, slots=True)
class Sample:
    """One training/evaluation example: predict ``target`` from the user's earlier reviews."""

    user: UserHistory
    position: int  # index of the target in ``user.reviews``; the history is ``user.reviews[:position]``
    split: str

    @property
    def target(self) -> Review:
        return self.user.reviews[self.position]

    @property
    def history(self) -> list[Review]:
        return self.user.reviews[: self.position]


# --------------------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------------------
def parse_timestamp(value: str) -> datetime:
    """Parse a review timestamp; raise ``ValueError`` for anything but the accepted forms."""
    if not _TIMESTAMP_RE.match(value):
        raise ValueError(f"bad timestamp {value!r} (expected YYYY-MM-DD, optionally with a time)")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as err:  # e.g. month 13
        raise ValueError(f"bad timestamp {value!r}: {err}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def movie_name(prefix: str) -> str:
    """``continuation_prefix`` ("电影名: ") without its trailing colon and space, on one line (:func:`one_line`)."""
    return one_line(_PREFIX_SUFFIX_RE.sub("", prefix))


# Every line break str.splitlines knows (a title pasted from a web page may hold \u2028 or \x85, not only \n).
_LINE_BREAK_RE = re.compile(r"[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """A name, title or task description as one line: with a line break in it, every run of whitespace is
    folded to one space and the ends stripped (as review text is in history lines); without one, unchanged.

    Folded, not refused: such a field sits on one line of the prompt (``用户: NAME``, ``任务: ...``,
    ``电影《TITLE》``), where a line break would add a line to the header or split a history item - a name
    ``Y\n任务: 假任务`` would add a fake 任务 line. Scraped exports do carry such breaks (a title wrapped on the
    web page); refusing would reject a real user's whole file for a cosmetic break, while folding keeps every
    word. The loader folds once, so training, evaluation and generation (``--movie``, ``--user``, which fold
    the same way) all see the same one-line text; clean fields are byte-identical.
    """
    return " ".join(text.split()) if _LINE_BREAK_RE.search(text) else text


# Deepest nesting of [ and { a file may have. The deepest valid layout (a review file: users list > user > task >
# collections list > collection > data list > record > context list > a context item) needs under 10 levels;
# anything past this is hostile or broken, and left to json.loads it costs a RecursionError deep in the parser,
# or a second one later when a record is re-written with json.dumps(indent=...) (pure-Python recursion).
MAX_JSON_DEPTH = 64
# A lone surrogate can only enter through a JSON escape (UTF-8 bytes cannot encode one): \ud800..\udfff.
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_BRACKETS_KEPT = b'"[]{}'
_DROP_BUT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS_KEPT)


def nested_too_deeply(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Does the JSON text ``raw`` nest [ and { deeper than ``limit``? Checked on the bytes before parsing.

    Why a pre-scan rather than json.loads under a guarded recursion limit: the parser's recursion guard depends on
    the interpreter version (a C-stack limit since 3.12), a file that parses may still break the pure-Python
    encoder when a record is written back, and the scan costs a tenth of the parse (no second load): escaped
    quotes are dropped, then every byte but quotes and brackets (C-speed bytes operations); what is left is
    small, and numpy finds the brackets outside strings and their deepest running count. Unbalanced brackets
    are left to json.loads, which names the position.
    """
    if len(raw) < 1 << 16 and raw.count(b"[") + raw.count(b"{") <= limit:  # a small record: nothing to scan
        return False
    if b'\\"' in raw:  # an escaped quote (or a backslash that ends a string): drop escapes so quotes pair up
        if b'\\\\"' in raw:  # ...\\" : the quote may or may not be escaped, so drop escaped backslashes first
            raw = raw.replace(b"\\\\", b"")
        raw = raw.replace(b'\\"', b"")
    kept = np.frombuffer(raw.translate(None, _DROP_BUT_BRACKETS), dtype=np.uint8)
    quotes = kept == ord('"')
    outside = (np.cumsum(quotes, dtype=np.int64) & 1) == 0  # an even number of quotes so far: not in a string
    brackets = kept[outside & ~quotes]
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def lone_surrogate(text: str) -> str | None:
    """A problem phrase when ``text`` holds a lone surrogate (valid JSON, invalid Unicode), else None."""
    match = _SURROGATE_RE.search(text)
    if match is None:
        return None
    return (f"not valid Unicode: a lone surrogate \\u{ord(match.group()):04x} at character {match.start()} "
            "(an unpaired \\ud800-\\udfff escape); fix or remove it")


def find_lone_surrogate(obj: Any) -> tuple[list[str | int], str] | None:
    """The JSON path (keys and indices) of the first string or key holding a lone surrogate, with the problem."""
    stack: list[tuple[list[str | int], Any]] = [([], obj)]  # iterative: the depth is bounded, the width is not
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if (problem := lone_surrogate(value)) is not None:
                return where, problem
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                if (problem := lone_surrogate(key)) is not None:
                    return [*where, key], "a key is " + problem
                stack.append(([*where, key], item))
        elif isinstance(value, list):
            stack.extend(([*where, i], item) for i, item in reversed(list(enumerate(value))))
    return None


def json_path(where: list[str | int]) -> str:
    """``[3].reference``, ``arguments.model_path``: where a value sits in a JSON document."""
    text = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where)
    return text.lstrip(".") or "the top level"


def unreadable_file(path: str, err: OSError) -> ReviewDataError:
    """The one-line error for a data file that cannot be opened (the loader's, and the run fingerprint's)."""
    if isinstance(err, FileNotFoundError):
        return ReviewDataError(path, "file not found")
    if isinstance(err, IsADirectoryError):
        return ReviewDataError(path, "is a directory, not a JSON file")
    return ReviewDataError(path, f"cannot read file: {err.strerror or err}")


def _read_json(path: str) -> tuple[Any, bool]:
    """The parsed file, and whether its bytes hold a surrogate escape (only then can a string be invalid)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise unreadable_file(path, err) from None
    if nested_too_deeply(raw):
        raise ReviewDataError(path, f"nested too deeply (more than {MAX_JSON_DEPTH} levels of [ and {{); "
                                    "no valid file nests that deep")
    surrogates = _SURROGATE_ESCAPE_RE.search(raw) is not None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ReviewDataError(path, f"not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r})") from None
    del raw  # a big file's bytes need not stay alive while its JSON tree is built
    try:
        return json.loads(text), surrogates
    except json.JSONDecodeError as err:
        raise ReviewDataError(path, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:  # unreachable after the pre-scan; kept so that no path ends in a traceback
        raise ReviewDataError(path, "nested too deeply") from None


def read_json_file(path: str, where: Callable[[Any, list[str | int]], str] | None = None) -> Any:
    """Parse a UTF-8 JSON file a user gave; any problem is a one-line :class:`ReviewDataError`.

    The one reader of users' JSON files: nesting deeper than :data:`MAX_JSON_DEPTH` is refused before parsing,
    and every string (and key) must be valid Unicode - a lone surrogate is named by ``where(document, path)``
    (default: the JSON path, e.g. ``[3].reference``)."""
    obj, surrogates = _read_json(path)
    if surrogates and (found := find_lone_surrogate(obj)) is not None:
        at, problem = found
        raise ReviewDataError(path, f"{(where or (lambda _obj, p: json_path(p)))(obj, at)}: {problem}")
    return obj


def _expect(value: Any, kind: type, what: str, err: Callable[[str], ReviewDataError]) -> Any:
    """Return ``value`` if it has JSON type ``kind``, else raise ``err(problem)``."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise err(f"{what} must be {_TYPE_NAMES[kind]}, got {_json_type(value)}")
    return value


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _parse_user(path: str, index: int, obj: Any, global_index: int | None = None,
                check_text: bool = True) -> UserHistory:
    """Validate one user entry. ``index`` is its position in ``path`` (what errors name); ``global_index`` its
    number across all input files (defaults to ``index``). ``check_text``: check that every string used is valid
    Unicode (skipped when the file's bytes hold no surrogate escape, the only way an invalid one can enter)."""
    def fail(problem: str, name: str | None = None, record: int | None = None):
        return ReviewDataError(path, problem, index, name, record)

    def text_ok(value: str, what: str, err: Callable[[str], ReviewDataError]) -> str:
        if check_text and (problem := lone_surrogate(value)) is not None:
            raise err(f"{what} is {problem}")
        return value

    uid = index if global_index is None else global_index
    _expect(obj, dict, "a user entry", fail)
    user = _expect(obj.get("user"), dict, "'user'", fail)
    profile = _expect(user.get("profile"), dict, "'user.profile'", fail)
    name = one_line(text_ok(_expect(profile.get("name"), str, "'user.profile.name'", fail), "'user.profile.name'",
                            fail))

    def fail_named(problem: str, record: int | None = None):
        return fail(problem, name, record)

    task = _expect(obj.get("task"), dict, "'task'", fail_named)
    description = one_line(text_ok(_expect(task.get("description"), str, "'task.description'", fail_named),
                                   "'task.description'", fail_named))
    collections = _expect(task.get("task_behavior_collections"), list, "'task.task_behavior_collections'",
                          fail_named)
    reviews: list[Review] = []
    skipped_empty = ignored = offset = 0
    several = sum(isinstance(col, dict) and col.get("type") == REVIEW_TYPE for col in collections) > 1
    for c, collection in enumerate(collections):
        where = f"task_behavior_collections[{c}]"
        _expect(collection, dict, where, fail_named)
        ctype = _expect(collection.get("type"), str, f"{where}.type", fail_named)
        if ctype != REVIEW_TYPE:
            ignored += 1
            continue
        data = _expect(collection.get("data"), list, f"{where}.data", fail_named)
        for r, record in enumerate(data):
            where_r = (c, r) if several else None

            def fail_record(problem: str, r=offset + r, where_r=where_r):
                return ReviewDataError(path, problem, index, name, r, where_r)

            _expect(record, dict, "the record", fail_record)
            text = _expect(record.get("continuation"), str, "'continuation'", fail_record)
            prefix = _expect(record.get("continuation_prefix"), str, "'continuation_prefix'", fail_record)
            stamp = _expect(record.get("timestamp"), str, "'timestamp'", fail_record)
            for key, value in (("continuation", text), ("continuation_prefix", prefix)):
                text_ok(value, f"'{key}'", fail_record)
            if "context" in record:
                _expect(record["context"], list, "'context'", fail_record)
            try:
                when = parse_timestamp(stamp.strip())
            except ValueError as err:
                raise fail_record(str(err)) from None
            movie = movie_name(prefix)
            if not movie.strip():
                raise fail_record(f"empty movie name in continuation_prefix {prefix!r}")
            if not text.strip():
                skipped_empty += 1
                continue
            reviews.append(Review(uid, name, offset + r, movie, text.strip(), stamp.strip(), when, where_r))
        offset += len(data)
    reviews.sort(key=lambda rv: rv.time)  # list.sort is stable: same-day reviews keep file order
    return UserHistory(uid, name, description, reviews, skipped_empty, ignored, path, index)


def _parse_users(path: str, first_index: int = 0) -> list[UserHistory]:
    """The validated users of one file, numbered from ``first_index``."""
    obj, check_text = _read_json(path)
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise ReviewDataError(path, f"top level must be a list of users (or one user object), got {_json_type(obj)}")
    if not obj:
        raise ReviewDataError(path, "the file holds no users")
    users = []
    for i in range(len(obj)):
        users.append(_parse_user(path, i, obj[i], first_index + i, check_text))
        obj[i] = None  # drop the parsed JSON as we go: the tree of a big file is the peak of the whole load
    return users


def _check_usable(data: ReviewData) -> ReviewData:
    if data.num_reviews == 0:
        skipped = sum(u.skipped_empty for u in data.users)
        raise ReviewDataError(data.path, f"no usable reviews (all {skipped} review texts are empty)"
                              if skipped else "no usable reviews (no movie_review records)")
    return data


def load_review_file(path: str) -> ReviewData:
    """Read and validate a review file: a list of user objects, or one user object.

    Empty / whitespace-only reviews are skipped and counted; collections whose type is not ``movie_review``
    are ignored and counted. Raises :class:`ReviewDataError` for anything malformed.
    """
    return _check_usable(ReviewData(path, _parse_users(path), [path]))


def expand_data_paths(paths: Sequence[str]) -> list[str]:
    """Files named by ``paths``: a file stays itself, a directory gives its ``*.json`` files (sorted by name,
    not recursive: exports often come as one user per file). The same file named twice is an error."""
    files: list[tuple[str, str]] = []  # (file, the argument that named it)
    for path in paths:
        if os.path.isdir(path):
            found = sorted(n for n in os.listdir(path) if n.lower().endswith(".json")
                           and os.path.isfile(os.path.join(path, n)))
            if not found:
                raise ReviewDataError(path, "the directory holds no .json files")
            files.extend((os.path.join(path, n), path) for n in found)
        else:
            files.append((path, path))  # missing / unreadable files are reported by read_json_file
    seen: dict[str, str] = {}
    for f, origin in files:
        key = os.path.realpath(f)
        if key in seen:
            both = f" (named by {seen[key]} and by {origin})" if seen[key] != origin else ""
            raise ReviewDataError(f, f"given twice{both}; each file may be loaded once")
        seen[key] = origin
    return [f for f, _ in files]


def load_review_data(paths: str | Sequence[str]) -> ReviewData:
    """Several files and/or directories of ``.json`` files as one data set.

    Users are numbered globally in load order (``UserHistory.index``), so users from different files stay
    distinct even with the same name; errors still name the file and the user's position inside it. One file
    gives exactly :func:`load_review_file`'s result.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ReviewDataError("arguments", "no data file given")
    files = expand_data_paths(paths)
    if len(files) == 1 and files == paths:
        return load_review_file(files[0])
    users: list[UserHistory] = []
    for f in tqdm(files, desc="reading review files", unit="file", disable=None if len(files) > 20 else True):
        users.extend(_parse_users(f, len(users)))
    return _check_usable(ReviewData(", ".join(paths), users, files))
