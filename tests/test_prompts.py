"""Tests for data_loader_movie_review's prompts and report: the spec's golden prompt (模型输入格式), ablations,
the history block, folding, movie names, sample_record and test_histories, and the CLI report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import data_loader_movie_review as dl
from review_lm.data import report as data_report
from tests.eager_encoder import SampleTokenizer
from tests.helpers import (
    MODULE_PATH,
    TASK,
    all_samples,
    expected_history_lines,
    history_lines_in,
    ids,
    load_obj,
    review,
    run_cli,
    user_entry,
    write_json,
)
from tests.helpers import REPO as REPO_ROOT


# --------------------------------------------------------------------------------------------------------------
# Fixtures local to this file
# --------------------------------------------------------------------------------------------------------------
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
# Report time ranges; rendering with the user's history lines
# --------------------------------------------------------------------------------------------------------------
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
