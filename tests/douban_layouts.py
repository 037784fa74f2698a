"""Douban layouts for the import tests: the exact headers, fixture rows, and helpers that run the importer and read
what it wrote (used by tests/test_import_douban*.py and the dmsc_file fixture in conftest.py)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import data_loader_movie_review as dl
import import_douban

DMSC_HEADER = ["ID", "Movie_Name_EN", "Movie_Name_CN", "Crawl_Date", "Number", "Username", "Date", "Star",
               "Comment", "Like"]
COMMENTS_HEADER = ["COMMENT_ID", "USER_ID", "MOVIE_ID", "CONTENT", "VOTES", "COMMENT_TIME"]
MOVIES_HEADER = ["MOVIE_ID", "NAME", "ALIAS", "ACTORS", "COVER", "DIRECTORS", "DOUBAN_SCORE", "DOUBAN_VOTES",
                 "GENRES", "IMDB_ID", "LANGUAGES", "MINS", "OFFICIAL_SITE", "REGIONS", "RELEASE_DATE", "SLUG",
                 "STORYLINE", "TAGS", "YEAR", "ACTOR_IDS", "DIRECTOR_IDS"]
USERS_HEADER = ["USER_ID", "USER_NICKNAME", "USER_AVATAR", "USER_URL"]
TOFU_HEADER = ["标题", "简介", "豆瓣评分", "链接", "创建时间", "我的评分", "标签", "评论", "可见性"]
LONG_HEADER = ["标题", "评论对象", "链接", "创建时间", "我的评分", "类型", "内容"]


def run_import(capsys, *argv: str) -> tuple[int, str, str]:
    rc = import_douban.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def loaded(path: Path) -> dict[str, list[tuple[str, str, str]]]:
    """What the loader reads back: user name -> [(movie, text, timestamp)] oldest first (non-empty texts)."""
    data = dl.load_review_data([str(path)])
    return {u.name: [(r.movie, r.text, r.timestamp) for r in u.reviews] for u in data.users}


def write_csv(path: Path, header: list[str], rows: list[list[str]], bom: bool = True, crlf: bool = True) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n" if crlf else "\n").writerows([header, *rows])
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8"))
    return path


def skipped(summary: str) -> dict[str, tuple[int, str]]:
    """The summary's skip table: reason -> (count, where the first one was)."""
    return {m[1]: (int(m[2].replace(",", "")), m[3])
            for m in re.finditer(r"^  ([a-zA-Z ]+):\s+([\d,]+)  first: (.*)$", summary, re.M)}


def assert_usage_error(rc: int, out: str, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def assert_nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before, "the failed import left files behind"


# ----------------------------------------------------------------------------------------------------------------
# DMSC
# ----------------------------------------------------------------------------------------------------------------
def dmsc_rows() -> list[list[str]]:
    def row(i, en, cn, user, day, comment):
        return [str(i), en, cn, "2017-01-22", str(i), user, day, "4", comment, "3"]

    return [
        row(0, "Avengers", "复仇者联盟", "影迷甲", "2015-05-13", " 特效不错，剧情一般"),  # leading space, as in DMSC
        row(1, "Iron Man", "钢铁侠", "影迷甲", "2015-05-01", " boring"),
        row(2, "Avengers", "复仇者联盟", "影迷甲", "2015-05-13", " 特效不错，剧情一般"),  # exact duplicate of row 0
        row(3, "Big Fish", "大鱼海棠", "影迷甲", "2016-07-09", ""),  # empty comment (a rating only)
        row(4, "Zootopia", "疯狂动物城", "影迷甲", "2016-13-04", " 好看"),  # month 13
        row(5, "Monkey King", "", "影迷甲", "2015/7/10", " 画面，\n第二行，\"引号\""),  # no Chinese title; newline
        row(6, "Mermaid", "美人鱼", "影迷甲", "2016-02-08 20:15:00", " 功夫之后再无周星驰。"),
        row(7, "Mojin", "寻龙诀", "影迷甲", "2015-12-20", " 铁三角"),
        row(8, "Lost in Hong Kong", "港囧", "影迷甲", "2015-09-25", " 一般"),
        row(9, "Dragon Blade", "天将雄师", "影迷甲", "2015-02-19", " 成龙"),
        row(10, "Iron Man", "钢铁侠", "路人乙", "2015-05-02", " 还行"),
        row(11, "Avengers", "复仇者联盟", "路人乙", "2015-05-14", " 不错"),
    ]


DMSC_EXPECTED = [  # 影迷甲, oldest first
    ("天将雄师", "成龙", "2015-02-19"),
    ("钢铁侠", "boring", "2015-05-01"),
    ("复仇者联盟", "特效不错，剧情一般", "2015-05-13"),
    ("Monkey King", "画面，\n第二行，\"引号\"", "2015-07-10"),
    ("港囧", "一般", "2015-09-25"),
    ("寻龙诀", "铁三角", "2015-12-20"),
    ("美人鱼", "功夫之后再无周星驰。", "2016-02-08"),
]
