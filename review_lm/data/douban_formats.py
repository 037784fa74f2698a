"""The four Douban layouts that ``import_douban.py`` reads: what each file looks like and how its rows are read.

* **tofu** - the 豆伴 browser extension's XLSX export of one person (sheets 看过 / 在看 / 想看, optionally 影评);
* **dmsc** - Douban Movie Short Comments, ``DMSC.csv``;
* **moviedata** - the Moviedata-10M dump: ``comments.csv`` + ``movies.csv`` (+ ``users.csv``);
* **dmr** - DMR-Dataset-1's ``reviews.json`` + ``movies.json``.

:func:`parse_day` / :func:`parse_clock` read the date forms the layouts use (``2017-05-01 12:00:00``,
``2017/5/1``, ``2017年5月1日``). :func:`detect` names a file's layout and role from its header, sheet names or
keys; the ``read_*`` functions stream rows into a *sink* (``review_lm.douban_import.Collector``):
``sink.add(where, user_key, user_name, film, text, when)`` per review, ``sink.broken(where, detail)`` for a
row that cannot be read, ``sink.note(...)`` for a row kept with a fallback. ``where`` is a line number (CSV) or
a short location string (sheet row, JSON key). CSV files are read with the csv module, one row at a time (no
pandas): a 2M-row file never sits in memory. No torch, no transformers.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from collections.abc import Iterator
from datetime import date

from tqdm.auto import tqdm

from review_lm.data.reviews import ReviewDataError, read_json_file
from review_lm.utils import UsageError

FORMATS = ("tofu", "dmsc", "moviedata", "dmr")

# Every CSV role: its documented header, and the columns the import needs (the rest are ignored).
CSV_ROLES = {
    "dmsc": ("dmsc", ("ID", "Movie_Name_EN", "Movie_Name_CN", "Crawl_Date", "Number", "Username", "Date", "Star",
                      "Comment", "Like"), ("Username", "Date", "Comment")),
    "comments": ("moviedata", ("COMMENT_ID", "USER_ID", "MOVIE_ID", "CONTENT", "VOTES", "COMMENT_TIME"),
                 ("USER_ID", "MOVIE_ID", "CONTENT", "COMMENT_TIME")),
    "movies": ("moviedata", ("MOVIE_ID", "NAME", "ALIAS", "ACTORS", "COVER", "DIRECTORS", "DOUBAN_SCORE",
                             "DOUBAN_VOTES", "GENRES", "IMDB_ID", "LANGUAGES", "MINS", "OFFICIAL_SITE", "REGIONS",
                             "RELEASE_DATE", "SLUG", "STORYLINE", "TAGS", "YEAR", "ACTOR_IDS", "DIRECTOR_IDS"),
               ("MOVIE_ID", "NAME")),
    "users": ("moviedata", ("USER_ID", "USER_NICKNAME", "USER_AVATAR", "USER_URL"), ("USER_ID", "USER_NICKNAME")),
}
# Some copies of Moviedata-10M name the user column USER_MD5 (the id is an MD5 of the account).
COLUMN_ALIASES = {"user_md5": "user_id"}
TOFU_SHEETS = ("看过", "在看")  # 想看 (want to see) holds no reviews
TOFU_COLUMNS = ("标题", "简介", "豆瓣评分", "链接", "创建时间", "我的评分", "标签", "评论", "可见性")
TOFU_LONG_SHEET, TOFU_LONG_COLUMNS = "影评", ("标题", "评论对象", "链接", "创建时间", "我的评分", "类型", "内容")
EXPECTED = ("expected a tofu XLSX (sheets 看过/在看/想看), a DMSC csv (" + ", ".join(CSV_ROLES["dmsc"][1])
            + "), Moviedata-10M's comments.csv / movies.csv / users.csv, or DMR's reviews.json / movies.json")
PROGRESS_BYTES = 32 * 2**20  # a progress bar for inputs at least this big (about 200k CSV rows)
_SNIFF_BYTES = 1 << 16
_DATE_RE = re.compile(r"(\d{4})\s*[-/.年]\s*(\d{1,2})\s*[-/.月]\s*(\d{1,2})\s*日?")
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?")


# ----------------------------------------------------------------------------------------------------------------
# Timestamps: the forms the layouts write dates and times in
# ----------------------------------------------------------------------------------------------------------------
def parse_day(text: str) -> str | None:
    """``2017-05-01`` / ``2017/5/1`` / ``2017.5.1`` / ``2017年5月1日`` -> ``2017-05-01``; None if not a date."""
    m = _DATE_RE.fullmatch(text)
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3])).isoformat()
    except ValueError:  # month 13, February 30
        return None


def parse_clock(text: str) -> str | None:
    """``12:00`` / ``9:05:03`` / ``12:00:00.5+08:00`` -> ``HH:MM:SS`` (ordering only); None if not a time."""
    m = _TIME_RE.fullmatch(text)
    if not m or int(m[1]) > 23 or int(m[2]) > 59 or int(m[3] or 0) > 59:
        return None
    return f"{int(m[1]):02d}:{m[2]}:{int(m[3] or 0):02d}"


def label(path: str) -> str:
    """How messages name an input: its file name (inputs usually sit in one folder)."""
    return os.path.basename(path) or path


# ----------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------
def detect(path: str) -> tuple[str, str]:
    """(format, role) of ``path``: role is ``tofu``, ``dmsc``, ``comments``/``movies``/``users`` (moviedata) or
    ``reviews``/``movies_json`` (dmr). Anything else is a one-line :class:`UsageError`."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory; give the files themselves") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror or err}") from None
    if head.startswith(b"PK\x03\x04"):  # XLSX is a ZIP archive
        return "tofu", "tofu"
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith(("{", "[")):
        return "dmr", _json_role(path, text)
    return _csv_role(path, _header_of(path, head))


def _json_role(path: str, text: str) -> str:
    if '"task_behavior_collections"' in text:
        raise UsageError(f"{path}: already the project's review JSON; give it to data_loader_movie_review.py "
                         "or --data_file directly")
    if '"user_reviews"' in text or '"user_profile"' in text:
        return "reviews"
    if '"movie_name"' in text:
        return "movies_json"
    raise UsageError(f"{path}: JSON that is not DMR's reviews.json or movies.json; {EXPECTED}")


def _header_of(path: str, head: bytes) -> list[str]:
    try:
        first = head.decode("utf-8-sig").splitlines()[0] if head else ""
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a multi-byte character cut at the end of the sniffed block
            raise UsageError(f"{path}: not UTF-8 text; save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
        first = head[:err.start].decode("utf-8-sig").splitlines()[0]
    return next(csv.reader([first]), [])


def _csv_role(path: str, header: list[str]) -> tuple[str, str]:
    names = {_key(h) for h in header}
    overlap = {role: len(names & {_key(c) for c in spec[1]}) for role, spec in CSV_ROLES.items()}
    role = max(overlap, key=overlap.get)
    if overlap[role] < 2:
        shown = ", ".join(h.strip() for h in header[:12]) or "nothing"
        raise UsageError(f"{path}: not a known Douban layout (its first line reads: {shown}); {EXPECTED}")
    return CSV_ROLES[role][0], role


def _key(column: str) -> str:
    key = column.strip().lower()
    return COLUMN_ALIASES.get(key, key)


# ----------------------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------------------
class CsvTable:
    """One CSV file, read a row at a time: ``columns`` maps the needed column names to indices; iterating
    gives ``(line, row)`` for well-formed rows (``line``: where the row starts) and reports broken ones."""

    def __init__(self, path: str, role: str, sink):
        self.path, self.role, self.sink = path, role, sink
        _, documented, needed = CSV_ROLES[role]
        self.raw = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        self.text = io.TextIOWrapper(self.raw, encoding="utf-8-sig", newline="")
        self.reader = csv.reader(self.text)
        self.header = self._next_header()
        index = {_key(h): i for i, h in enumerate(self.header)}
        missing = [c for c in needed if _key(c) not in index]
        if missing:
            self.close()
            raise UsageError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                             f"(the {role} file of the {CSV_ROLES[role][0]} layout has: {', '.join(documented)})")
        self.columns = {c: index[_key(c)] for c in documented if _key(c) in index}

    def _next_header(self) -> list[str]:
        try:
            return next(self.reader)
        except UnicodeDecodeError:  # the first block decoded holds rows too
            raise UsageError(f"{self.path}: not UTF-8 text; save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
        except (StopIteration, csv.Error):
            raise UsageError(f"{self.path}: no header line") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.text.close()

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        width, reader, line = len(self.header), self.reader, self.reader.line_num
        size = os.fstat(self.raw.fileno()).st_size
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=label(self.path), file=sys.stderr,
                   disable=None if size >= PROGRESS_BYTES else True)
        done = 0
        with bar:
            while True:
                start = line + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:  # a NUL byte, an unterminated quote: the reader goes on after it
                    line = reader.line_num
                    self.sink.broken(start, str(err))
                    continue
                except UnicodeDecodeError:
                    raise UsageError(f"{self.path}: not UTF-8 text after line {line}; save it as UTF-8 "
                                     "(e.g. iconv -f GBK -t UTF-8)") from None
                line = reader.line_num
                if len(row) != width:
                    if row:  # blank lines (often at the end of a file) are no rows at all
                        self.sink.broken(start, f"{len(row)} fields, the header has {width}")
                    continue
                yield start, row
                if not start & 0x3FFF and not bar.disable:
                    bar.update(self.raw.tell() - done)
                    done = self.raw.tell()
            bar.update(size - done)


def read_dmsc(path: str, sink) -> None:
    """DMSC.csv: the user is Username, the film Movie_Name_CN (else Movie_Name_EN), the text Comment."""
    sink.begin_file(path)
    with CsvTable(path, "dmsc", sink) as table:
        c = table.columns
        user, date, text = c["Username"], c["Date"], c["Comment"]
        cn, en = c.get("Movie_Name_CN"), c.get("Movie_Name_EN")
        if cn is None and en is None:
            raise UsageError(f"{path}: missing columns Movie_Name_CN and Movie_Name_EN (one names the film)")
        for line, row in table:
            film = (row[cn].strip() if cn is not None else "") or (row[en].strip() if en is not None else "")
            name = row[user].strip()
            sink.add(line, name, name, film, row[text], row[date])


def read_movie_titles(path: str, sink) -> dict[str, str]:
    """movies.csv: MOVIE_ID -> NAME."""
    sink.begin_file(path)
    with CsvTable(path, "movies", sink) as table:
        mid, name = table.columns["MOVIE_ID"], table.columns["NAME"]
        return {row[mid].strip(): row[name] for _, row in table if row[name].strip()}


def read_comments(path: str, titles: dict[str, str], sink) -> None:
    """comments.csv: a comment whose movie id is not in movies.csv keeps the id as its title (noted)."""
    sink.begin_file(path)
    with CsvTable(path, "comments", sink) as table:
        c = table.columns
        user, movie, text, when = c["USER_ID"], c["MOVIE_ID"], c["CONTENT"], c["COMMENT_TIME"]
        for line, row in table:
            mid = row[movie].strip()
            title = titles.get(mid)
            if title is None and mid:
                sink.note("title unknown, movie id kept", line, f"movie {mid}")
                title = mid
            uid = row[user].strip()
            sink.add(line, uid, None, title or "", row[text], row[when])


def read_user_names(path: str, wanted: set[str], sink) -> dict[str, str]:
    """users.csv: USER_ID -> USER_NICKNAME, for the ``wanted`` ids only (the file lists every user)."""
    sink.begin_file(path)
    with CsvTable(path, "users", sink) as table:
        uid, nick = table.columns["USER_ID"], table.columns["USER_NICKNAME"]
        return {row[uid].strip(): row[nick].strip() for _, row in table
                if row[uid].strip() in wanted and row[nick].strip()}


# ----------------------------------------------------------------------------------------------------------------
# XLSX (tofu)
# ----------------------------------------------------------------------------------------------------------------
def read_tofu(path: str, user_name: str, sink, long_reviews: bool = False) -> None:
    """The 豆伴 export: non-empty 评论 of 看过 and 在看 (and 内容 of 影评 with ``long_reviews``)."""
    import openpyxl  # only this layout needs it

    sink.begin_file(path)
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # noqa: BLE001 - a bad ZIP, a missing part, XML errors: all "cannot read it"
        raise UsageError(f"{path}: not a readable XLSX file ({type(err).__name__}: {err})") from None
    try:
        sheets = [s for s in TOFU_SHEETS if s in book.sheetnames]
        if not sheets:
            raise UsageError(f"{path}: no sheet 看过 or 在看 (found: {', '.join(book.sheetnames)}); "
                             "expected the 豆伴 (tofu) export of one person's Douban")
        parts = [(s, ("标题", "评论")) for s in sheets]
        if long_reviews and TOFU_LONG_SHEET in book.sheetnames:
            parts.append((TOFU_LONG_SHEET, ("评论对象", "内容")))
        for sheet, (film_col, text_col) in parts:
            _read_sheet(path, book[sheet], sheet, film_col, text_col, user_name, sink)
    finally:
        book.close()


def _read_sheet(path: str, ws, sheet: str, film_col: str, text_col: str, user_name: str, sink) -> None:
    rows = ws.iter_rows(values_only=True)
    header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
    documented = TOFU_LONG_COLUMNS if sheet == TOFU_LONG_SHEET else TOFU_COLUMNS
    missing = [c for c in (film_col, "创建时间", text_col) if c not in header]
    if missing:
        raise UsageError(f"{path}: sheet {sheet} lacks column {', '.join(missing)} "
                         f"(the tofu export's columns: {', '.join(documented)})")
    film, when, text = header.index(film_col), header.index("创建时间"), header.index(text_col)
    for number, row in enumerate(rows, start=2):
        if not row or all(v is None for v in row):
            continue
        sink.add(f"sheet {sheet} row {number}", user_name, user_name, _cell(row, film), _cell(row, text),
                 row[when] if when < len(row) else None)


def _cell(row: tuple, index: int) -> str:
    value = row[index] if index < len(row) else None
    return "" if value is None else str(value)


# ----------------------------------------------------------------------------------------------------------------
# JSON (DMR)
# ----------------------------------------------------------------------------------------------------------------
def load_json(path: str):
    """A DMR JSON file, through the loader's one reader of users' JSON (BOM, nesting bound, Unicode checked)."""
    try:
        return read_json_file(path)
    except ReviewDataError as err:
        raise UsageError(str(err)) from None


def read_dmr_titles(path: str) -> dict[str, str]:
    movies = load_json(path)
    if not isinstance(movies, dict):
        raise UsageError(f"{path}: expected DMR's movies.json, an object of movie id -> {{movie_name, ...}}")
    return {str(k): v["movie_name"] for k, v in movies.items() if isinstance(v, dict) and v.get("movie_name")}


def read_dmr(path: str, titles: dict[str, str], sink) -> None:
    """reviews.json: each record carries its user's whole history (``user_reviews``, newest first). Per user the
    longest history is read (in time order); the other records of that user and the records' own reviews add
    only what that history lacks, silently (they repeat it by design)."""
    sink.begin_file(path)
    records = load_json(path)
    items = list(records.items() if isinstance(records, dict) else enumerate(records)
                 if isinstance(records, list) else [])
    if not items or not all(isinstance(r, dict) and isinstance(r.get("user_reviews"), dict) for _, r in items):
        raise UsageError(f"{path}: expected DMR's reviews.json, records with user_profile and user_reviews")
    longest: dict[str, tuple] = {}
    for key, rec in items:
        uid = str(rec.get("user_id") or _screen_name(rec))
        if uid not in longest or len(rec["user_reviews"]) > len(longest[uid][1]["user_reviews"]):
            longest[uid] = (key, rec)

    def add(where, uid, rec, review, quiet=False):
        mid = str(review.get("movie_id", "")).strip()
        title = titles.get(mid)
        if title is None and mid and not quiet:
            sink.note("title unknown, movie id kept", where, f"movie {mid}")
        sink.add(where, uid, _screen_name(rec) or uid, title or mid, review.get("text"), review.get("date"),
                 quiet=quiet)

    for uid, (key, rec) in tqdm(longest.items(), desc=label(path), unit="user", file=sys.stderr,
                                disable=None if len(longest) > 10000 else True):
        for hkey, review in reversed(list(rec["user_reviews"].items())):
            add(f"{key}/{hkey}", uid, rec, review)
    for key, rec in items:
        uid = str(rec.get("user_id") or _screen_name(rec))
        if longest[uid][0] != key:
            for hkey, review in rec["user_reviews"].items():
                add(f"{key}/{hkey}", uid, rec, review, quiet=True)
        add(key, uid, rec, rec, quiet=True)


def _screen_name(rec: dict) -> str:
    profile = rec.get("user_profile")
    return str(profile.get("screen_name") or "").strip() if isinstance(profile, dict) else ""
