"""Tests for data_loader_movie_review: loading and the chronological split (split sizes and ratios,
time order, per-user splits), accepted variants and counters, and the real Douban files."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from math import floor
from pathlib import Path

import pytest

import data_loader_movie_review as dl
from review_lm.data import report as data_report
from tests.helpers import (
    REAL_FILES,
    all_samples,
    history_lines_in,
    load_obj,
    records_of,
    review,
    user_entry,
    write_json,
)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def independent_counts(path: Path) -> list[tuple[str, int, int]]:
    """(name, non-empty reviews, empty reviews) per user, by plain JSON parsing."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    out = []
    for entry in obj if isinstance(obj, list) else [obj]:
        texts = [r["continuation"] for c in entry["task"]["task_behavior_collections"]
                 if c["type"] == "movie_review" for r in c["data"]]
        empty = sum(1 for t in texts if re.fullmatch(r"\s*", t))
        out.append((entry["user"]["profile"]["name"], len(texts) - empty, empty))
    return out


# --------------------------------------------------------------------------------------------------------------
# Chronological split
# --------------------------------------------------------------------------------------------------------------
def test_example_splits_19_4_5_in_time_order(example_splits, example_records):
    assert [len(example_splits[n]) for n in dl.SPLITS] == [19, 4, 5]
    assert [s.position for s in all_samples(example_splits)] == list(range(28))
    assert [s.split for s in all_samples(example_splits)] == ["train"] * 19 + ["val"] * 4 + ["test"] * 5
    assert [s.target.timestamp for s in all_samples(example_splits)] == [r["timestamp"] for r in example_records]


@pytest.mark.parametrize(("n", "train", "val", "expected"), [
    (28, 0.7, 0.15, (19, 4, 5)),
    (10, 0.7, 0.15, (7, 1, 2)),   # 10*0.7 is 6.999... in floats: still 7
    (20, 0.7, 0.15, (14, 3, 3)),
    (2, 0.7, 0.15, (1, 0, 1)),
    (1, 0.7, 0.15, (0, 0, 1)),
    (0, 0.7, 0.15, (0, 0, 0)),
    (5, 0.5, 0.5, (2, 2, 1)),     # the rest goes to test
    (4, 1.0, 0.0, (4, 0, 0)),
    (3, 0.0, 0.0, (0, 0, 3)),
])
def test_split_sizes_examples(n, train, val, expected):
    assert dl.split_sizes(n, train, val) == expected


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.5, 0.25, 0.25),
                                    (0.9, 0.05, 0.05), (0.34, 0.33, 0.33)])
def test_split_sizes_is_floor_of_n_times_ratio_rest_to_test(ratios):
    train, val, _ = ratios
    for n in range(300):
        n_train = floor(n * Fraction(str(train)))  # int(n*ratio) in exact decimal arithmetic
        n_val = floor(n * Fraction(str(val)))
        assert dl.split_sizes(n, train, val) == (n_train, n_val, n - n_train - n_val), n


@pytest.mark.parametrize("ratios", [(1.5, -0.25, -0.25), (-0.1, 0.6, 0.5), (0.7, 0.2, 0.2), (0.5, 0.2, 0.2),
                                    (float("nan"), 0.5, 0.5)])
def test_bad_ratios_raise_one_line_error_naming_the_file(example_data, ratios):
    with pytest.raises(dl.ReviewDataError) as info:
        dl.split_chronologically(example_data, *ratios)
    message = str(info.value)
    assert "\n" not in message
    assert example_data.path in message
    assert "ratio" in message


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.1, 0.2, 0.7)])
def test_good_ratios_are_accepted(ratios):
    dl.check_ratios(*ratios)  # raises on failure
    assert sum(dl.split_sizes(17, ratios[0], ratios[1])) == 17


def test_shuffled_file_gives_identical_samples(tmp_path, example_data_file, example_splits):
    obj = json.loads(example_data_file.read_text(encoding="utf-8"))
    data = records_of(obj[0])
    original = list(data)
    random.Random(1234).shuffle(data)
    assert data != original
    shuffled = dl.split_chronologically(load_obj(tmp_path, obj))
    builder = dl.PromptBuilder()
    for name in dl.SPLITS:
        assert [builder.render(s) for s in shuffled[name]] == [builder.render(s) for s in example_splits[name]]
        assert [s.target.text for s in shuffled[name]] == [s.target.text for s in example_splits[name]]


def test_same_day_reviews_keep_file_order(tmp_path):
    records = [review("A", "甲", "2015-05-01"), review("早", "早片", "2015-01-01"), review("B", "乙", "2015-05-01"),
               review("C", "丙", "2015-05-01"), review("晚", "晚片", "2016-01-01"), review("D", "丁", "2015-05-01")]
    data = load_obj(tmp_path, [user_entry("U", records)])
    assert [r.text for r in data.users[0].reviews] == ["早", "A", "B", "C", "D", "晚"]
    last = dl.split_chronologically(data, 0.5, 0.0, 0.5)["test"][-1]
    assert [line.split(": ", 1)[1] for line in history_lines_in(dl.PromptBuilder().render(last))] == \
        ["早", "A", "B", "C", "D"]


def test_timestamps_with_times_parse_and_order(tmp_path):
    records = [
        review("t130509", ts="2010-08-22T13:05:09"),
        review("t1305", ts="2010-08-22 13:05"),
        review("date", ts="2010-08-22"),
        review("z0500", ts="2010-08-22T05:00:00Z"),
        review("cst1000", ts="2010-08-22T10:00:00+08:00"),  # 02:00 UTC
        review("next", ts="2010-08-23"),
        review("prev", ts="2010-08-21T23:59:59"),
    ]
    data = load_obj(tmp_path, [user_entry("U", records)])
    assert [r.text for r in data.users[0].reviews] == ["prev", "date", "cst1000", "z0500", "t1305", "t130509", "next"]
    assert [r.timestamp for r in data.users[0].reviews][1:3] == ["2010-08-22", "2010-08-22T10:00:00+08:00"]


@pytest.mark.parametrize("stamp", ["2010/08/22", "2010-13-01", "2010-02-30", "2010-08-22 25:00", "2010-8-22",
                                   "22-08-2010", "", "yesterday"])
def test_bad_timestamp_is_an_error(tmp_path, stamp):
    path = write_json(tmp_path / "bad.json", [user_entry("U", [review("ok"), review("bad", ts=stamp)])])
    with pytest.raises(dl.ReviewDataError) as info:
        dl.load_review_file(path)
    assert "record #1" in str(info.value) and repr(stamp) in str(info.value)


def test_multi_user_split_is_per_user(tmp_path):
    a = [review(f"a{i}", f"A片{i}", f"2015-{i + 1:02d}-01") for i in range(10)]
    b = [review(f"b{i}", f"B片{i}", f"2014-{i + 3:02d}-15") for i in range(5)]
    random.Random(7).shuffle(a)
    data = load_obj(tmp_path, [user_entry("A", a), user_entry("B", b)])
    splits = dl.split_chronologically(data)
    for name, expected_a, expected_b in [("train", range(7), range(3)), ("val", range(7, 8), range(3, 3)),
                                         ("test", range(8, 10), range(3, 5))]:
        got = splits[name]
        assert [s.target.text for s in got if s.user.name == "A"] == [f"a{i}" for i in expected_a]
        assert [s.target.text for s in got if s.user.name == "B"] == [f"b{i}" for i in expected_b]
    for s in all_samples(splits):  # history is the same user's earlier reviews only
        assert [h.text for h in s.history] == [f"{s.user.name.lower()}{i}" for i in range(s.position)]


def check_chronology(path: Path, splits: dict) -> None:
    """Independent check: per user, train targets are the oldest; every history is exactly the earlier reviews."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    obj = obj if isinstance(obj, list) else [obj]
    ordered = {}  # user index -> record indexes of non-empty reviews, sorted by (timestamp, file order)
    for u, entry in enumerate(obj):
        recs = [(r["timestamp"], j) for j, r in enumerate(records_of(entry)) if r["continuation"].strip()]
        ordered[u] = [j for _, j in sorted(recs)]
    train_keys = {(s.user.index, s.target.record_index) for s in splits["train"]}
    later_keys = {(s.user.index, s.target.record_index) for n in ("val", "test") for s in splits[n]}
    assert not train_keys & later_keys
    for u, order in ordered.items():
        n_train, n_val, _ = dl.split_sizes(len(order), 0.7, 0.15)
        for name, lo, hi in [("train", 0, n_train), ("val", n_train, n_train + n_val), ("test", n_train + n_val, None)]:
            assert [s.target.record_index for s in splits[name] if s.user.index == u] == order[lo:hi]
    for s in all_samples(splits):
        order = ordered[s.user.index]
        k = order.index(s.target.record_index)
        assert [h.record_index for h in s.history] == order[:k]
        assert all(h.time <= s.target.time for h in s.history)
        assert len(history_lines_in(dl.PromptBuilder().render(s))) == k


def test_example_history_never_contains_later_reviews(example_data_file, example_splits):
    check_chronology(example_data_file, example_splits)


# --------------------------------------------------------------------------------------------------------------
# Loading: accepted variants and counters
# --------------------------------------------------------------------------------------------------------------
def test_single_user_object_is_accepted(tmp_path, example_data_file, example_splits):
    obj = json.loads(example_data_file.read_text(encoding="utf-8"))
    data = load_obj(tmp_path, obj[0])  # not wrapped in a list
    assert len(data.users) == 1 and data.users[0].name == "Y" and data.num_reviews == 28
    splits = dl.split_chronologically(data)
    builder = dl.PromptBuilder()
    assert [builder.render(s) for s in all_samples(splits)] == [builder.render(s) for s in all_samples(example_splits)]


def test_other_collection_types_are_ignored_and_counted(tmp_path):
    extra = ({"type": "book_review", "data": [review("书评", "某书", "2015-03-01")]},
             {"type": "music", "data": "not even a list"})
    entry = user_entry("U", [review("一", "甲", "2015-01-01"), review("二", "乙", "2015-02-01")],
                       extra_collections=extra)
    data = load_obj(tmp_path, [entry, user_entry("V", [review("三", "丙")])])
    assert [u.ignored_collections for u in data.users] == [2, 0]
    assert [r.text for r in data.users[0].reviews] == ["一", "二"]
    splits = dl.split_chronologically(data)
    report = data_report.build_report(data, splits, dl.PromptBuilder())
    assert report["skipped"]["non_movie_review_collections"] == 2
    assert [u["ignored_collections"] for u in report["per_user"]] == [2, 0]
    assert all("书评" not in dl.PromptBuilder().render(s) for s in all_samples(splits))


def test_empty_reviews_are_skipped_counted_and_never_used(tmp_path):
    records = [review("一", "甲", "2015-01-01"), review("", "空1", "2015-01-02"), review("   ", "空2", "2015-01-03"),
               review("二", "乙", "2015-01-04"), review("\n\t\u3000", "空3", "2015-01-05"),
               review("三", "丙", "2015-01-06")]
    data = load_obj(tmp_path, [user_entry("U", records)])
    assert data.users[0].skipped_empty == 3
    assert [(r.text, r.record_index) for r in data.users[0].reviews] == [("一", 0), ("二", 3), ("三", 5)]
    splits = dl.split_chronologically(data)
    samples = all_samples(splits)
    assert [s.target.text for s in samples] == ["一", "二", "三"]
    for s in samples:
        prompt = dl.PromptBuilder().render(s)
        assert "空" not in prompt
        assert all(line.split(": ", 1)[1].strip() for line in history_lines_in(prompt))
    report = data_report.build_report(data, splits, dl.PromptBuilder())
    assert report["skipped"]["empty_reviews"] == 3 and report["per_user"][0]["skipped_empty"] == 3
    assert report["reviews"] == 3 and report["samples"] == 3


def test_user_with_two_reviews_gives_empty_val_split_and_a_warning(tmp_path):
    data = load_obj(tmp_path, [user_entry("U", [review("一", "甲", "2015-01-01"), review("二", "乙", "2015-02-01")])])
    splits = dl.split_chronologically(data)
    assert [[s.target.text for s in splits[n]] for n in dl.SPLITS] == [["一"], [], ["二"]]
    report = data_report.build_report(data, splits, dl.PromptBuilder())
    assert report["warnings"] == ["the val split is empty"]
    assert report["splits"]["val"] == {"samples": 0, "time_range": None}
    assert report["example"]["split"] == "test" and report["example"]["target"] == "二"


def test_small_user_next_to_big_user(tmp_path, example_data_file):
    obj = json.loads(example_data_file.read_text(encoding="utf-8"))
    small = user_entry("S", [review("一", "甲", "2015-01-01"), review("二", "乙", "2015-02-01")])
    data = load_obj(tmp_path, [small, obj[0]])
    splits = dl.split_chronologically(data)
    assert [len(splits[n]) for n in dl.SPLITS] == [1 + 19, 0 + 4, 1 + 5]
    report = data_report.build_report(data, splits, dl.PromptBuilder())
    assert report["warnings"] == []
    assert [[u["splits"][n]["samples"] for n in dl.SPLITS] for u in report["per_user"]] == [[1, 0, 1], [19, 4, 5]]


# --------------------------------------------------------------------------------------------------------------
# Real Douban files
# --------------------------------------------------------------------------------------------------------------
README_COUNTS = {
    "multi_user_4.json": [("小米妮儿", 58, 0), ("花纹妹妹", 57, 0), ("圆圆", 45, 11), ("九一", 56, 0)],
    "user_3eeb2203.json": [("一天到晚发呆", 59, 20)],
    "user_cb8b084a.json": [("演员新之助", 3, 62)],
}


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_loads_with_expected_counts(douban_dmr_dir, name):
    path = douban_dmr_dir / name
    counted = independent_counts(path)
    assert counted == README_COUNTS[name]
    data = dl.load_review_file(str(path))
    assert [(u.name, len(u.reviews), u.skipped_empty) for u in data.users] == counted
    assert all(u.ignored_collections == 0 for u in data.users)
    splits = dl.split_chronologically(data)
    report = data_report.build_report(data, splits, dl.PromptBuilder())
    assert report["skipped"]["empty_reviews"] == sum(c[2] for c in counted)
    assert report["samples"] == report["reviews"] == sum(c[1] for c in counted)
    assert [u["skipped_empty"] for u in report["per_user"]] == [c[2] for c in counted]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_split_is_chronological_per_user(douban_dmr_dir, name):
    path = douban_dmr_dir / name
    splits = dl.split_chronologically(dl.load_review_file(str(path)))
    check_chronology(path, splits)
    for s in all_samples(splits):
        for line in history_lines_in(dl.PromptBuilder().render(s)):
            assert line.count("《") >= 1 and "\n" not in line
        assert dl.PromptBuilder().render(s).count("\n") == (s.position + 6 if s.position else 4)
