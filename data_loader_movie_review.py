"""Douban movie-review histories: load, validate, split chronologically, build the history prompt.

This module is the single source of truth for the model's input. Training (``train_distributed_MovieReview.py``),
its preview file and evaluation (``evaluate_movie_review.py``) all take prompts and token ids from here.

Pipeline::

    data = load_review_file(path)                      # validate; sort each user's reviews by time (stable)
    splits = split_chronologically(data, 0.7, 0.15, 0.15)  # per user: oldest -> train, then val, newest -> test
    builder = PromptBuilder(use_profile=True, use_history=True)
    builder.render(sample)                             # prompt text, exactly the spec's "模型输入格式"
    SampleTokenizer(tokenizer, max_length, builder).encode_split(splits["train"])  # input_ids / labels

Several files and/or directories of ``.json`` files load as one data set with :func:`load_review_data`
(users numbered globally, so users from different files stay distinct; errors still name the file).

Run as a script it prints the split report (``python data_loader_movie_review.py FILE|DIR ... [--json]``). The
inspection path never imports torch or transformers, and the report is linear in the number of samples.

Data errors raise :class:`ReviewDataError`, whose message is one line naming the file, the user (index and
name), the record index and what is wrong.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from tqdm.auto import tqdm

REVIEW_TYPE = "movie_review"
SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.15, 0.15)
IGNORE_INDEX = -100  # label value that the loss ignores (transformers / PyTorch convention)

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
                 user_name: str | None = None, record_index: int | None = None):
        self.path, self.problem = path, problem
        self.user_index, self.user_name, self.record_index = user_index, user_name, record_index
        where = [str(path)]
        if user_index is not None:
            where.append(f"user #{user_index}" + (f" ({user_name})" if user_name else ""))
        if record_index is not None:
            where.append(f"record #{record_index}")
        # One line, whatever the data holds (names and titles may contain newlines).
        super().__init__((": ".join(where) + ": " + problem).replace("\r", "\\r").replace("\n", "\\n"))


# --------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)  # slots: a million reviews must not each carry a __dict__
class Review:
    user_index: int
    user_name: str
    record_index: int  # index inside its collection's "data" list in the file
    movie: str
    text: str  # stripped of leading/trailing whitespace; inner newlines kept
    timestamp: str  # as written in the file
    time: datetime  # parsed, naive (aware times converted to UTC), used for ordering only


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
    """``continuation_prefix`` ("电影名: ") without its trailing colon and space."""
    return _PREFIX_SUFFIX_RE.sub("", prefix)


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
    name = _expect(profile.get("name"), str, "'user.profile.name'", fail)

    def fail_named(problem: str, record: int | None = None):
        return fail(problem, name, record)

    task = _expect(obj.get("task"), dict, "'task'", fail_named)
    description = _expect(task.get("description"), str, "'task.description'", fail_named)
    collections = _expect(task.get("task_behavior_collections"), list, "'task.task_behavior_collections'",
                          fail_named)
    reviews: list[Review] = []
    skipped_empty = ignored = 0
    for c, collection in enumerate(collections):
        where = f"task_behavior_collections[{c}]"
        _expect(collection, dict, where, fail_named)
        ctype = _expect(collection.get("type"), str, f"{where}.type", fail_named)
        if ctype != REVIEW_TYPE:
            ignored += 1
            continue
        data = _expect(collection.get("data"), list, f"{where}.data", fail_named)
        for r, record in enumerate(data):
            def fail_record(problem: str, r=r):
                return fail_named(problem, r)

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
            reviews.append(Review(uid, name, r, movie, text.strip(), stamp.strip(), when))
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


# --------------------------------------------------------------------------------------------------------------
# Chronological split
# --------------------------------------------------------------------------------------------------------------
def check_ratios(train_ratio: float, val_ratio: float, test_ratio: float, path: str = "arguments") -> None:
    for name, value in (("train_ratio", train_ratio), ("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ReviewDataError(path, f"--{name} must be between 0 and 1, got {value}")
    total = train_ratio + val_ratio + test_ratio
    if abs(total - 1.0) > 1e-6:
        raise ReviewDataError(path, f"--train_ratio + --val_ratio + --test_ratio must sum to 1, got {total:g}")


def split_sizes(n: int, train_ratio: float, val_ratio: float) -> tuple[int, int, int]:
    """``int(n*train)`` train, ``int(n*val)`` val, the rest test (28 -> 19/4/5).

    A tiny epsilon keeps float products such as 0.7*10 = 6.999... from losing a review.
    """
    n_train = min(n, int(n * train_ratio + 1e-9))
    n_val = min(n - n_train, int(n * val_ratio + 1e-9))
    return n_train, n_val, n - n_train - n_val


def split_chronologically(data: ReviewData, train_ratio: float = DEFAULT_RATIOS[0],
                          val_ratio: float = DEFAULT_RATIOS[1],
                          test_ratio: float = DEFAULT_RATIOS[2]) -> dict[str, list[Sample]]:
    """Per user, oldest reviews train, the next ones validate, the newest test. Never random.

    Every non-empty review is one sample; its history is *all* of the user's earlier reviews, whatever split
    they fell in (the past is known when the future is predicted), and never a later one.
    """
    check_ratios(train_ratio, val_ratio, test_ratio, data.path)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for user in data.users:
        sizes = split_sizes(len(user.reviews), train_ratio, val_ratio)
        position = 0
        for name, size in zip(SPLITS, sizes, strict=True):
            for _ in range(size):
                splits[name].append(Sample(user, position, name))
                position += 1
    return splits


# --------------------------------------------------------------------------------------------------------------
# The prompt (spec: "模型输入格式")
# --------------------------------------------------------------------------------------------------------------
def history_line(review: Review) -> str:
    """One history item, on one line: inner newlines and runs of whitespace are folded to single spaces."""
    return f"  电影《{review.movie}》: {' '.join(review.text.split())}"


@dataclass(frozen=True)
class PromptBuilder:
    """Renders the model input. The prompt ends with a newline; the target review follows it directly::

        用户: Y
        任务: 基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式

        历史影评记录 (19条):
          电影《钢铁侠1》: boring
          ...

        请为电影《美人鱼》写一条影评：
    """

    use_profile: bool = True
    use_history: bool = True

    # The prompt is assembled from these pieces (and SampleTokenizer tokenizes the same pieces), so text and
    # token ids cannot drift apart. Piece boundaries sit right after a newline and never between two
    # newlines, because BPE pre-tokenisation merges "\n\n" (and punctuation + "\n") into one token.
    def header(self, user: UserHistory) -> str:
        profile = f"用户: {user.name}\n" if self.use_profile else ""
        return f"{profile}任务: {user.description}\n\n"

    @staticmethod
    def history_title(count: int) -> str:
        return f"历史影评记录 ({count}条):\n"

    @staticmethod
    def history_item(review: Review, last: bool) -> str:
        # The blank line after the history block belongs to its last item (see the note above).
        return history_line(review) + ("\n\n" if last else "\n")

    @staticmethod
    def request(movie: str) -> str:
        return f"请为电影《{movie}》写一条影评：\n"

    def render(self, sample: Sample, history_count: int | None = None) -> str:
        """The prompt for ``sample``, with the most recent ``history_count`` earlier reviews (default: all)."""
        history = self.kept_history(sample, history_count)
        parts = [self.header(sample.user)]
        if history:
            parts.append(self.history_title(len(history)))
            parts.extend(self.history_item(r, i == len(history) - 1) for i, r in enumerate(history))
        parts.append(self.request(sample.target.movie))
        return "".join(parts)

    def kept_history(self, sample: Sample, history_count: int | None = None) -> list[Review]:
        if not self.use_history:
            return []
        history = sample.history
        if history_count is not None:
            history = history[len(history) - history_count:] if history_count > 0 else []
        return history


# --------------------------------------------------------------------------------------------------------------
# Token ids for training
# --------------------------------------------------------------------------------------------------------------
@dataclass
class EncodedSample:
    sample: Sample
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the target
    history_count: int  # history items kept in the prompt
    target_truncated: bool
    builder: PromptBuilder = field(default=PromptBuilder(), repr=False)  # the builder the ids came from

    @property
    def prompt(self) -> str:
        """The rendered prompt these ids came from (same history items)."""
        return self.builder.render(self.sample, self.history_count)

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


class SampleTokenizer:
    """Turns samples into ``input_ids`` / ``labels`` under a token budget.

    ``input_ids = prompt + target + [EOS]``; ``labels`` are -100 on the prompt and equal to the ids on the
    target and EOS. Labels come from spans, never from masking pad ids, so EOS stays labelled when the pad id
    equals the EOS id (Qwen2.5 base).

    Budget: the most recent history items that fit in ``max_length`` are kept ("(N条)" shows how many);
    the target is never dropped, only truncated if it alone does not fit.

    Cost: each review is tokenized once (plus once more as the last history item, whose piece carries the
    blank line) and every user's samples are assembled from those cached pieces. Re-tokenizing the rendered
    prompt for each sample would cost O(n^2) tokenizer work per user, since a user's n-th sample repeats all
    n-1 earlier reviews; users with thousands of reviews are normal. Prefix sums over the piece lengths find
    how many history items fit with one binary search per sample. Because piece boundaries sit just after a
    newline (see ``PromptBuilder``), the assembled ids equal ``tokenizer(prompt)`` for BPE tokenizers with
    GPT-2/Qwen-style pre-tokenisation; the tests check this on the example data with the real Qwen vocabulary.
    """

    def __init__(self, tokenizer, max_length: int | None, builder: PromptBuilder = PromptBuilder()):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
        self.tokenizer, self.max_length, self.builder = tokenizer, max_length, builder
        self._cache: dict[str, list[int]] = {}
        self.truncated_targets = 0

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = ids
        return ids

    def encode_split(self, samples: list[Sample]) -> list[EncodedSample]:
        by_user: dict[int, list[Sample]] = {}
        for s in samples:
            by_user.setdefault(s.user.index, []).append(s)
        encoded: dict[tuple[int, int], EncodedSample] = {}
        for user_samples in by_user.values():
            for enc in self._encode_user(user_samples):
                encoded[(enc.sample.user.index, enc.sample.position)] = enc
        return [encoded[(s.user.index, s.position)] for s in samples]

    def encode(self, sample: Sample) -> EncodedSample:
        return self.encode_split([sample])[0]

    def count_text_mismatches(self, encoded: list[EncodedSample], limit: int = 32) -> int:
        """How many of the first ``limit`` samples' prompt ids differ from ``tokenizer(prompt)``.

        Zero for Qwen-style BPE tokenizers; a tokenizer whose pre-tokenisation crosses newlines may differ, and
        then generation from the prompt *text* (evaluation) sees slightly different ids than training did.
        """
        return sum(
            self.tokenizer(e.prompt, add_special_tokens=False)["input_ids"] != e.input_ids[: e.prompt_length]
            for e in encoded[:limit]
        )

    def _encode_user(self, samples: list[Sample]) -> list[EncodedSample]:
        user = samples[0].user
        reviews = user.reviews
        # Lengths of each review as a non-last history item, prefix-summed once per user.
        lengths = [0]
        if self.builder.use_history:
            upto = max(s.position for s in samples)
            for r in reviews[:upto]:
                lengths.append(lengths[-1] + len(self._ids(self.builder.history_item(r, last=False))))
        header = self._ids(self.builder.header(user))
        out = []
        for s in samples:
            out.append(self._encode_one(s, header, lengths))
        return out

    def _encode_one(self, s: Sample, header: list[int], lengths: list[int]) -> EncodedSample:
        eos = self.tokenizer.eos_token_id
        request = self._ids(self.builder.request(s.target.movie))
        target = self._ids(s.target.text)
        base = len(header) + len(request)
        truncated = False
        if self.max_length is not None and base + len(target) + 1 > self.max_length:
            room = self.max_length - base - 1
            if room < 1:
                raise ReviewDataError(
                    f"--max_length {self.max_length}", f"too small: the prompt without history already needs "
                    f"{base} tokens for {s.target.movie!r}", s.user.index, s.user.name, s.target.record_index)
            target, truncated = target[:room], True
            self.truncated_targets += 1
        available = None if self.max_length is None else self.max_length - base - len(target) - 1
        count = self._history_count(s, lengths, available)
        ids = list(header)
        if count:
            ids += self._ids(self.builder.history_title(count))
            first = s.position - count
            for j in range(first, s.position):
                ids += self._ids(self.builder.history_item(s.user.reviews[j], last=j == s.position - 1))
        ids += request
        prompt_length = len(ids)
        ids += target + [eos]
        labels = [IGNORE_INDEX] * prompt_length + target + [eos]
        return EncodedSample(s, ids, labels, prompt_length, count, truncated, self.builder)

    def _history_count(self, s: Sample, lengths: list[int], available: int | None) -> int:
        """How many of the most recent history items fit in ``available`` tokens."""
        n = s.position if self.builder.use_history else 0
        if n == 0 or available is None:
            return n
        last = s.user.reviews[n - 1]
        last_len = len(self._ids(self.builder.history_item(last, last=True)))

        def cost(k: int) -> int:  # tokens for the k most recent items, title included
            return (len(self._ids(self.builder.history_title(k))) + last_len
                    + lengths[n - 1] - lengths[n - k])

        # cost(k) grows with k, so binary search for the largest k that fits.
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= available:
                lo = mid
            else:
                hi = mid - 1
        return lo


def sample_record(enc: EncodedSample) -> dict[str, Any]:
    """The JSON form of an encoded sample, as written to ``test_samples.json`` and read by evaluation.

    ``prompt`` is exactly the text whose tokens the model saw (``tokenizer(prompt, add_special_tokens=False)``
    gives ``input_ids[:prompt_length]``); ``earlier_reviews`` are all of the user's earlier review texts, oldest
    first, whatever the prompt kept, so model-free baselines are the same for every ablation.
    """
    s = enc.sample
    return {
        "user": s.user.name,
        "user_index": s.user.index,
        "record_index": s.target.record_index,
        "movie": s.target.movie,
        "timestamp": s.target.timestamp,
        "split": s.split,
        "prompt": enc.prompt,
        "reference": s.target.text,
        "history_count": enc.history_count,
        "prompt_tokens": enc.prompt_length,
        "target_truncated": enc.target_truncated,
        "earlier_reviews": [r.text for r in s.history],
    }


# --------------------------------------------------------------------------------------------------------------
# A review of a new film (generate_review.py): the same prompt as training, after the user's whole history
# --------------------------------------------------------------------------------------------------------------
NEW_REVIEW_SPLIT = "new"


def new_review_sample(user: UserHistory, movie: str) -> Sample:
    """A sample asking ``user`` for a review of ``movie`` now, i.e. after all of their reviews.

    Its history is the user's whole history, oldest first (a film already in it is allowed: that review stays
    in the history). The target is a placeholder with empty text, timed with the last review; only its movie
    name reaches the prompt. The user object itself is not changed.
    """
    last_time = user.reviews[-1].time if user.reviews else datetime.min
    placeholder = Review(user.index, user.name, -1, movie, "", "", last_time)
    return Sample(replace(user, reviews=[*user.reviews, placeholder]), len(user.reviews), NEW_REVIEW_SPLIT)


def encode_new_review(tokenizer, user: UserHistory, movie: str, builder: PromptBuilder, max_length: int | None,
                      max_new_tokens: int) -> EncodedSample:
    """Prompt text and ids for a new review of ``movie``: ``enc.prompt`` and ``enc.input_ids[:enc.prompt_length]``.

    Budget: prompt + ``max_new_tokens`` <= ``max_length`` (the run's --max_length with room kept for the
    review), the most recent history that fits is kept, exactly as in training. SampleTokenizer's budget holds
    prompt + target + EOS; with an empty target, a budget of ``max_length - max_new_tokens + 1`` leaves the
    prompt ``max_length - max_new_tokens`` tokens. ``max_length=None``: the whole history.
    """
    budget = None if max_length is None else max_length - max_new_tokens + 1
    try:
        return SampleTokenizer(tokenizer, budget, builder).encode(new_review_sample(user, movie))
    except ReviewDataError:  # SampleTokenizer's message would name the reduced budget: say it in the user's terms
        raise ReviewDataError(f"--max_length {max_length}", f"leaves no room for the prompt for {movie!r} (even "
                              f"without history) plus --max_new_tokens {max_new_tokens}",
                              user.index, user.name) from None


# --------------------------------------------------------------------------------------------------------------
# Report (CLI)
# --------------------------------------------------------------------------------------------------------------
def _time_range(samples: list[Sample]) -> list[str] | None:
    """Earliest and latest target timestamp, as a stable sort by time would give them: among equal times the
    first sample is the earliest and the last one the latest. Two linear scans instead of a sort."""
    if not samples:
        return None
    first = min(samples, key=lambda s: s.target.time)
    last = max(reversed(samples), key=lambda s: s.target.time)
    return [first.target.timestamp, last.target.timestamp]


def split_summary(samples_by_split: dict[str, list[Sample]]) -> dict[str, Any]:
    return {name: {"samples": len(ss), "time_range": _time_range(ss)} for name, ss in samples_by_split.items()}


REPORT_USERS_LISTED = 20  # the text report lists every user up to this many, then summarises (--json keeps all)
REPORT_EXTREMES = 5  # users shown with the most / fewest reviews


def _samples_by_user(splits: dict[str, list[Sample]]) -> dict[int, dict[str, list[Sample]]]:
    """One pass over all samples (not one per user): user index -> split -> that user's samples."""
    by_user: dict[int, dict[str, list[Sample]]] = {}
    for name, samples in splits.items():
        for s in samples:
            mine = by_user.get(s.user.index)
            if mine is None:
                mine = by_user[s.user.index] = {n: [] for n in splits}
            mine[name].append(s)
    return by_user


def _user_brief(user: UserHistory) -> dict[str, Any]:
    return {"index": user.index, "name": user.name, "reviews": len(user.reviews), "file": user.file}


def build_report(data: ReviewData, splits: dict[str, list[Sample]], builder: PromptBuilder) -> dict[str, Any]:
    by_user = _samples_by_user(splits)
    no_samples = {name: [] for name in splits}
    per_user = []
    for user in data.users:
        per_user.append({
            "index": user.index, "name": user.name, "reviews": len(user.reviews),
            "skipped_empty": user.skipped_empty, "ignored_collections": user.ignored_collections,
            "file": user.file, "splits": split_summary(by_user.get(user.index, no_samples)),
        })
    warnings = [f"the {name} split is empty" for name in ("val", "test") if not splits[name]]
    example = next((splits[name][0] for name in ("val", "test") if splits[name]), None) or splits["train"][-1]
    most = heapq.nsmallest(REPORT_EXTREMES, data.users, key=lambda u: (-len(u.reviews), u.index))
    fewest = heapq.nsmallest(REPORT_EXTREMES, data.users, key=lambda u: (len(u.reviews), u.index))
    return {
        "file": data.path,
        "files": data.files or [data.path],
        "users": len(data.users),
        "reviews": data.num_reviews,
        "samples": sum(len(ss) for ss in splits.values()),
        "skipped": {
            "empty_reviews": sum(u.skipped_empty for u in data.users),
            "non_movie_review_collections": sum(u.ignored_collections for u in data.users),
        },
        "splits": split_summary(splits),
        "users_with_empty_split": {name: sum(1 for u in per_user if u["splits"][name]["samples"] == 0)
                                   for name in splits},
        "most_reviews": [_user_brief(u) for u in most],
        "fewest_reviews": [_user_brief(u) for u in fewest],
        "per_user": per_user,
        "warnings": warnings,
        "example": {
            "user": example.user.name, "movie": example.target.movie, "timestamp": example.target.timestamp,
            "split": example.split, "prompt": builder.render(example), "target": example.target.text,
        },
    }


def _elide_history(prompt: str, keep: int = 10) -> str:
    """For display only: show the first and last few history lines of a long prompt."""
    lines = prompt.split("\n")
    items = [i for i, line in enumerate(lines) if line.startswith("  电影《")]
    if len(items) <= keep:
        return prompt
    half = keep // 2
    hidden = items[half:-half]
    lines[hidden[0]:hidden[-1] + 1] = [f"  ...（省略 {len(hidden)} 条）"]
    return "\n".join(lines)


def _files_line(files: list[str], shown: int = 3) -> str:
    if len(files) == 1:
        return f"文件: {files[0]}"
    more = f" 等（共 {len(files)} 个）" if len(files) > shown else ""
    return f"文件 ({len(files)} 个): " + ", ".join(files[:shown]) + more


def format_report(report: dict[str, Any]) -> str:
    def span(r):
        return f"{r[0]} ~ {r[1]}" if r else "-"

    files = report.get("files") or [report["file"]]
    out = [
        _files_line(files),
        f"用户数: {report['users']}  影评数: {report['reviews']}  样本数: {report['samples']}",
        f"跳过: 空影评 {report['skipped']['empty_reviews']} 条; "
        f"非 movie_review 集合 {report['skipped']['non_movie_review_collections']} 个",
        "",
        "数据划分 (按时间顺序):",
    ]
    for name, info in report["splits"].items():
        out.append(f"  {name:<5} {info['samples']:>5} 条  {span(info['time_range'])}")
    if 1 < report["users"] <= REPORT_USERS_LISTED:
        out.append("")
        out.append("各用户划分:")
        for u in report["per_user"]:
            parts = "  ".join(f"{n} {i['samples']} ({span(i['time_range'])})" for n, i in u["splits"].items())
            source = f" [{os.path.basename(u['file'])}]" if len(files) > 1 else ""
            out.append(f"  #{u['index']} {u['name']}{source}: {u['reviews']} 条 (空 {u['skipped_empty']})  {parts}")
    elif report["users"] > REPORT_USERS_LISTED:
        def brief(users):
            return ", ".join(f"#{u['index']} {u['name']} ({u['reviews']})" for u in users)

        empty = report["users_with_empty_split"]
        out += [
            "",
            f"各用户 ({report['users']} 个，完整列表见 --json):",
            f"  影评最多: {brief(report['most_reviews'])}",
            f"  影评最少: {brief(report['fewest_reviews'])}",
            f"  val 为空的用户: {empty['val']} 个; test 为空的用户: {empty['test']} 个",
        ]
    for w in report["warnings"]:
        out.append(f"警告: {w}")
    ex = report["example"]
    out += [
        "",
        f"样本示例 ({ex['split']}, {ex['user']}, {ex['timestamp']}):",
        "----- 输入 -----",
        _elide_history(ex["prompt"]).rstrip("\n"),
        "----- 输出 -----",
        ex["target"],
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect a Douban review file and its chronological split.")
    parser.add_argument("data_file", nargs="+",
                        help="review JSON file(s) and/or directories of .json files, loaded as one data set")
    parser.add_argument("--train_ratio", type=float, default=DEFAULT_RATIOS[0], help="training share (0.7)")
    parser.add_argument("--val_ratio", type=float, default=DEFAULT_RATIOS[1], help="validation share (0.15)")
    parser.add_argument("--test_ratio", type=float, default=DEFAULT_RATIOS[2], help="test share (0.15)")
    parser.add_argument("--no_profile", action="store_true", help="drop the 用户 line from the prompt")
    parser.add_argument("--no_history", action="store_true", help="drop the history block from the prompt")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        check_ratios(args.train_ratio, args.val_ratio, args.test_ratio)
        data = load_review_data(args.data_file)
        splits = split_chronologically(data, args.train_ratio, args.val_ratio, args.test_ratio)
    except ReviewDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = build_report(data, splits, PromptBuilder(not args.no_profile, not args.no_history))
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
