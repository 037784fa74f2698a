"""import_douban.py (issue 25): the four Douban layouts in, the spec's review JSON out, the loader accepts it.

Fixtures are written here in each layout with its exact header, holding what real dumps hold: a comment that
starts with a space, an exact duplicate, an empty comment, an unparseable date, a movie id with no title, a
broken CSV row, CRLF line ends and a UTF-8 BOM. The real DMR sample (../shared/data/douban_dmr/raw) must import
to the same non-empty reviews as the converted files beside it. Most tests run ``main()`` in-process; the ones
that start a process are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

import data_loader_movie_review as dl
import import_douban
from review_lm.data import douban_formats as fmt
from review_lm.data import douban_import as di
from review_lm.data import douban_output as do
from review_lm.data.prompts import TASK_DESCRIPTION
from tests.douban_layouts import (
    COMMENTS_HEADER,
    DMSC_EXPECTED,
    DMSC_HEADER,
    LONG_HEADER,
    MOVIES_HEADER,
    TOFU_HEADER,
    USERS_HEADER,
    assert_nothing_written,
    assert_usage_error,
    loaded,
    run_import,
    skipped,
    write_csv,
)
from tests.helpers import REPO


def test_dmsc_fixture_imports_to_the_expected_user_and_skips_counted_by_reason(dmsc_file, tmp_path, capsys):
    out_file = tmp_path / "out" / "reviews.json"  # its folder is made
    rc, out, err = run_import(capsys, dmsc_file, "--output", out_file)
    assert rc == 0, err
    assert loaded(out_file) == {"影迷甲": DMSC_EXPECTED}  # 路人乙 has 2 reviews (< 7)
    # Lines: header 1, rows 2.. (row 5 spans lines 7-8), the broken row is on line 15.
    assert skipped(out) == {"duplicate": (1, "DMSC.csv line 4"), "empty text": (1, "DMSC.csv line 5"),
                            "bad date": (1, "DMSC.csv line 6 ('2016-13-04')"),
                            "broken CSV row": (1, "DMSC.csv line 15 (3 fields, the header has 10)")}
    assert "rows skipped:    4\n" in out
    assert "users written:   1 of 2 read\n" in out
    assert "fewer than 7 reviews: 1 user (the loader's 0.7/0.15/0.15 split needs 7 per user)" in out
    assert "reviews written: 7, 2015-02-19 to 2016-02-08\n" in out
    raw = json.loads(out_file.read_text(encoding="utf-8"))
    record = raw[0]["task"]["task_behavior_collections"][0]["data"][0]
    assert record == {"context": [], "continuation": "成龙", "continuation_prefix": "天将雄师: ",
                      "timestamp": "2015-02-19"}
    assert raw[0]["task"]["description"] == TASK_DESCRIPTION
    assert raw[0]["task"]["task_behavior_collections"][0]["type"] == dl.REVIEW_TYPE


def test_the_default_min_reviews_is_what_the_loader_split_needs():
    n = di.loader_minimum_reviews()
    assert n == 7
    assert min(dl.split_sizes(n, *dl.DEFAULT_RATIOS[:2])) == 1
    assert min(dl.split_sizes(n - 1, *dl.DEFAULT_RATIOS[:2])) == 0


def test_strict_stops_at_the_first_unusable_row(dmsc_file, tmp_path, capsys):
    before = {p.name for p in tmp_path.iterdir()}
    rc, out, err = run_import(capsys, dmsc_file, "--output", tmp_path / "o.json", "--strict")
    assert_usage_error(rc, out, err, "DMSC.csv line 4: duplicate", "--strict")
    assert_nothing_written(tmp_path, before)


def test_keep_empty_min_reviews_since_until(dmsc_file, tmp_path, capsys):
    out_file = tmp_path / "o.json"
    rc, out, err = run_import(capsys, dmsc_file, "--output", out_file, "--keep_empty", "--min_reviews", "2",
                              "--since", "2015-05-02", "--until", "2016-07-09")
    assert rc == 0, err
    raw = json.loads(out_file.read_text(encoding="utf-8"))
    texts = {u["user"]["profile"]["name"]: [(d["continuation_prefix"], d["continuation"], d["timestamp"])
                                            for d in u["task"]["task_behavior_collections"][0]["data"]]
             for u in raw}
    assert texts["影迷甲"][-1] == ("大鱼海棠: ", "", "2016-07-09")  # kept empty, inside the range
    assert ("天将雄师: ", "成龙", "2015-02-19") not in texts["影迷甲"]  # before --since
    assert texts["路人乙"] == [("钢铁侠: ", "还行", "2015-05-02"), ("复仇者联盟: ", "不错", "2015-05-14")]
    assert "outside --since/--until: 2" in out  # 天将雄师 and 钢铁侠 of 影迷甲


def test_users_and_max_users_pick_by_name_then_by_review_count(dmsc_file, tmp_path, capsys):
    rc, out, _ = run_import(capsys, dmsc_file, "--output", tmp_path / "a.json", "--min_reviews", "1",
                            "--max_users", "1")
    assert rc == 0 and list(loaded(tmp_path / "a.json")) == ["影迷甲"]
    assert "beyond --max_users: 1" in out
    rc, out, _ = run_import(capsys, dmsc_file, "--output", tmp_path / "b.json", "--min_reviews", "1",
                            "--users", "路人乙", "nobody")
    assert rc == 0 and list(loaded(tmp_path / "b.json")) == ["路人乙"]
    assert "not in --users: 1; matched nobody: nobody" in out


def test_max_users_ties_keep_first_seen_order():
    users = [do.UserReviews(k, k) for k in "abcd"]
    for user, n in zip(users, (2, 3, 2, 2), strict=True):
        user.non_empty = n
    picked = di.select_users(users, 4, 0, None, 2).users
    assert [u.key for u in picked] == ["a", "b"]


# ----------------------------------------------------------------------------------------------------------------
# Round trip: the spec's example file, written in the DMSC layout, comes back unchanged
# ----------------------------------------------------------------------------------------------------------------
def test_example_data_round_trips_through_the_dmsc_layout(example_data_file, tmp_path, capsys):
    users = json.loads(example_data_file.read_text(encoding="utf-8"))
    rows = []
    for user in users:
        for r in user["task"]["task_behavior_collections"][0]["data"]:
            movie = dl.movie_name(r["continuation_prefix"])
            rows.append([str(len(rows)), "", movie, "2017-01-22", "0", user["user"]["profile"]["name"],
                         r["timestamp"], "3", " " + r["continuation"], "0"])
    source = write_csv(tmp_path / "example_dmsc.csv", DMSC_HEADER, rows)
    rc, out, err = run_import(capsys, source, "--output", tmp_path / "back.json")
    assert rc == 0, err
    assert loaded(tmp_path / "back.json") == loaded(example_data_file)
    assert "rows skipped:    0 (none)" in out


# ----------------------------------------------------------------------------------------------------------------
# Moviedata-10M
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def moviedata_files(tmp_path) -> list[Path]:
    def movie(mid, name):
        return [mid, name] + ["x"] * 15 + ["", "2015", "", ""]

    movies = [movie(str(1000 + i), name) for i, name in enumerate(["让子弹飞", "观音山", "盗梦空间", "钢铁侠",
                                                                    "美人鱼", "寻龙诀", "港囧"])]
    movies[2][16] = "一个关于梦的故事，\n跨了两行"  # STORYLINE with a newline inside quotes
    comments = [
        ["1", "u1", "1000", " 站着把钱挣了", "5", "2010-12-26 21:00:00"],
        ["2", "u1", "1001", "铁轨那几场很美", "1", "2011-04-10 09:00:00"],
        ["3", "u1", "1002", "陀螺到底倒没倒", "9", "2010-09-05 23:59:59"],
        ["4", "u1", "1003", "boring", "0", "2010-09-05 08:00:00"],  # same day, earlier time: comes first
        ["5", "u1", "1004", "功夫之后再无周星驰", "2", "2016-02-08 12:00:00"],
        ["6", "u1", "9999", "这部片子没有标题", "0", "2016-03-01 12:00:00"],  # movie id not in movies.csv
        ["7", "u1", "1005", "", "0", "2016-03-02 12:00:00"],  # empty
        ["8", "u1", "1005", "摸金校尉", "0", "2015/12/20 10:00"],
        ["9", "u1", "1005", "摸金校尉", "0", "2015/12/20 10:00"],  # duplicate
        ["10", "u1", "1006", "一般", "0", "yesterday"],  # bad date
        ["11", "u2", "1000", "好", "0", "2011-01-01 00:00:00"],
    ] + [[str(12 + i), "u2", "1006", f"第{i}次", "0", f"2015-09-{10 + i} 10:00:00"] for i in range(7)]
    users = [["u1", "老影迷", "http://img", "http://douban/u1"], ["u2", "", "", ""]]
    return [write_csv(tmp_path / "comments.csv", COMMENTS_HEADER, comments),
            write_csv(tmp_path / "movies.csv", MOVIES_HEADER, movies, bom=False),
            write_csv(tmp_path / "users.csv", USERS_HEADER, users, crlf=False)]


def test_moviedata_trio_imports_with_titles_names_and_time_order(moviedata_files, tmp_path, capsys):
    comments, movies, users = moviedata_files
    out_dir = tmp_path / "out"
    rc, out, err = run_import(capsys, users, comments, movies, "--output", out_dir)  # any order
    assert rc == 0, err
    got = loaded(out_dir)
    assert got["老影迷"] == [
        ("钢铁侠", "boring", "2010-09-05"), ("盗梦空间", "陀螺到底倒没倒", "2010-09-05"),
        ("让子弹飞", "站着把钱挣了", "2010-12-26"), ("观音山", "铁轨那几场很美", "2011-04-10"),
        ("寻龙诀", "摸金校尉", "2015-12-20"), ("美人鱼", "功夫之后再无周星驰", "2016-02-08"),
        ("9999", "这部片子没有标题", "2016-03-01")]
    assert got["u2"][0] == ("让子弹飞", "好", "2011-01-01") and len(got["u2"]) == 8  # no nickname: the id
    assert "note: title unknown, movie id kept: 1 (first: comments.csv line 7 (movie 9999))" in out
    assert skipped(out) == {"empty text": (1, "comments.csv line 8"), "duplicate": (1, "comments.csv line 10"),
                            "bad date": (1, "comments.csv line 11 ('yesterday')")}
    names = sorted(p.name for p in out_dir.iterdir())
    assert len(names) == 2 and all(re.fullmatch(r"user_[\w-]+_[0-9a-f]{10}\.json", n) for n in names)
    assert f"written: {out_dir}{os.sep} (2 files, one per user)" in out
    # Stable names: the same import gives the same files; --overwrite replaces the folder whole (a user file of
    # an earlier import would otherwise be loaded as one more user).
    (out_dir / "user_stale_0123456789.json").write_text("[]", encoding="utf-8")
    rc, _, _ = run_import(capsys, comments, movies, users, "--output", out_dir, "--overwrite")
    assert rc == 0 and sorted(p.name for p in out_dir.iterdir()) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comments.csv", "movies.csv", "out", "users.csv"]


def test_moviedata_without_movies_csv_is_one_line(moviedata_files, tmp_path, capsys):
    before = {p.name for p in tmp_path.iterdir()}
    rc, out, err = run_import(capsys, moviedata_files[0], "--output", tmp_path / "o.json")
    assert_usage_error(rc, out, err, "needs its movies.csv")
    assert_nothing_written(tmp_path, before)


# ----------------------------------------------------------------------------------------------------------------
# tofu (豆伴 XLSX)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tofu_file(tmp_path) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    seen = book.active
    seen.title = "看过"
    seen.append(TOFU_HEADER)

    def film(title, when, comment):
        return [title, "简介", 8.1, "https://movie.douban.com/subject/1/", when, 4, "标签", comment, "公开"]

    seen.append(film("霸王别姬", "2019-05-01 12:00:00", " 风华绝代"))
    seen.append(film("活着", datetime(2019, 5, 3, 8, 30), "福贵"))  # a real date cell
    seen.append(film("阳光灿烂的日子", "2019/5/2", "夏天"))
    seen.append(film("大话西游", "2019-05-04 10:00:00", None))  # a rating without a comment
    seen.append(film("大话西游", "2019-05-04 10:00:00", None))
    seen.append(film("无间道", "not a date", "卧底"))
    seen.append(film("无间道", "2019-05-05 00:00:00", "卧底"))
    seen.append(film("无间道", "2019-05-05 09:00:00", "卧底"))  # same day, film and text: a duplicate
    watching = book.create_sheet("在看")
    watching.append(TOFU_HEADER)
    watching.append(film("请回答1988", "2019-06-01 20:00:00", "德善"))
    wish = book.create_sheet("想看")
    wish.append(TOFU_HEADER)
    wish.append(film("教父", "2019-06-02 20:00:00", "想看"))  # 想看 holds no reviews
    long = book.create_sheet("影评")
    long.append(LONG_HEADER)
    long.append(["长评标题", "霸王别姬", "https://movie.douban.com/review/1/", "2019-07-01 10:00:00", 5, "影评",
                 "一篇很长的影评"])
    path = tmp_path / "豆伴(12345).xlsx"
    book.save(path)
    return path


TOFU_EXPECTED = [("霸王别姬", "风华绝代", "2019-05-01"), ("阳光灿烂的日子", "夏天", "2019-05-02"),
                 ("活着", "福贵", "2019-05-03"), ("无间道", "卧底", "2019-05-05"),
                 ("请回答1988", "德善", "2019-06-01")]


def test_tofu_export_imports_one_user_named_by_the_flag(tofu_file, tmp_path, capsys):
    rc, out, err = run_import(capsys, tofu_file, "--output", tmp_path / "me.json", "--user_name", "我",
                              "--min_reviews", "1")
    assert rc == 0, err
    assert loaded(tmp_path / "me.json") == {"我": TOFU_EXPECTED}
    assert skipped(out) == {"empty text": (2, "豆伴(12345).xlsx sheet 看过 row 5"),
                            "bad date": (1, "豆伴(12345).xlsx sheet 看过 row 7 ('not a date')"),
                            "duplicate": (1, "豆伴(12345).xlsx sheet 看过 row 9")}


def test_tofu_long_reviews_only_with_the_flag(tofu_file, tmp_path, capsys):
    rc, _, err = run_import(capsys, tofu_file, "--output", tmp_path / "me.json", "--user_name", "我",
                            "--min_reviews", "1", "--include_long_reviews")
    assert rc == 0, err
    assert loaded(tmp_path / "me.json")["我"] == [*TOFU_EXPECTED, ("霸王别姬", "一篇很长的影评", "2019-07-01")]


def test_tofu_without_user_name_is_one_line(tofu_file, tmp_path, capsys):
    before = {p.name for p in tmp_path.iterdir()}
    rc, out, err = run_import(capsys, tofu_file, "--output", tmp_path / "me.json")
    assert_usage_error(rc, out, err, "--user_name")
    assert_nothing_written(tmp_path, before)


def test_tofu_sheet_missing_its_comment_column_is_one_line(tmp_path, capsys):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.title = "看过"
    book.active.append([c for c in TOFU_HEADER if c != "评论"])
    book.save(tmp_path / "t.xlsx")
    rc, out, err = run_import(capsys, tmp_path / "t.xlsx", "--output", tmp_path / "o.json", "--user_name", "x")
    assert_usage_error(rc, out, err, "sheet 看过 lacks column 评论")
    assert not (tmp_path / "o.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# DMR
# ----------------------------------------------------------------------------------------------------------------
def test_dmr_records_of_one_user_are_read_once(tmp_path, capsys):
    history = {f"review{i}": {"movie_id": 100 + i, "text": f"第{i}条", "date": f"2020-01-{20 - i:02d}",
                              "stars": 3, "useful": 0, "tags": ""} for i in range(8)}
    history["review8"] = {"movie_id": 555, "text": "", "date": "2020-01-01", "stars": 5, "useful": 0, "tags": ""}
    profile = {"screen_name": "九一 ✨", "viewed_count": 9}
    reviews = {
        "review0": {"user_id": "abc", "movie_id": "100", "text": "第0条", "date": "2020-01-20 12:51:35", "stars": 3,
                    "useful": 1, "label": 0, "user_profile": profile, "user_reviews": history},
        # A second record of the same user: its history repeats the first's (not counted as duplicates).
        "review1": {"user_id": "abc", "movie_id": "101", "text": "第1条", "date": "2020-01-19 10:00:00", "stars": 3,
                    "useful": 1, "label": 0, "user_profile": profile, "user_reviews": dict(list(history.items())[1:])},
    }
    movies = {str(100 + i): {"movie_name": f"电影{i}", "directors": {}} for i in range(7)}  # 107 has no title
    (tmp_path / "reviews.json").write_text(json.dumps(reviews, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "movies.json").write_text(json.dumps(movies, ensure_ascii=False), encoding="utf-8")
    rc, out, err = run_import(capsys, tmp_path / "reviews.json", tmp_path / "movies.json",
                              "--output", tmp_path / "o.json")
    assert rc == 0, err
    got = loaded(tmp_path / "o.json")["九一 ✨"]
    assert got[0] == ("107", "第7条", "2020-01-13") and got[-1] == ("电影0", "第0条", "2020-01-20")
    assert len(got) == 8
    assert skipped(out) == {"empty text": (1, "reviews.json review0/review8")}
    assert "note: title unknown, movie id kept: 2 (first: reviews.json review0/review8 (movie 555))" in out


def test_the_real_dmr_sample_imports_to_the_converted_reviews(douban_dmr_dir, tmp_path, capsys):
    raw = douban_dmr_dir / "raw"
    out_dir = tmp_path / "dmr"
    rc, out, err = run_import(capsys, raw / "reviews.json", raw / "movies.json", "--output", out_dir,
                              "--min_reviews", "1")
    assert rc == 0, err
    converted = sorted(str(p) for p in douban_dmr_dir.glob("*.json"))
    expected = loaded_many(converted)
    assert loaded(out_dir) == expected
    assert len(expected) == 6 and "duplicate" not in out


def loaded_many(files: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    data = dl.load_review_data(files)
    return {u.name: [(r.movie, r.text, r.timestamp) for r in u.reviews] for u in data.users}


# ----------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "day"), [
    ("2017-05-01 12:00:00", "2017-05-01"), ("2017/5/1", "2017-05-01"), ("2017.05.01", "2017-05-01"),
    ("2017年5月1日", "2017-05-01"), (" 2017-5-1T08:00:00+08:00 ", "2017-05-01"), ("2017-02-30", None),
    ("2017-05-01 25:00", None), ("05/01/2017", None), ("", None), (None, None), (20170501, None),
    (datetime(2017, 5, 1, 9, 5), "2017-05-01"),
])
def test_timestamps_normalise_to_a_day(value, day):
    stamp = di.Collector().normalise_time(value)
    assert (stamp[0] if stamp else None) == day


def test_clock_orders_within_a_day():
    assert fmt.parse_clock("9:05") == "09:05:00" and fmt.parse_clock("23:59:59.5") == "23:59:59"
    assert fmt.parse_clock("12:60") is None


def test_the_import_never_loads_torch_or_transformers():
    code = ("import sys, import_douban, review_lm.data.douban_import, review_lm.data.douban_formats; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'pandas')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def docs_commands(script: str) -> list[list[str]]:
    """The arguments of every ``python SCRIPT`` command in docs/import.md's bash blocks, continuations joined."""
    import shlex

    text = (REPO / "docs" / "import.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0]) if not line.lstrip().startswith("#") else []
            if words[:2] == ["python", script]:
                found.append(words[2:])
    return found


def test_the_documented_commands_parse():
    commands = docs_commands("import_douban.py")
    assert len(commands) >= 5
    for argv in commands:
        args = import_douban.parse_args(argv)
        import_douban.check_flags(args)


def test_the_documented_training_commands_pass_the_training_flag_checks():
    import train_distributed_MovieReview as tr
    from review_lm.training.plan import validate_arguments

    commands = docs_commands("train_distributed_MovieReview.py")
    assert len(commands) == 2  # the export path and the data-set path
    for argv in commands:
        validate_arguments(tr.parse_args(argv))


@pytest.mark.slow
def test_the_script_as_a_user_runs_it(dmsc_file, tmp_path):
    out_dir = tmp_path / "users"
    result = subprocess.run([sys.executable, str(REPO / "import_douban.py"), str(dmsc_file), "--output",
                             str(out_dir), "--min_reviews", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dmsc: 13 rows read from DMSC.csv\n")
    check = subprocess.run([sys.executable, str(REPO / "data_loader_movie_review.py"), str(out_dir)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    bad = subprocess.run([sys.executable, str(REPO / "import_douban.py"), str(dmsc_file), "--output",
                          str(out_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")
