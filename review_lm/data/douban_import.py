"""Douban data in: turn a Douban layout (review_lm.douban_formats) into the project's review JSON.

``import_douban.py`` tells the story; the mechanisms are here:

* :class:`Collector` - the sink the readers stream into: timestamps normalised to ``YYYY-MM-DD`` (the time of
  day kept only to order a user's reviews), empty texts, unparseable dates and exact duplicates (same user, film,
  text and date) skipped and counted by reason with the first example's location; ``--strict`` makes the first
  one an error;
* :func:`plan_inputs` / :func:`read_inputs` - which file plays which part of its layout, read in the right order;
* :func:`select_users` - ``--min_reviews`` (default :func:`loader_minimum_reviews`), ``--users``, ``--max_users``;
* :func:`plan_output` / :func:`write_output` - one file or one file per user, written atomically, never over an
  existing output without ``--overwrite``;
* :func:`format_summary` - the one-screen report.

Every user error is a one-line :class:`review_lm.utils.UsageError`, raised before anything is written. No torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import date, datetime

from review_lm.data import douban_formats as fmt
from review_lm.data.douban_output import OutputPlan, UserReviews
from review_lm.data.splitting import DEFAULT_RATIOS, split_sizes
from review_lm.utils import UsageError


def loader_minimum_reviews(train_ratio: float = DEFAULT_RATIOS[0], val_ratio: float = DEFAULT_RATIOS[1]) -> int:
    """The fewest reviews for which the loader's chronological split (``split_sizes``) gives a user at least
    one train, one validation and one test review: 7 at the default 0.7 / 0.15 / 0.15 (4 / 1 / 2)."""
    for n in range(1, 10_000):
        if min(split_sizes(n, train_ratio, val_ratio)) > 0:
            return n
    raise ValueError(f"no review count splits into three non-empty parts at {train_ratio} / {val_ratio}")


# ----------------------------------------------------------------------------------------------------------------
# The sink
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    count: int = 0
    first: str = ""  # where the first one was, and what it held


class Collector:
    """Receives the readers' rows: cleans, checks and keeps them per user; counts what it leaves out."""

    def __init__(self, keep_empty: bool = False, strict: bool = False, since: str | None = None,
                 until: str | None = None):
        self.keep_empty, self.strict, self.since, self.until = keep_empty, strict, since, until
        self.users: dict[str, UserReviews] = {}
        self.skipped: dict[str, Tally] = {}
        self.notes: dict[str, Tally] = {}
        self.rows = self.out_of_range = 0
        self.files: list[str] = []
        self._file = ""
        self._films: dict[str, str] = {}  # raw title -> folded title (each film's string stored once)
        self._days: dict[str, str | None] = {}
        self._clocks: dict[str, str | None] = {}

    def begin_file(self, path: str) -> None:
        self._file = fmt.label(path)
        self.files.append(path)

    def where(self, where: int | str) -> str:
        return f"{self._file} line {where}" if isinstance(where, int) else f"{self._file} {where}"

    def skip(self, reason: str, where: int | str, detail: str = "") -> None:
        if self.strict:
            raise UsageError(f"{self.where(where)}: {reason}" + (f" ({detail})" if detail else "")
                             + "; --strict stops at the first row it cannot use")
        self._count(self.skipped, reason, where, detail)

    def broken(self, where: int | str, detail: str) -> None:
        """A row the reader could not split into fields: read, and skipped."""
        self.rows += 1
        self.skip("broken CSV row", where, detail)

    def note(self, reason: str, where: int | str, detail: str = "") -> None:
        self._count(self.notes, reason, where, detail)

    def _count(self, table: dict[str, Tally], reason: str, where: int | str, detail: str) -> None:
        tally = table.get(reason)
        if tally is None:
            tally = table[reason] = Tally(0, self.where(where) + (f" ({detail})" if detail else ""))
        tally.count += 1

    def add(self, where: int | str, user_key: str, user_name: str | None, film: str, text, when,
            quiet: bool = False) -> None:
        """One review. ``quiet``: a row that repeats others by design (DMR) - kept only if new and usable."""
        if not quiet:
            self.rows += 1
        problem, detail = None, ""
        text = "" if text is None else str(text).strip()
        folded = self._films.get(film)
        if folded is None:  # one line: titles come with newlines and runs of spaces
            folded = self._films[film] = " ".join(film.split())
        stamp = self.normalise_time(when)
        if not user_key:
            problem = "no user"
        elif not folded:
            problem = "no film title"
        elif not text and not self.keep_empty:
            problem = "empty text"
        elif stamp is None:
            problem, detail = "bad date", repr(when)
        if problem:
            if not quiet:
                self.skip(problem, where, detail)
            return
        day, clock = stamp
        if (self.since and day < self.since) or (self.until and day > self.until):
            self.out_of_range += not quiet
            return
        user = self.users.get(user_key)
        if user is None:
            user = self.users[user_key] = UserReviews(user_key, user_name)
        key = (day, folded, text)
        if key in user.reviews:
            if not quiet:
                self.skip("duplicate", where)
            return
        user.reviews[key] = clock
        user.non_empty += bool(text)

    def normalise_time(self, value) -> tuple[str, str] | None:
        """(``YYYY-MM-DD``, ``HH:MM:SS`` or "") of a cell / field value; None if it is no date."""
        if isinstance(value, datetime):  # openpyxl gives date cells as datetime
            return value.strftime("%Y-%m-%d"), value.strftime("%H:%M:%S")
        if isinstance(value, date):
            return value.isoformat(), ""
        if not isinstance(value, str):
            return None
        head, _, clock = value.strip().replace("T", " ", 1).partition(" ")
        day = self._days.get(head, "")
        if day == "":  # cached per distinct date: 2M rows hold a few thousand
            day = self._days[head] = fmt.parse_day(head)
        if day is None:
            return None
        clock = clock.strip()
        if not clock:
            return day, ""
        parsed = self._clocks.get(clock, "")
        if parsed == "":
            if len(self._clocks) > 200_000:  # times with seconds are many; keep the cache bounded
                self._clocks.clear()
            parsed = self._clocks[clock] = fmt.parse_clock(clock)
        return None if parsed is None else (day, parsed)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class InputPlan:
    format: str
    roles: dict[str, list[str]] = field(default_factory=dict)  # role -> files


def plan_inputs(paths: list[str], wanted: str = "auto") -> InputPlan:
    """Detect every input's layout and role; they must form one layout's set of files."""
    seen: set[str] = set()
    plan: InputPlan | None = None
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{path}: given twice")
        seen.add(real)
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
        layout, role = fmt.detect(path)
        if wanted != "auto" and layout != wanted:
            raise UsageError(f"{path}: not a {wanted} file (it looks like the {layout} layout); "
                             f"{_LAYOUT_FILES[wanted]}")
        if plan is None:
            plan = InputPlan(layout)
        elif layout != plan.format:
            raise UsageError(f"{path}: the {layout} layout, but {paths[0]} is {plan.format}; import one layout "
                             "at a time")
        plan.roles.setdefault(role, []).append(path)
    assert plan is not None, "argparse requires an input"
    _check_roles(plan)
    return plan


_LAYOUT_FILES = {
    "tofu": "expected the 豆伴 (tofu) XLSX export (sheets 看过/在看/想看)",
    "dmsc": "expected DMSC.csv (columns " + ", ".join(fmt.CSV_ROLES["dmsc"][1]) + ")",
    "moviedata": "expected Moviedata-10M's comments.csv and movies.csv (users.csv optional), given together",
    "dmr": "expected DMR's reviews.json and movies.json, given together",
}


def _check_roles(plan: InputPlan) -> None:
    roles = plan.roles
    if plan.format == "moviedata":
        need, single = ("comments", "movies"), ("movies", "users")
    elif plan.format == "dmr":
        need, single = ("reviews", "movies_json"), ("movies_json",)
    else:
        return
    missing = [r for r in need if r not in roles]
    if missing:
        shown = {"movies_json": "movies.json", "reviews": "reviews.json"}
        raise UsageError(f"the {plan.format} layout needs its {', '.join(shown.get(r, r + '.csv') for r in missing)}"
                         f" too; {_LAYOUT_FILES[plan.format]}")
    for role in single:
        if len(roles.get(role, [])) > 1:
            raise UsageError(f"{roles[role][1]}: a second {role.replace('_json', '')} file; give one")


def read_inputs(plan: InputPlan, sink: Collector, user_name: str | None, long_reviews: bool = False) -> None:
    """Stream every input into ``sink`` (the title tables of moviedata / dmr first)."""
    roles = plan.roles
    if plan.format == "tofu":
        for path in roles["tofu"]:
            fmt.read_tofu(path, user_name, sink, long_reviews)
    elif plan.format == "dmsc":
        for path in roles["dmsc"]:
            fmt.read_dmsc(path, sink)
    elif plan.format == "moviedata":
        titles = fmt.read_movie_titles(roles["movies"][0], sink)
        for path in roles["comments"]:
            fmt.read_comments(path, titles, sink)
    else:
        titles = fmt.read_dmr_titles(roles["movies_json"][0])
        for path in roles["reviews"]:
            fmt.read_dmr(path, titles, sink)


def resolve_names(plan: InputPlan, sink: Collector, users: list[UserReviews]) -> None:
    """Moviedata's names come from users.csv, read only for the users kept; the id where there is none."""
    if "users" in plan.roles:
        names = fmt.read_user_names(plan.roles["users"][0], {u.key for u in users}, sink)
        for user in users:
            user.name = names.get(user.key)
    for user in users:
        user.name = user.name or user.key


# ----------------------------------------------------------------------------------------------------------------
# Users
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    users: list[UserReviews]
    read: int  # users with any review read
    too_few: int = 0  # below --min_reviews
    not_listed: int = 0  # not named by --users
    beyond_max: int = 0  # cut by --max_users
    unmatched: list[str] = field(default_factory=list)  # --users values that matched nobody


def enough_reviews(sink: Collector, min_reviews: int) -> tuple[list[UserReviews], int]:
    """Users with at least ``min_reviews`` non-empty reviews (what the loader counts), in first-seen order."""
    kept = [u for u in sink.users.values() if u.non_empty >= min_reviews]
    return kept, len(sink.users) - len(kept)


def select_users(kept: list[UserReviews], read: int, too_few: int, wanted: list[str] | None,
                 max_users: int | None) -> Selection:
    """``--users`` (ids or names), then ``--max_users`` (most reviews first, ties in first-seen order)."""
    selection = Selection(kept, read, too_few)
    if wanted:
        names = set(wanted)
        matched = {v for u in kept for v in (u.key, u.name) if v in names}
        selection.users = [u for u in kept if u.key in names or u.name in names]
        selection.not_listed = len(kept) - len(selection.users)
        selection.unmatched = [w for w in wanted if w not in matched]
    if max_users is not None and len(selection.users) > max_users:
        top = sorted(range(len(selection.users)), key=lambda i: -selection.users[i].non_empty)[:max_users]
        selection.beyond_max = len(selection.users) - max_users
        selection.users = [selection.users[i] for i in sorted(top)]
    return selection


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------
def format_summary(plan: InputPlan, sink: Collector, selection: Selection, output: OutputPlan, min_reviews: int,
                   min_is_default: bool) -> str:
    users = selection.users
    days = [k[0] for u in users for k in u.reviews]
    reviews = len(days)
    empty = sum(len(u.reviews) - u.non_empty for u in users)
    files = ", ".join(fmt.label(f) for f in sink.files)
    lines = [f"{plan.format}: {sink.rows:,} rows read from {files}",
             f"users written:   {len(users):,} of {selection.read:,} read"]
    why = (f"the loader's 0.7/0.15/0.15 split needs {min_reviews} per user" if min_is_default
           else "--min_reviews")
    if selection.too_few or min_is_default:
        lines.append(f"  fewer than {min_reviews} reviews: {_users(selection.too_few)} ({why})")
    if selection.not_listed or selection.unmatched:
        lines.append(f"  not in --users: {selection.not_listed:,}"
                     + (f"; matched nobody: {', '.join(selection.unmatched)}" if selection.unmatched else ""))
    if selection.beyond_max:
        lines.append(f"  beyond --max_users: {selection.beyond_max:,} (the users with the fewest reviews)")
    range_text = f", {min(days)} to {max(days)}" if days else ""
    lines.append(f"reviews written: {reviews:,}" + (f" ({empty:,} empty, kept by --keep_empty)" if empty else "")
                 + range_text)
    total = sum(t.count for t in sink.skipped.values())
    lines.append(f"rows skipped:    {total:,}" + ("" if total else " (none)"))
    lines += [f"  {reason + ':':<16}{t.count:>9,}  first: {t.first}" for reason, t in sink.skipped.items()]
    if sink.out_of_range:
        lines.append(f"  outside --since/--until: {sink.out_of_range:,}")
    lines += [f"note: {reason}: {t.count:,} (first: {t.first})" for reason, t in sink.notes.items()]
    where = (f"{output.path.rstrip(os.sep)}{os.sep} ({len(users):,} files, one per user)" if output.per_user
             else output.path)
    lines.append(f"written: {where}")
    lines.append(f"next:    python data_loader_movie_review.py {output.path}")
    return "\n".join(lines)


def _users(n: int) -> str:
    return f"{n:,} user" + ("" if n == 1 else "s")


def fail_if_nothing(selection: Selection, sink: Collector, min_reviews: int) -> None:
    if selection.users:
        return
    if not sink.users:
        raise UsageError(f"no usable review in {', '.join(fmt.label(f) for f in sink.files)} "
                         f"({sum(t.count for t in sink.skipped.values()):,} rows skipped); nothing written")
    if selection.unmatched and selection.read > selection.too_few:
        raise UsageError(f"--users: no user named {', '.join(selection.unmatched)} among the "
                         f"{selection.read - selection.too_few:,} users with {min_reviews} or more reviews; "
                         "nothing written")
    most = max(u.non_empty for u in sink.users.values())
    raise UsageError(f"no user left to write: {selection.read:,} users read, the most reviews any has is {most} "
                     f"(--min_reviews {min_reviews}); nothing written")


def print_error(message: str) -> None:
    print(f"error: {message}".replace("\n", "\\n"), file=sys.stderr)
