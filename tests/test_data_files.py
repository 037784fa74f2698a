"""Tests for data_loader_movie_review's inputs: bad input (one-line ReviewDataError from the API, exit 2
with one "error:" line from the CLI), and several files or a directory loaded as one data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import data_loader_movie_review as dl
from review_lm.data import report as data_report
from tests.helpers import records_of, review, run_cli, user_entry, write_json


# --------------------------------------------------------------------------------------------------------------
# Bad input: one-line ReviewDataError from the API, exit 2 with one "error:" line from the CLI
# --------------------------------------------------------------------------------------------------------------
def _two_users(tmp_path: Path, mutate) -> Path:
    good = user_entry("A", [review("好看", "甲", "2015-01-01")])
    bad = user_entry("B", [review("一", "乙", "2015-01-02"), review("二", "丙", "2015-01-03"),
                           review("三", "丁", "2015-01-04")])
    mutate(bad)
    return Path(write_json(tmp_path / "bad.json", [good, bad]))


def _raw(tmp_path: Path, content: bytes | str) -> Path:
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _set(getter, key, value):
    def mutate(entry):
        target = getter(entry)
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return mutate


def _rec2(entry):
    return records_of(entry)[2]


def _dir(tmp_path: Path) -> Path:
    (tmp_path / "adir").mkdir()
    return tmp_path / "adir"


BAD_INPUTS = {
    "file_missing": (lambda t: t / "missing.json", ["not found"]),
    "directory": (_dir, ["directory"]),
    "not_utf8": (lambda t: _raw(t, b'[{"user": "caf\xe9"}]'), ["UTF-8"]),
    "invalid_json": (lambda t: _raw(t, '[\n  {,\n]'), ["invalid JSON", "line 2", "column 4"]),
    "top_level_number": (lambda t: _raw(t, "42"), ["top level", "a number"]),
    "top_level_string": (lambda t: _raw(t, '"hello"'), ["top level", "a string"]),
    "empty_list": (lambda t: _raw(t, "[]"), ["no users"]),
    "missing_name": (lambda t: _two_users(t, _set(lambda e: e["user"]["profile"], "name", KeyError)),
                     ["user #1", "user.profile.name"]),
    "name_not_string": (lambda t: _two_users(t, _set(lambda e: e["user"]["profile"], "name", 7)),
                        ["user #1", "user.profile.name", "a number"]),
    "missing_description": (lambda t: _two_users(t, _set(lambda e: e["task"], "description", KeyError)),
                            ["user #1 (B)", "task.description"]),
    "collections_not_list": (lambda t: _two_users(t, _set(lambda e: e["task"], "task_behavior_collections",
                                                          {"type": "movie_review"})),
                             ["user #1 (B)", "task_behavior_collections", "a list"]),
    "record_not_object": (lambda t: _two_users(t, _set(records_of, 2, "三")),
                          ["user #1 (B)", "record #2", "an object"]),
    "continuation_not_string": (lambda t: _two_users(t, _set(_rec2, "continuation", 3)),
                                ["user #1 (B)", "record #2", "continuation"]),
    "missing_timestamp": (lambda t: _two_users(t, _set(_rec2, "timestamp", KeyError)),
                          ["user #1 (B)", "record #2", "timestamp"]),
    "timestamp_slashes": (lambda t: _two_users(t, _set(_rec2, "timestamp", "2010/08/22")),
                          ["user #1 (B)", "record #2", "2010/08/22"]),
    "timestamp_month_13": (lambda t: _two_users(t, _set(_rec2, "timestamp", "2010-13-01")),
                           ["user #1 (B)", "record #2", "2010-13-01"]),
    "empty_movie_name": (lambda t: _two_users(t, _set(_rec2, "continuation_prefix", ": ")),
                         ["user #1 (B)", "record #2", "movie name"]),
    "all_reviews_empty": (lambda t: _raw(t, json.dumps([user_entry("U", [review(""), review("  \n")])])),
                          ["no usable reviews"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_error(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(dl.ReviewDataError) as info:
        dl.load_review_file(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for part in expected:
        assert part in message


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    result = run_cli(path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0]
    for part in expected:
        assert part in lines[0]
    assert result.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "expected"), [
    (["--train_ratio", "1.5"], ["train_ratio", "1.5"]),
    (["--val_ratio", "-0.1"], ["val_ratio", "-0.1"]),
    (["--train_ratio", "0.5"], ["sum to 1"]),
])
def test_cli_bad_ratios_exit_2_with_one_error_line(example_data_file, flags, expected):
    result = run_cli(example_data_file, *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0]


def test_error_message_stays_one_line_when_user_name_has_a_newline(tmp_path):
    """ReviewDataError promises one line; a user name is data, so it must not break that."""
    path = write_json(tmp_path / "bad.json", [user_entry("第一行\n第二行", [review("x", ts="2010/08/22")])])
    with pytest.raises(dl.ReviewDataError) as info:
        dl.load_review_file(path)
    assert "\n" not in str(info.value)
    assert "record #0" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Several files / a directory as one data set
# --------------------------------------------------------------------------------------------------------------
def _user_file(path: Path, name: str, count: int, day0: int = 1) -> str:
    return write_json(path, [user_entry(name, [review(f"{name}的第{i}条", f"片{i}", f"2015-01-{day0 + i:02d}")
                                               for i in range(count)])])


def test_two_files_load_as_one_data_set_with_distinct_users(tmp_path):
    a = _user_file(tmp_path / "a.json", "Y", 10)
    b = _user_file(tmp_path / "b.json", "Y", 7)  # same name, other file: another user
    data = dl.load_review_data([a, b])
    assert data.files == [a, b] and data.path == f"{a}, {b}"
    assert [(u.index, u.name, u.file, u.file_index, len(u.reviews)) for u in data.users] == \
        [(0, "Y", a, 0, 10), (1, "Y", b, 0, 7)]
    assert all(r.user_index == u.index for u in data.users for r in u.reviews)
    splits = dl.split_chronologically(data)
    assert [len(splits[n]) for n in dl.SPLITS] == [7 + 4, 1 + 1, 2 + 2]
    assert {s.user.index for s in splits["test"]} == {0, 1}
    report = data_report.build_report(data, splits, dl.PromptBuilder())
    assert [(u["index"], u["file"], u["reviews"]) for u in report["per_user"]] == [(0, a, 10), (1, b, 7)]
    assert report["files"] == [a, b]


def test_one_file_through_load_review_data_is_load_review_file(example_data_file):
    path = str(example_data_file)
    assert dl.load_review_data([path]) == dl.load_review_file(path) == dl.load_review_data(path)


def test_directory_loads_its_json_files_in_name_order(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    for name, count in (("c", 3), ("a", 4), ("b", 5)):
        _user_file(folder / f"user_{name}.json", name.upper(), count)
    (folder / "notes.txt").write_text("not data")
    (folder / "sub").mkdir()  # not recursive
    _user_file(folder / "sub" / "user_d.json", "D", 2)
    extra = _user_file(tmp_path / "extra.json", "E", 3)
    data = dl.load_review_data([str(folder), extra])
    assert [u.name for u in data.users] == ["A", "B", "C", "E"]
    assert [u.index for u in data.users] == [0, 1, 2, 3]
    assert data.files == [str(folder / "user_a.json"), str(folder / "user_b.json"), str(folder / "user_c.json"),
                          extra]


@pytest.mark.slow
def test_bad_file_in_a_directory_is_named(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    _user_file(folder / "a.json", "A", 3)
    bad = user_entry("B", [review("一", "乙", "2015-01-02"), review("二", "丙", "2015/01/03")])
    write_json(folder / "b.json", [bad])
    with pytest.raises(dl.ReviewDataError) as info:
        dl.load_review_data([str(folder)])
    message = str(info.value)
    assert message.startswith(str(folder / "b.json") + ": user #0 (B): record #1: ")
    assert "2015/01/03" in message
    result = run_cli(folder)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: {message}"]


@pytest.mark.slow
@pytest.mark.parametrize(("make", "expected"), [
    (lambda t: [str(_dir(t))], ["adir", "no .json files"]),
    (lambda t: [_user_file(t / "a.json", "A", 3)] * 2, ["a.json", "given twice"]),
    (lambda t: [str(t), _user_file(t / "a.json", "A", 3)], ["a.json", "given twice", "named by"]),
    (lambda t: [_user_file(t / "a.json", "A", 3), str(t / "missing.json")], ["missing.json", "not found"]),
])
def test_bad_multi_file_inputs_are_one_line_errors(tmp_path, make, expected):
    paths = make(tmp_path)
    with pytest.raises(dl.ReviewDataError) as info:
        dl.load_review_data(paths)
    assert "\n" not in str(info.value)
    for part in expected:
        assert part in str(info.value)
    result = run_cli(*paths)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


@pytest.mark.slow
def test_cli_takes_several_files_and_directories(tmp_path, douban_dmr_dir, example_data_file):
    result = run_cli(douban_dmr_dir, example_data_file, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["users"] == 7 and len(report["files"]) == 4
    assert [u["name"] for u in report["per_user"]][-1] == "Y"
    assert [u["index"] for u in report["per_user"]] == list(range(7))
    text = run_cli(douban_dmr_dir, example_data_file).stdout
    assert "文件 (4 个): " in text and "等（共 4 个）" in text
    assert "#6 Y [example_movie_review_data.json]: 28 条" in text


@pytest.mark.slow
def test_report_with_thousands_of_users_is_summarised(tmp_path):
    # 3000 users; user u has 1 + u % 7 reviews, so users with 1 or 2 reviews have empty val / test splits.
    users = [user_entry(f"u{u}", [review(f"t{u}-{i}", f"m{i}", f"2015-01-{1 + i:02d}") for i in range(1 + u % 7)])
             for u in range(3000)]
    path = write_json(tmp_path / "many.json", users)
    result = run_cli(path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "用户数: 3000" in text and "各用户 (3000 个，完整列表见 --json):" in text
    assert len(text.splitlines()) < 60  # readable: no line per user
    assert "影评最多: #6 u6 (7), #13 u13 (7), #20 u20 (7)" in text
    assert "影评最少: #0 u0 (1), #7 u7 (1), #14 u14 (1)" in text
    counts = [1 + u % 7 for u in range(3000)]
    empty_val = sum(1 for n in counts if dl.split_sizes(n, 0.7, 0.15)[1] == 0)
    empty_test = sum(1 for n in counts if dl.split_sizes(n, 0.7, 0.15)[2] == 0)
    assert f"val 为空的用户: {empty_val} 个; test 为空的用户: {empty_test} 个" in text
    report = json.loads(run_cli(path, "--json").stdout)
    assert len(report["per_user"]) == 3000
    assert report["users_with_empty_split"] == {"train": sum(1 for n in counts if int(n * 0.7 + 1e-9) == 0),
                                                "val": empty_val, "test": empty_test}
    per_user = {u["index"]: u for u in report["per_user"]}
    assert per_user[13]["splits"]["train"]["samples"] == 4  # 7 reviews: 4 / 1 / 2
    assert per_user[13]["splits"]["test"]["time_range"] == ["2015-01-06", "2015-01-07"]
