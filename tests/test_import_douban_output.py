"""import_douban.py (issue 25): the output (never over a previous one without --overwrite, a folder for many users,
safe file names, one review a line) and every bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import import_douban
from review_lm.data import douban_output as do
from tests.douban_layouts import (
    DMSC_HEADER,
    assert_nothing_written,
    assert_usage_error,
    loaded,
    run_import,
    write_csv,
)
from tests.helpers import REPO


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def test_existing_output_needs_overwrite_and_is_replaced_whole(dmsc_file, tmp_path, capsys):
    target = tmp_path / "o.json"
    target.write_text("old", encoding="utf-8")
    rc, out, err = run_import(capsys, dmsc_file, "--output", target)
    assert_usage_error(rc, out, err, "exists; add --overwrite")
    assert target.read_text(encoding="utf-8") == "old"
    rc, _, err = run_import(capsys, dmsc_file, "--output", target, "--overwrite")
    assert rc == 0, err
    assert list(loaded(target)) == ["影迷甲"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DMSC.csv", "o.json"]  # no temporary file left


def test_a_folder_with_other_files_is_never_replaced(dmsc_file, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    rc, out, err = run_import(capsys, dmsc_file, "--output", folder, "--overwrite")
    assert_usage_error(rc, out, err, "notes.txt")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_many_users_in_a_json_output_become_a_folder(dmsc_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(do, "FILE_USER_LIMIT", 1)
    rc, out, err = run_import(capsys, dmsc_file, "--output", tmp_path / "all.json", "--min_reviews", "1")
    assert rc == 0, err
    assert not (tmp_path / "all.json").exists() and len(list((tmp_path / "all").iterdir())) == 2
    assert set(loaded(tmp_path / "all")) == {"影迷甲", "路人乙"}


def test_the_written_text_is_the_entry_one_review_a_line():
    user = do.UserReviews("k", "名字 \"引号\"\n")
    user.reviews = {("2015-01-02", "片名", "第一行\n第二行"): "", ("2015-01-01", "别的: 片", ""): "08:00:00"}
    text = do.user_json(user)
    assert json.loads(text) == do.user_entry(user)
    lines = text.splitlines()
    assert lines[-7] == ('            {"context": [], "continuation": "", "continuation_prefix": "别的: 片: ", '
                         '"timestamp": "2015-01-01"},')


def test_user_file_names_are_safe_and_distinct():
    users = [do.UserReviews("k1", "a/b:c*?"), do.UserReviews("k2", "a/b:c*?"), do.UserReviews("k3", "..")]
    names = do.user_file_names(users)
    assert len(set(names)) == 3
    assert all(re.fullmatch(r"user_[\w-]+_[0-9a-f]{10}(-\d+)?\.json", n) for n in names), names


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------------
def bad_input_cases(tmp_path: Path, dmsc_file: Path) -> list[tuple[list, str]]:
    no_comment = write_csv(tmp_path / "no_comment.csv", [c for c in DMSC_HEADER if c != "Comment"],
                           [["1", "a", "b", "c", "1", "u", "2015-01-01", "3", "1"]])
    unknown = write_csv(tmp_path / "other.csv", ["a", "b", "c"], [["1", "2", "3"]])
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(",".join(DMSC_HEADER).encode() + "\n1,a,中文,c,1,用户,2015-01-01,3,好看,1\n".encode("gbk"))
    fake_xlsx = tmp_path / "fake.xlsx"
    fake_xlsx.write_bytes(b"PK\x03\x04 this is no workbook")
    spec_json = REPO / "example_movie_review_data.json"
    out = tmp_path / "o.json"
    return [
        ([no_comment, "--output", out], "missing column Comment"),
        ([unknown, "--output", out], "not a known Douban layout"),
        ([gbk, "--output", out], "not UTF-8"),
        ([fake_xlsx, "--output", out, "--user_name", "x"], "not a readable XLSX file"),
        ([tmp_path / "missing.csv", "--output", out], "no such file"),
        ([tmp_path, "--output", out], "is a directory"),
        ([spec_json, "--output", out], "already the project's review JSON"),
        ([dmsc_file, "--output", out, "--format", "tofu"], "not a tofu file"),
        ([dmsc_file, fake_xlsx, "--output", out], "import one layout at a time"),
        ([dmsc_file, dmsc_file, "--output", out], "given twice"),
        ([dmsc_file, "--output", out, "--user_name", "x"], "--user_name is for the tofu export"),
        ([dmsc_file, "--output", out, "--min_reviews", "0"], "--min_reviews must be >= 1"),
        ([dmsc_file, "--output", out, "--since", "2015-13-01"], "--since must be a date"),
        ([dmsc_file, "--output", out, "--since", "2016-01-01", "--until", "2015-01-01"], "is after --until"),
        ([dmsc_file, "--output", out, "--min_reviews", "50"], "the most reviews any has is 7"),
        ([dmsc_file, "--output", out, "--users", "路人乙"], "no user named 路人乙 among the 1 users with 7"),
        ([dmsc_file, "--output", tmp_path / "DMSC.csv" / "o.json"], "is not a folder"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(dmsc_file, tmp_path, capsys):
    cases = bad_input_cases(tmp_path, dmsc_file)
    before = {p.name for p in tmp_path.iterdir()}
    for argv, fragment in cases:
        rc, out, err = run_import(capsys, *argv)
        assert_usage_error(rc, out, err, fragment)
        assert_nothing_written(tmp_path, before)


def test_bad_flag_value_is_argparse_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        import_douban.main(["x.csv", "--output", str(tmp_path / "o.json"), "--max_users", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --max_users: invalid int value: 'many'\n"
