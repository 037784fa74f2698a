"""Tests for data_loader_movie_review: loading, validation, chronological split, prompt, token ids, CLI."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from fractions import Fraction
from math import floor
from pathlib import Path

import pytest

import data_loader_movie_review as dl
from review_lm.data import report as data_report
from tests.eager_encoder import SampleTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_PATH = REPO_ROOT / "data_loader_movie_review.py"
TASK = "基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式"
REAL_FILES = ("multi_user_4.json", "user_3eeb2203.json", "user_cb8b084a.json")
ABLATIONS = [(True, True), (True, False), (False, True), (False, False)]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def review(text: str, movie: str = "电影", ts: str = "2015-01-01", prefix: str | None = None) -> dict:
    return {"context": [], "continuation": text,
            "continuation_prefix": f"{movie}: " if prefix is None else prefix, "timestamp": ts}


def user_entry(name: str, records: list, description: str = TASK, extra_collections: tuple = ()) -> dict:
    collections = [{"type": "movie_review", "type_desc": "豆瓣影评数据", "data": records}, *extra_collections]
    return {"user": {"profile": {"name": name}},
            "task": {"description": description, "task_behavior_collections": collections}}


def records_of(entry: dict) -> list:
    return entry["task"]["task_behavior_collections"][0]["data"]


def write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def load_obj(tmp_path: Path, obj, name: str = "data.json") -> dl.ReviewData:
    return dl.load_review_file(write_json(tmp_path / name, obj))


def all_samples(splits: dict) -> list:
    return [s for name in dl.SPLITS for s in splits[name]]


def folded(text: str) -> str:
    return " ".join(text.split())


def expected_history_lines(records: list) -> list[str]:
    """History lines built straight from raw JSON records (independent of the module's helpers)."""
    lines = []
    for r in records:
        prefix = r["continuation_prefix"]
        assert prefix.endswith(": "), prefix
        lines.append(f"  电影《{prefix.removesuffix(': ')}》: {folded(r['continuation'])}")
    return lines


def history_lines_in(prompt: str) -> list[str]:
    return [line for line in prompt.split("\n") if line.startswith("  电影《")]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, str(MODULE_PATH), *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", cwd=REPO_ROOT, env=env, timeout=timeout)


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
# Fixtures local to this file
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def example_records(example_data_file) -> list:
    with open(example_data_file, encoding="utf-8") as f:
        obj = json.load(f)
    return records_of(obj[0])


@pytest.fixture
def example_data(example_data_file) -> dl.ReviewData:
    return dl.load_review_file(str(example_data_file))


@pytest.fixture
def example_splits(example_data) -> dict:
    return dl.split_chronologically(example_data)


@pytest.fixture
def golden_prompt(example_records) -> str:
    """The spec's "模型输入格式" for the 美人鱼 sample (20th review, first val sample)."""
    lines = expected_history_lines(example_records[:19])
    return (
        "用户: Y\n"
        "任务: 基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式\n"
        "\n"
        "历史影评记录 (19条):\n"
        + "\n".join(lines) + "\n"
        "\n"
        "请为电影《美人鱼》写一条影评：\n"
    )


@pytest.fixture(params=["qwen", "bpe"])
def any_tokenizer(request):
    """Both tiny offline tokenizers (pad id == eos id for each)."""
    return request.getfixturevalue(f"{request.param}_tokenizer")


# --------------------------------------------------------------------------------------------------------------
# Golden prompt (spec: 模型输入格式)
# --------------------------------------------------------------------------------------------------------------
def test_example_file_is_chronological_with_28_reviews(example_records):
    assert len(example_records) == 28
    stamps = [r["timestamp"] for r in example_records]
    assert stamps == sorted(stamps) and len(set(stamps)) == 28  # so file order == time order below


def test_golden_prompt_for_meirenyu_sample(example_splits, golden_prompt):
    sample = example_splits["val"][0]
    assert sample.position == 19  # the 20th review
    assert sample.target.movie == "美人鱼"
    assert dl.PromptBuilder().render(sample) == golden_prompt
    assert sample.target.text == "功夫之后再无周星驰。"


def test_golden_prompt_history_lines(example_splits, golden_prompt):
    prompt = dl.PromptBuilder().render(example_splits["val"][0])
    lines = history_lines_in(prompt)
    assert len(lines) == 19
    assert lines[0] == "  电影《钢铁侠1》: boring"
    assert lines[18].startswith("  电影《寻龙诀》: 坤哥舒淇黄渤铁三角神还原了小说里的摸金校尉")
    assert prompt.startswith("用户: Y\n任务: 基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式\n\n"
                             "历史影评记录 (19条):\n")
    assert prompt.endswith("\n\n请为电影《美人鱼》写一条影评：\n")


def test_golden_prompt_is_what_the_model_sees(example_splits, golden_prompt, qwen_tokenizer):
    tok = qwen_tokenizer
    enc = SampleTokenizer(tok, None).encode(example_splits["val"][0])
    assert enc.prompt == golden_prompt
    assert enc.history_count == 19
    assert enc.input_ids == ids(tok, golden_prompt + "功夫之后再无周星驰。") + [tok.eos_token_id]
    assert enc.prompt_length == len(ids(tok, golden_prompt))


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
# Prompt: ablations, history block, folding, movie names
# --------------------------------------------------------------------------------------------------------------
def test_ablation_no_profile_drops_only_the_user_line(example_splits, golden_prompt):
    prompt = dl.PromptBuilder(use_profile=False).render(example_splits["val"][0])
    assert golden_prompt.startswith("用户: Y\n")
    assert prompt == golden_prompt.removeprefix("用户: Y\n")


def test_ablation_no_history_drops_only_the_history_block(example_splits, example_records, golden_prompt):
    block = "历史影评记录 (19条):\n" + "\n".join(expected_history_lines(example_records[:19])) + "\n\n"
    assert block in golden_prompt
    prompt = dl.PromptBuilder(use_history=False).render(example_splits["val"][0])
    assert prompt == golden_prompt.replace(block, "")
    assert prompt == f"用户: Y\n任务: {TASK}\n\n请为电影《美人鱼》写一条影评：\n"


def test_ablation_both_off_is_task_header_and_request(example_splits):
    prompt = dl.PromptBuilder(use_profile=False, use_history=False).render(example_splits["val"][0])
    assert prompt == f"任务: {TASK}\n\n请为电影《美人鱼》写一条影评：\n"


def test_first_review_has_no_history_block(example_splits, qwen_tokenizer):
    first = example_splits["train"][0]
    assert first.position == 0 and first.history == []
    prompt = dl.PromptBuilder().render(first)
    assert prompt == f"用户: Y\n任务: {TASK}\n\n请为电影《钢铁侠1》写一条影评：\n"
    enc = SampleTokenizer(qwen_tokenizer, None).encode(first)
    assert enc.history_count == 0 and enc.prompt == prompt


def test_newlines_fold_in_history_but_target_keeps_them(tmp_path):
    records = [review("  第一行\n\n第二行\t 第三行  ", "甲", "2015-01-01"), review("后来", "乙", "2015-02-01")]
    splits = dl.split_chronologically(load_obj(tmp_path, [user_entry("U", records)]), 0.5, 0.0, 0.5)
    first, second = splits["train"][0], splits["test"][0]
    assert first.target.text == "第一行\n\n第二行\t 第三行"  # stripped at the ends only
    prompt = dl.PromptBuilder().render(second)
    assert "  电影《甲》: 第一行 第二行 第三行\n" in prompt
    assert prompt.count("\n") == dl.PromptBuilder().render(first).count("\n") + 3  # title + 1 item + blank line


def test_example_newline_review_is_one_history_line(example_splits, example_records):
    interstellar = next(s for s in example_splits["train"] if s.target.movie == "星际穿越")
    assert "\n" in interstellar.target.text
    later = example_splits["test"][-1]
    lines = history_lines_in(dl.PromptBuilder().render(later))
    assert lines == expected_history_lines(example_records[:27])
    assert "  电影《星际穿越》: Do not go gentle into that good night. 三个小时，" in "\n".join(lines)


@pytest.mark.parametrize(("prefix", "movie"), [
    ("电影名: ", "电影名"),
    ("电影名：", "电影名"),
    ("电影名:", "电影名"),
    ("电影名： ", "电影名"),
    ("Title:: ", "Title:"),
    ("你的名字。: ", "你的名字。"),
    ("碟中谍5：神秘国度: ", "碟中谍5：神秘国度"),
    ("公民凯恩 Citizen Kane: ", "公民凯恩 Citizen Kane"),
])
def test_movie_name_from_prefix(tmp_path, prefix, movie):
    assert dl.movie_name(prefix) == movie
    data = load_obj(tmp_path, [user_entry("U", [review("好", prefix=prefix), review("再看", "别的", "2016-01-01")])])
    splits = dl.split_chronologically(data, 0.5, 0.0, 0.5)
    assert dl.PromptBuilder().render(splits["train"][0]).endswith(f"请为电影《{movie}》写一条影评：\n")
    assert f"  电影《{movie}》: 好\n" in dl.PromptBuilder().render(splits["test"][0])


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
# Token ids and labels
# --------------------------------------------------------------------------------------------------------------
def test_labels_mask_exactly_the_prompt_and_keep_eos(any_tokenizer, example_splits):
    tok = any_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    eos = tok.eos_token_id
    encs = SampleTokenizer(tok, None).encode_split(all_samples(example_splits))
    assert len(encs) == 28
    for enc in encs:
        n = enc.prompt_length
        assert 0 < n < len(enc.input_ids)
        assert len(enc.labels) == len(enc.input_ids)
        assert enc.labels[:n] == [dl.IGNORE_INDEX] * n
        assert enc.labels[n:] == enc.input_ids[n:]
        assert dl.IGNORE_INDEX not in enc.labels[n:]
        assert enc.input_ids[n:] == ids(tok, enc.sample.target.text) + [eos]
        assert enc.labels[-1] == eos and enc.input_ids[-1] == eos
        features = enc.as_features()
        assert features["attention_mask"] == [1] * len(enc.input_ids)
        assert features["input_ids"] == enc.input_ids and features["labels"] == enc.labels


def test_prompt_length_equals_tokenized_prompt(any_tokenizer, example_splits):
    """sample_record promises tokenizer(prompt) == input_ids[:prompt_length]; evaluation relies on it."""
    tok = any_tokenizer
    mismatches = []
    for enc in SampleTokenizer(tok, None).encode_split(all_samples(example_splits)):
        prompt_ids = ids(tok, enc.prompt)
        if enc.prompt_length != len(prompt_ids) or enc.input_ids[:enc.prompt_length] != prompt_ids:
            mismatches.append((enc.sample.target.movie, enc.prompt_length, len(prompt_ids)))
    assert not mismatches, f"{len(mismatches)} of 28 samples (movie, prompt_length, len(tokenizer(prompt))): " \
                           f"{mismatches[:3]}"


@pytest.fixture(scope="module")
def gpt2_style_bpe_tokenizer(example_data_file):
    """A byte-level BPE with GPT-2's pre-tokenisation, which merges "\n" with the indentation after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([example_data_file.read_text(encoding="utf-8")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_count_text_mismatches_flags_tokenizers_that_merge_across_newlines(
        qwen_tokenizer, bpe_tokenizer, gpt2_style_bpe_tokenizer, example_splits):
    samples = all_samples(example_splits)
    for tok in (qwen_tokenizer, bpe_tokenizer):
        st = SampleTokenizer(tok, None)
        assert st.count_text_mismatches(st.encode_split(samples), limit=28) == 0
    tok = gpt2_style_bpe_tokenizer
    st = SampleTokenizer(tok, None)
    encs = st.encode_split(samples)
    manual = sum(ids(tok, e.prompt) != e.input_ids[:e.prompt_length] for e in encs)
    assert manual > 0  # "\n" + "  电影《" is one GPT-2 pre-token, split across two pieces by the assembler
    assert st.count_text_mismatches(encs, limit=28) == manual
    assert st.count_text_mismatches(encs, limit=1) == 0  # the first sample has no history block


def test_sample_tokenizer_needs_an_eos_token(qwen_tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="EOS"):
        SampleTokenizer(NoEos(), None)
    assert SampleTokenizer(qwen_tokenizer, None).truncated_targets == 0


# --------------------------------------------------------------------------------------------------------------
# Token budget
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_length", [None, 160, 250, 400, 700])
def test_budget_keeps_the_most_recent_history_that_fits(qwen_tokenizer, example_splits, example_records, max_length):
    tok, eos = qwen_tokenizer, qwen_tokenizer.eos_token_id
    builder = dl.PromptBuilder()
    st = SampleTokenizer(tok, max_length)
    encs = st.encode_split(all_samples(example_splits))
    truncated = 0
    for enc in encs:
        s, k = enc.sample, enc.history_count
        target_ids = ids(tok, s.target.text)
        needs_cut = max_length is not None and len(ids(tok, builder.render(s, 0))) + len(target_ids) + 1 > max_length
        assert enc.target_truncated == needs_cut
        truncated += needs_cut
        if max_length is None:
            assert k == s.position
        else:
            assert len(enc.input_ids) <= max_length
        assert 0 <= k <= s.position
        # the kept items are the last k earlier reviews, and the prompt says how many
        assert enc.prompt == builder.render(s, k)
        assert history_lines_in(enc.prompt) == (expected_history_lines(example_records[s.position - k:s.position])
                                                if k else [])
        assert (f"历史影评记录 ({k}条):\n" in enc.prompt) == (k > 0)
        assert ("历史影评记录" in enc.prompt) == (k > 0)
        # the ids are exactly those of the rendered prompt plus the (possibly cut) target and EOS
        assert enc.input_ids[:enc.prompt_length] == ids(tok, enc.prompt)
        assert enc.input_ids[enc.prompt_length:-1] == target_ids[:len(enc.input_ids) - enc.prompt_length - 1]
        assert enc.input_ids[-1] == eos and len(enc.input_ids) > enc.prompt_length + 1  # target never dropped
        if needs_cut:
            assert len(enc.input_ids) == max_length
        elif k < s.position:  # one more history item would not fit
            assert len(ids(tok, builder.render(s, k + 1))) + len(target_ids) + 1 > max_length
    assert st.truncated_targets == truncated
    if max_length == 250:
        assert 0 < sum(e.history_count < e.sample.position for e in encs) and truncated == 0


def test_budget_one_below_full_length_drops_exactly_one_item(qwen_tokenizer, example_splits):
    samples = all_samples(example_splits)
    full = SampleTokenizer(qwen_tokenizer, None).encode_split(samples)
    longest = max(full, key=lambda e: len(e.input_ids))
    budget = len(longest.input_ids) - 1
    for enc, unlimited in zip(SampleTokenizer(qwen_tokenizer, budget).encode_split(samples), full, strict=True):
        if enc.sample is longest.sample:
            assert enc.history_count == enc.sample.position - 1
            assert f"({enc.sample.position - 1}条)" in enc.prompt
        elif len(unlimited.input_ids) <= budget:
            assert enc.input_ids == unlimited.input_ids and enc.history_count == enc.sample.position


def test_target_longer_than_budget_is_truncated_not_dropped(qwen_tokenizer, example_splits):
    tok, eos = qwen_tokenizer, qwen_tokenizer.eos_token_id
    samples = all_samples(example_splits)
    longest = max(samples, key=lambda s: len(ids(tok, s.target.text)))
    short = next(s for s in samples if s.target.text == "燃爆")
    base = len(ids(tok, dl.PromptBuilder().render(longest, 0)))
    budget = base + 11  # room for 10 target tokens + EOS
    assert len(ids(tok, dl.PromptBuilder().render(short, 0))) + len(ids(tok, "燃爆")) + 1 <= budget
    st = SampleTokenizer(tok, budget)
    enc_short, enc_long = st.encode_split([short, longest])
    assert enc_long.target_truncated and not enc_short.target_truncated
    assert st.truncated_targets == 1
    assert len(enc_long.input_ids) == budget and enc_long.history_count == 0
    assert enc_long.input_ids[-1] == eos and enc_long.labels[-1] == eos
    assert enc_long.input_ids[base:] == ids(tok, longest.target.text)[:10] + [eos]
    assert enc_long.labels == [dl.IGNORE_INDEX] * base + enc_long.input_ids[base:]
    assert len(enc_short.input_ids) <= budget and enc_short.input_ids[-1] == eos
    st.encode(longest)
    assert st.truncated_targets == 2


def test_budget_too_small_for_any_target_is_a_one_line_error(qwen_tokenizer, example_splits):
    with pytest.raises(dl.ReviewDataError) as info:
        SampleTokenizer(qwen_tokenizer, 8).encode(example_splits["val"][0])
    assert "\n" not in str(info.value) and "max_length" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Assembled ids == plain tokenization, real Qwen vocabulary
# --------------------------------------------------------------------------------------------------------------
def assert_ids_equal_plain_tokenization(tok, encs, max_length) -> None:
    eos = tok.eos_token_id
    prompts = tok([e.prompt for e in encs], add_special_tokens=False).input_ids
    fulls = tok([e.prompt + e.sample.target.text for e in encs], add_special_tokens=False).input_ids
    bad = []
    for e, prompt_ids, full_ids in zip(encs, prompts, fulls, strict=True):
        ok = e.prompt_length == len(prompt_ids) and e.input_ids[:e.prompt_length] == prompt_ids
        if e.target_truncated:
            ok = ok and len(e.input_ids) == max_length and e.input_ids[-1] == eos \
                and e.input_ids[:-1] == full_ids[:len(e.input_ids) - 1]
        else:
            ok = ok and e.input_ids == full_ids + [eos]
        if not ok:
            bad.append((e.sample.user.name, e.sample.target.record_index))
    assert not bad, f"{len(bad)} of {len(encs)} samples differ, e.g. (user, record): {bad[:5]}"


def _data_file(name: str, example_data_file: Path, douban_dmr_dir_getter) -> Path:
    return example_data_file if name == "example" else douban_dmr_dir_getter() / name


@pytest.mark.parametrize("name", ["example", *REAL_FILES])
@pytest.mark.parametrize(("use_profile", "use_history"), ABLATIONS)
def test_assembled_ids_equal_plain_qwen_tokenization(request, qwen_tokenizer, example_data_file, name,
                                                     use_profile, use_history):
    path = _data_file(name, example_data_file, lambda: request.getfixturevalue("douban_dmr_dir"))
    samples = all_samples(dl.split_chronologically(dl.load_review_file(str(path))))
    builder = dl.PromptBuilder(use_profile, use_history)
    for max_length in (None, 300, 100):
        st = SampleTokenizer(qwen_tokenizer, max_length, builder)
        encs = st.encode_split(samples)
        assert all(e.sample is s for e, s in zip(encs, samples, strict=True))
        if max_length is not None:
            assert max(len(e.input_ids) for e in encs) <= max_length
        assert_ids_equal_plain_tokenization(qwen_tokenizer, encs, max_length)
        assert all(("历史影评记录" in e.prompt) == (use_history and e.history_count > 0) for e in encs)
        assert all(e.prompt.startswith("用户: ") == use_profile for e in encs)


# --------------------------------------------------------------------------------------------------------------
# sample_record
# --------------------------------------------------------------------------------------------------------------
def test_sample_record_fields(qwen_tokenizer, example_splits, example_records):
    samples = all_samples(example_splits)
    encs = SampleTokenizer(qwen_tokenizer, 250).encode_split(samples)
    assert any(e.history_count < e.sample.position for e in encs)  # the budget cut some history
    for enc in encs:
        record = json.loads(json.dumps(dl.sample_record(enc), ensure_ascii=False))
        s = enc.sample
        assert record["prompt"] == enc.prompt
        assert record["reference"] == s.target.text == example_records[s.position]["continuation"].strip()
        assert "earlier_reviews" not in record and record["position"] == s.position  # the history is stored once
        assert record["history_count"] == enc.history_count
        assert record["prompt_tokens"] == enc.prompt_length
        assert record["split"] == s.split and record["user"] == "Y" and record["user_index"] == 0
        assert record["record_index"] == s.position
        assert record["movie"] == s.target.movie
        assert record["timestamp"] == example_records[s.position]["timestamp"]
        assert record["target_truncated"] is False


def test_test_histories_store_each_users_earlier_reviews_once(example_splits, example_records):
    test = example_splits["test"]
    histories = json.loads(json.dumps(dl.test_histories(test), ensure_ascii=False))
    assert histories["format"] == dl.TEST_HISTORIES_FORMAT and len(histories["users"]) == 1
    user = histories["users"][0]
    assert (user["user_index"], user["user"], user["test_start"]) == (0, "Y", test[0].position)
    texts = [r["continuation"].strip() for r in example_records]
    assert user["reviews"] == texts[:test[-1].position]  # up to (not including) the last test review
    for s in test:  # every test sample's earlier reviews, and nothing of its own review
        assert user["reviews"][:s.position] == texts[:s.position]
    assert user["reviews"][:user["test_start"]] == texts[:len(example_splits["train"]) + len(example_splits["val"])]


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _example_ranges(example_records) -> dict:
    stamps = sorted(r["timestamp"] for r in example_records)
    return {"train": stamps[0:19], "val": stamps[19:23], "test": stamps[23:28]}


@pytest.mark.slow
def test_cli_text_report_for_example(example_data_file, example_records):
    result = run_cli(example_data_file)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    for name, count in [("train", 19), ("val", 4), ("test", 5)]:
        stamps = _example_ranges(example_records)[name]
        assert re.search(rf"^\s*{name}\s+{count} 条\s+{stamps[0]} ~ {stamps[-1]}$", out, re.M), out
    assert "2010-08-22 ~ 2015-12-27" in out
    assert "历史影评记录 (19条):" in out and "请为电影《美人鱼》写一条影评：" in out
    assert "功夫之后再无周星驰。" in out


@pytest.mark.slow
def test_cli_json_report_for_example(example_data_file, example_records, golden_prompt):
    result = run_cli(example_data_file, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    ranges = _example_ranges(example_records)
    assert {n: report["splits"][n]["samples"] for n in dl.SPLITS} == {"train": 19, "val": 4, "test": 5}
    assert {n: report["splits"][n]["time_range"] for n in dl.SPLITS} == \
        {n: [ranges[n][0], ranges[n][-1]] for n in dl.SPLITS}
    assert report["users"] == 1 and report["reviews"] == 28 and report["samples"] == 28
    assert report["warnings"] == []
    assert report["example"]["prompt"] == golden_prompt
    assert report["example"]["target"] == "功夫之后再无周星驰。"


@pytest.mark.slow
def test_cli_no_history_and_no_profile(example_data_file):
    plain = run_cli(example_data_file)
    no_history = run_cli(example_data_file, "--no_history")
    no_profile = run_cli(example_data_file, "--no_profile", "--json")
    assert plain.returncode == no_history.returncode == no_profile.returncode == 0
    assert "历史影评记录" in plain.stdout
    assert "历史影评记录" not in no_history.stdout and "请为电影《美人鱼》写一条影评：" in no_history.stdout
    prompt = json.loads(no_profile.stdout)["example"]["prompt"]
    assert prompt.startswith(f"任务: {TASK}\n\n历史影评记录 (19条):\n")


@pytest.mark.slow
def test_cli_small_file_warns_about_empty_val_split(tmp_path):
    path = write_json(tmp_path / "two.json", [user_entry("U", [review("一", "甲", "2015-01-01"),
                                                               review("二", "乙", "2015-02-01")])])
    result = run_cli(path)
    assert result.returncode == 0, result.stderr
    assert "警告: the val split is empty" in result.stdout


@pytest.mark.slow
def test_cli_does_not_import_torch_or_transformers(example_data_file):
    code = (
        "import io, sys, runpy, contextlib\n"
        f"sys.argv = ['data_loader_movie_review.py', {str(example_data_file)!r}]\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        runpy.run_path({str(MODULE_PATH)!r}, run_name='__main__')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "assert '19 条' in out.getvalue()\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "HEAVY []"


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


def test_time_range_matches_a_stable_sort(tmp_path):
    # Equal times written differently: the earliest is the first such sample, the latest the last one.
    records = [review("a", "甲", "2015-01-02"), review("b", "乙", "2015-01-01 00:00"),
               review("c", "丙", "2015-01-01"), review("d", "丁", "2015-01-02T00:00")]
    data = load_obj(tmp_path, [user_entry("U", records)])
    samples = dl.split_chronologically(data, 1.0, 0.0, 0.0)["train"]
    by_sort = sorted(samples, key=lambda s: s.target.time)
    assert data_report._time_range(samples) == [by_sort[0].target.timestamp, by_sort[-1].target.timestamp] \
        == ["2015-01-01 00:00", "2015-01-02T00:00"]
    assert data_report._time_range(list(reversed(samples))) == ["2015-01-01", "2015-01-02"]


@pytest.mark.parametrize(("use_profile", "use_history"), [(True, True), (False, True), (True, False)])
def test_render_with_the_users_history_lines_is_the_same_text(example_splits, use_profile, use_history):
    builder = dl.PromptBuilder(use_profile, use_history)
    for s in all_samples(example_splits):
        lines = builder.history_lines(s.user)
        for count in {None, 0, 1, s.position // 2, s.position}:
            assert builder.render(s, count, lines) == builder.render(s, count)
