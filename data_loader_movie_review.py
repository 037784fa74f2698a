"""Douban movie-review histories: load, validate, split chronologically, build the history prompt.

This module is the single source of truth for the model's input: every prompt text and every file format of
a sample (``sample_record`` for test_samples.json, ``preview_text``) is built here. Training
(``train_distributed_MovieReview.py``), evaluation and generation take their prompts from here; the token ids
are assembled from this module's prompt pieces by ``review_lm.dataset``.

Pipeline::

    data = load_review_file(path)                      # validate; sort each user's reviews by time (stable)
    splits = split_chronologically(data, 0.7, 0.15, 0.15)  # per user: oldest -> train, then val, newest -> test
    builder = PromptBuilder(use_profile=True, use_history=True)
    builder.render(sample)                             # prompt text, exactly the spec's "模型输入格式"
    review_lm.dataset.build_datasets(splits, tokenizer, max_length, builder)  # input_ids / labels (torch)

Several files and/or directories of ``.json`` files load as one data set with :func:`load_review_data`
(users numbered globally, so users from different files stay distinct; errors still name the file).

Run as a script it prints the split report (``python data_loader_movie_review.py FILE|DIR ... [--json]``). The
inspection path never imports torch or transformers, and the report is linear in the number of samples.

Data errors raise :class:`ReviewDataError`, whose message is one line naming the file, the user (index and
name), the record index and what is wrong.
"""

from __future__ import annotations

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
        where = [str(path)] if path else []  # no path: a flag error, the message names the flag
        if user_index is not None:
            where.append(f"user #{user_index}" + (f" ({user_name})" if user_name else ""))
        if record_index is not None:
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
def check_ratios(train_ratio: float, val_ratio: float, test_ratio: float, path: str = "") -> None:
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

    def render(self, sample: Sample, history_count: int | None = None, lines: Sequence[str] | None = None) -> str:
        """The prompt for ``sample``, with the most recent ``history_count`` earlier reviews (default: all).

        ``lines``: the user's :meth:`history_lines`, when many prompts of one user are rendered (each line is
        folded once instead of once per prompt holding it); the text is the same."""
        history = self.kept_history(sample, history_count)
        parts = [self.header(sample.user)]
        if history:
            parts.append(self.history_title(len(history)))
            if lines is None:
                parts.extend(self.history_item(r, i == len(history) - 1) for i, r in enumerate(history))
            else:  # history_item(r, last) is history_line(r) + "\n", and one more "\n" after the last one
                parts.append("\n".join(lines[sample.position - len(history):sample.position]) + "\n\n")
        parts.append(self.request(sample.target.movie))
        return "".join(parts)

    @staticmethod
    def history_lines(user: UserHistory) -> list[str]:
        """Every review of ``user`` as its history line (no newline), for :meth:`render`'s ``lines``."""
        return [history_line(r) for r in user.reviews]

    # -- the conversation format (--prompt_format conversation): the same texts as chat turns ---------------------
    # review_lm.chat_format frames them (system turn, user turns, assistant answers); no trailing newlines, the
    # framing supplies the line breaks.
    def system_text(self, user: UserHistory) -> str:
        """The system turn: "用户: NAME\n任务: DESC" (profile on) or "任务: DESC" (--no_profile)."""
        return self.header(user).rstrip("\n")

    @staticmethod
    def request_text(movie: str) -> str:
        """A user turn: "请为电影《MOVIE》写一条影评：" (the spec's request line without its newline)."""
        return PromptBuilder.request(movie).rstrip("\n")

    def turns(self, reviews: Sequence[Review]) -> list[tuple[str, str]]:
        """(request text, review text) per review, in the given (chronological) order."""
        return [(self.request_text(r.movie), r.text) for r in reviews]

    def kept_history(self, sample: Sample, history_count: int | None = None) -> list[Review]:
        if not self.use_history:
            return []
        history = sample.history
        if history_count is not None:
            history = history[len(history) - history_count:] if history_count > 0 else []
        return history


def sample_record(enc) -> dict[str, Any]:
    """The JSON form of an encoded sample, as written to ``test_samples.json`` and read by evaluation.

    ``prompt`` is exactly the text whose tokens the model saw (``tokenizer(prompt, add_special_tokens=False)``
    gives ``input_ids[:prompt_length]``). The user's earlier review texts are not repeated here (they would make
    the file grow with the square of the history): ``position`` is how many reviews the user wrote before this
    one, and :func:`test_histories` stores each user's reviews once, so that evaluation can read this sample's
    earlier reviews (the same for every ablation, whatever the prompt kept) as ``reviews[:position]``.
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
        "position": s.position,
    }


TEST_HISTORIES_FORMAT = "test_histories/1"


def test_histories(samples: Sequence[Sample]) -> dict[str, Any]:
    """The JSON form of test_histories.json: per user of ``samples``, their review texts (oldest first) up to
    their last test sample, stored once; ``test_start`` is the position of the user's first test sample, so
    ``reviews[:test_start]`` are the reviews written before the test split."""
    users: dict[int, dict[str, Any]] = {}
    for s in samples:
        entry = users.get(s.user.index)
        if entry is None:
            entry = users[s.user.index] = {"user_index": s.user.index, "user": s.user.name, "test_start": s.position,
                                           "end": s.position, "reviews": s.user.reviews}
        entry["test_start"] = min(entry["test_start"], s.position)
        entry["end"] = max(entry["end"], s.position)
    return {"format": TEST_HISTORIES_FORMAT, "users": [
        {"user_index": u["user_index"], "user": u["user"], "test_start": u["test_start"],
         "reviews": [r.text for r in u.pop("reviews")[:u["end"]]]} for u in users.values()]}


def preview_text(encoded: Sequence, total: int) -> str:
    """training_samples_preview.txt: the first encoded training samples as the model sees them."""
    blocks = []
    for i, enc in enumerate(encoded, 1):
        s = enc.sample
        target_tokens = len(enc.input_ids) - enc.prompt_length
        blocks.append(
            f"===== 训练样本 {i}/{total}: {s.user.name} · {s.target.movie} · {s.target.timestamp} =====\n"
            f"tokens: prompt {enc.prompt_length} + target {target_tokens} (含 EOS) = {len(enc.input_ids)}"
            f"; 历史 {enc.history_count}/{len(s.history)} 条" + ("; target 已截断" if enc.target_truncated else "")
            + f"\n----- 输入 (prompt) -----\n{enc.prompt}----- 输出 (target, 计算 loss) -----\n{s.target.text}\n"
        )
    return "\n".join(blocks)


LOSS_OPEN, LOSS_CLOSE = "【loss▶", "◀loss】"  # marks of the labelled spans in a conversation preview


def conversation_preview_text(windows: Sequence, total: int) -> str:
    """training_samples_preview.txt for --prompt_format conversation: the first training sequences (windows of
    a user's conversation) as the model sees them, decoded from their ids, every labelled span (review +
    end-of-turn, the loss) between LOSS_OPEN and LOSS_CLOSE. ``windows``: objects with ``user``, ``turns``
    (start, end), ``reviews`` (labelled), ``length``, ``labelled_tokens``, ``truncated``, ``segments``
    ((text, labelled) runs)."""
    blocks = []
    for i, w in enumerate(windows, 1):
        body = "".join(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if labelled else text for text, labelled in w.segments)
        blocks.append(
            f"===== 训练序列 {i}/{total}: {w.user.name} · 第 {w.turns[0] + 1}-{w.turns[1]} 条影评"
            f" (共 {len(w.user.reviews)} 条) =====\n"
            f"tokens: {w.length} (其中计算 loss {w.labelled_tokens}); 计算 loss 的影评 {w.reviews} 条"
            + ("; 影评已截断" if w.truncated else "")
            + f"\n----- 对话 ({LOSS_OPEN} … {LOSS_CLOSE} 之间计算 loss) -----\n{body}\n"
        )
    return "\n".join(blocks)


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


# --------------------------------------------------------------------------------------------------------------
# Report (CLI; its layout lives in review_lm.data_report)
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from review_lm.utils import ArgumentParser  # one-line argument errors (no torch)

    parser = ArgumentParser(description="Inspect a Douban review file and its chronological split.")
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
    from review_lm.data_report import build_report, format_report  # the report's layout (no torch)

    report = build_report(data, splits, PromptBuilder(not args.no_profile, not args.no_history))
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
