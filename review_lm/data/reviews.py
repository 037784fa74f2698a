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


def read_json_file(path: str) -> Any:
    """Parse a UTF-8 JSON file; any problem is a one-line :class:`ReviewDataError`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ReviewDataError(path, "file not found") from None
    except IsADirectoryError:
        raise ReviewDataError(path, "is a directory, not a JSON file") from None
    except OSError as err:
        raise ReviewDataError(path, f"cannot read file: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ReviewDataError(path, f"not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r})") from None
    del raw  # a big file's bytes need not stay alive while its JSON tree is built
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ReviewDataError(path, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


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


def _parse_user(path: str, index: int, obj: Any, global_index: int | None = None) -> UserHistory:
    """Validate one user entry. ``index`` is its position in ``path`` (what errors name); ``global_index`` its
    number across all input files (defaults to ``index``)."""
    def fail(problem: str, name: str | None = None, record: int | None = None):
        return ReviewDataError(path, problem, index, name, record)

    uid = index if global_index is None else global_index
    _expect(obj, dict, "a user entry", fail)
    user = _expect(obj.get("user"), dict, "'user'", fail)
    profile = _expect(user.get("profile"), dict, "'user.profile'", fail)
    name = one_line(_expect(profile.get("name"), str, "'user.profile.name'", fail))

    def fail_named(problem: str, record: int | None = None):
        return fail(problem, name, record)

    task = _expect(obj.get("task"), dict, "'task'", fail_named)
    description = one_line(_expect(task.get("description"), str, "'task.description'", fail_named))
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
    obj = read_json_file(path)
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise ReviewDataError(path, f"top level must be a list of users (or one user object), got {_json_type(obj)}")
    if not obj:
        raise ReviewDataError(path, "the file holds no users")
    users = []
    for i in range(len(obj)):
        users.append(_parse_user(path, i, obj[i], first_index + i))
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
