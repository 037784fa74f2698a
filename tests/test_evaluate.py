"""Tests for evaluate_movie_review.py: baselines, generation with a tiny model, CLI errors, and the bootstrap
intervals in metrics.json (metrics by hand: test_metrics.py; --compare: test_compare.py).

The tiny model (random Qwen2 + byte-level BPE, from tools/make_tiny_model.py) and its test_samples.json (built
with the real data loader from a small review file written here) are made once per module. Exit-code cases run
the CLI in a subprocess; everything else calls the functions directly to stay fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate_movie_review as ev
from review_lm.evaluation import metrics
from review_lm.evaluation import metrics as review_metrics
from review_lm.evaluation.style_report import SYSTEM_KEYS
from review_lm.inference import generation
from review_lm.inference import model_loading as ml
from review_lm.runs import test_set

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "evaluate_movie_review.py")


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------
def _user(name: str, reviews: list[tuple[str, str, str]]) -> dict:
    return {
        "user": {"profile": {"name": name}},
        "task": {
            "description": "基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式",
            "task_behavior_collections": [{
                "type": "movie_review", "type_desc": "豆瓣影评数据",
                "data": [{"context": [], "continuation": text, "continuation_prefix": f"{movie}: ", "timestamp": day}
                         for movie, day, text in reviews],
            }],
        },
    }


# 12 + 3 + 1 reviews. Chronological 70/15/15 split: 甲 8/1/3, 乙 2/0/1, 丙 0/0/1 -> 5 test samples; 丙's only
# review is a test sample with no earlier review at all.
REVIEWS = [
    _user("甲", [
        ("钢铁侠", "2010-01-03", "boring"),
        ("盗梦空间", "2010-02-14", "看完出门转了一下钥匙扣，确认自己不在梦里。Nolan你赢了。"),
        ("让子弹飞", "2010-03-21", "站着，还把钱挣了。台词密度高到要二刷。"),
        ("观音山", "2010-05-02", "铁轨那几场很美，就是后半段太闷。"),
        ("海洋", "2010-06-12", "拍了十年的海，看得我想去潜水。"),
        ("源代码", "2010-08-08", "八分钟循环，最后那个定格太温柔了。"),
        ("桃姐", "2010-09-30", "刘德华和叶德娴，一个眼神就够了。"),
        ("失恋33天", "2010-11-11", "光棍节看这个，自虐。"),
        ("少年派", "2011-01-01", "老虎到底存不存在？我选择相信有。"),
        ("泰囧", "2011-02-10", "笑完就忘，但确实笑了。"),
        ("地心引力", "2011-03-15", "IMAX必须的，太空里的安静最吓人。"),
        ("星际穿越", "2011-04-20", "爱是唯一可以穿越时空的东西，哭成狗。"),
    ]),
    _user("乙", [
        ("大话西游", "2012-01-01", "曾经有一份真挚的感情摆在我面前。"),
        ("霸王别姬", "2012-02-02", "不疯魔不成活。"),
        ("活着", "2012-03-03", "福贵一家，看得人喘不过气。"),
    ]),
    _user("丙", [("寄生虫", "2019-06-01", "楼梯上上下下，阶级一目了然。")]),
]


@pytest.fixture(scope="module")
def review_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.json"
    path.write_text(json.dumps(REVIEWS, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, review_file) -> Path:
    """A folder laid out like a training run: tiny model + tokenizer + test_samples.json and test_histories.json
    written by the run folder's own writers from the real loader and dataset."""
    from transformers import AutoTokenizer

    import data_loader_movie_review as dl
    from review_lm.data import datasets as rd
    from review_lm.runs import run_folder as rf
    from review_lm.testing.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("tiny_run")
    make_tiny_model(str(out), tokenizer_kind="bpe", corpus=[str(review_file)], vocab_size=500)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    splits = dl.split_chronologically(dl.load_review_file(str(review_file)))
    test = rd.build_datasets({"test": splits["test"]}, tokenizer, 512, dl.PromptBuilder())["test"]
    test_set.write_test_samples(str(out / rf.TEST_SAMPLES), test.encoded_samples())
    test_set.write_test_histories(str(out / rf.TEST_HISTORIES), splits["test"])
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run, so a test may write into its eval/ folder."""
    return Path(shutil.copytree(tiny_run, tmp_path / "exp_tiny"))


@pytest.fixture(scope="module")
def test_samples(tiny_run) -> list[dict]:
    """The run's test samples, each with its earlier reviews as evaluation reads them (SampleSet)."""
    from review_lm.runs import run_folder as rf

    test = test_set.load_test_samples(str(tiny_run / rf.TEST_SAMPLES))
    return [{**s, "earlier_reviews": test.earlier_reviews(i)} for i, s in enumerate(test.samples)]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd or REPO)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def evaluate_in_process(*args: str) -> int:
    return ev.main([*args, "--no_progress"])


# --------------------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------------------
def test_last_baseline_copies_the_most_recent_earlier_review(test_samples):
    outputs = metrics.baseline_last([s["earlier_reviews"] for s in test_samples])
    assert len(outputs) == len(test_samples) == 5
    for sample, output in zip(test_samples, outputs, strict=True):
        assert output == (sample["earlier_reviews"][-1] if sample["earlier_reviews"] else "")
    no_history = [o for s, o in zip(test_samples, outputs, strict=True) if not s["earlier_reviews"]]
    assert no_history == [""]  # 丙's only review


def test_random_baseline_is_an_earlier_review_and_reproducible(test_samples):
    earlier = [s["earlier_reviews"] for s in test_samples]
    outputs = metrics.baseline_random(earlier, seed=3)
    for sample, output in zip(test_samples, outputs, strict=True):
        assert output in sample["earlier_reviews"] if sample["earlier_reviews"] else output == ""
    assert metrics.baseline_random(earlier, seed=3) == outputs
    many = [[str(i) for i in range(50)]] * 20
    assert metrics.baseline_random(many, seed=1) != metrics.baseline_random(many, seed=2)


def test_baselines_never_read_the_reference():
    # Baselines see only each sample's earlier reviews, never a reference.
    samples = [["旧的一条", "最近的一条"], []]
    assert metrics.compute_baselines(samples, seed=0)["last"] == ["最近的一条", ""]
    assert metrics.compute_baselines(samples, seed=0)["random"][1] == ""


# --------------------------------------------------------------------------------------------------------------
# Generation with the tiny model
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluation_writes_one_prediction_per_sample_into_model_dir_eval(run_copy, test_samples):
    assert evaluate_in_process("--model_dir", str(run_copy), "--max_new_tokens", "5") == 0
    eval_dir = run_copy / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == [  # no tmp, no partial file
        "metrics.json", "predictions.jsonl", "sample_scores.npz", "style.png"]
    rows = read_jsonl(eval_dir / "predictions.jsonl")
    assert len(rows) == len(test_samples)
    for row, sample in zip(rows, test_samples, strict=True):
        assert (row["movie"], row["timestamp"], row["reference"]) == (
            sample["movie"], sample["timestamp"], sample["reference"])
        assert isinstance(row["prediction"], str)
        assert 0 <= row["prediction_tokens"] <= 5
        assert row["baseline_last"] == (sample["earlier_reviews"][-1] if sample["earlier_reviews"] else "")
    # A random model rarely says EOS within 5 tokens: the cap is what stopped it.
    assert max(r["prediction_tokens"] for r in rows) == 5
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_samples"] == 5
    assert set(metrics["model"]) == set(metrics["baselines"]["last"]) == {
        *(k for k, _ in review_metrics.METRICS), *SYSTEM_KEYS}
    assert set(metrics["baselines"]) == {"last", "random"}
    assert metrics["generation"]["generation_config"]["max_new_tokens"] == 5
    assert metrics["generation"]["generation_config"]["do_sample"] is False
    assert metrics["model_dir"] == str(run_copy.resolve())
    assert metrics["test_file"] == str((run_copy / "test_samples.json").resolve())


@pytest.mark.slow
def test_greedy_generation_is_deterministic_and_independent_of_batching(tiny_run, tmp_path):
    common = ("--model_dir", str(tiny_run), "--max_new_tokens", "6")
    for name, batch in (("a", "8"), ("b", "8"), ("c", "1")):
        assert evaluate_in_process(*common, "--batch_size", batch, "--output_dir", str(tmp_path / name)) == 0
    first = (tmp_path / "a" / "predictions.jsonl").read_bytes()
    assert (tmp_path / "b" / "predictions.jsonl").read_bytes() == first
    # Batch of 8 (left-padded, prompts of different lengths) == one by one: the padding side is right.
    assert (tmp_path / "c" / "predictions.jsonl").read_bytes() == first


@pytest.mark.slow
def test_sampling_is_reproducible_with_its_seed(tiny_run, tmp_path):
    common = ("--model_dir", str(tiny_run), "--max_new_tokens", "6", "--do_sample", "--temperature", "1.5")
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert evaluate_in_process(*common, "--seed", seed, "--output_dir", str(tmp_path / name)) == 0
    runs = {name: (tmp_path / name / "predictions.jsonl").read_text(encoding="utf-8") for name in "abc"}
    assert runs["a"] == runs["b"] != runs["c"]
    settings = json.loads((tmp_path / "a" / "metrics.json").read_text(encoding="utf-8"))["generation"]
    assert {k: settings["generation_config"][k] for k in ("do_sample", "temperature", "top_p", "top_k")} == {
        "do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": 0}


def test_device_and_dtype_choice():
    assert ml.resolve_device_dtype("auto", "auto", cuda_available=False, bf16_supported=False) == ("cpu", "fp32")
    assert ml.resolve_device_dtype("auto", "auto", cuda_available=True, bf16_supported=True) == ("cuda", "bf16")
    assert ml.resolve_device_dtype("auto", "auto", cuda_available=True, bf16_supported=False) == ("cuda", "fp32")
    assert ml.resolve_device_dtype("cpu", "auto", cuda_available=True, bf16_supported=True) == ("cpu", "fp32")
    assert ml.resolve_device_dtype("cuda:1", "fp16", cuda_available=True, bf16_supported=True) == ("cuda:1", "fp16")


def test_greedy_settings_do_not_carry_sampling_knobs():
    greedy = generation.generation_config_kwargs(generation.GenerationSettings(), eos_id=7, pad_id=7)
    assert greedy["do_sample"] is False and greedy["use_cache"] is True and greedy["eos_token_id"] == 7
    assert not {"temperature", "top_p", "top_k"} & set(greedy)


@pytest.mark.slow
def test_each_prediction_belongs_to_its_own_prompt(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A random tied-embedding model repeats the prompt's last token, so these prompts (different lengths, so
    # batches are padded and sorted) give different predictions: a mix-up between samples would show.
    prompts = ["boring", "看完出门转了一下钥匙扣，确认自己不在梦里。Nolan你赢了", "IMAX",
               "站着，还把钱挣了。台词密度 2010"]
    test_file = tmp_path / "prompts.json"
    test_file.write_text(json.dumps([{"prompt": p, "reference": "好看", "earlier_reviews": []} for p in prompts],
                                    ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    assert evaluate_in_process("--model_dir", str(tiny_run), "--test_file", str(test_file), "--output_dir", str(out),
                               "--batch_size", "3", "--max_new_tokens", "4") == 0
    predictions = [r["prediction"] for r in read_jsonl(out / "predictions.jsonl")]

    # Expected: plain transformers, one unpadded prompt at a time.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_run))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_run))
    expected = []
    for prompt in prompts:
        enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        new = model.generate(**enc, max_new_tokens=4, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        expected.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    assert predictions == expected
    assert len(set(expected)) == len(prompts)


@pytest.mark.slow
def test_model_that_stops_at_once_gives_empty_predictions(tiny_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Zero final-norm weights -> all logits 0 -> greedy picks id 0, which is EOS in the tiny BPE vocabulary.
    model_dir = tmp_path / "mute"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_run))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_run))
    assert tokenizer.eos_token_id == 0
    tokenizer.save_pretrained(str(model_dir))
    shutil.copy(tiny_run / "test_samples.json", model_dir)

    assert evaluate_in_process("--model_dir", str(model_dir)) == 0
    rows = read_jsonl(model_dir / "eval" / "predictions.jsonl")
    assert [(r["prediction"], r["prediction_tokens"], r["hit_max_new_tokens"]) for r in rows] == [("", 0, False)] * 5
    metrics = json.loads((model_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] == {key: 0.0 for key, _ in review_metrics.METRICS}  # no histories: no style numbers
    assert metrics["empty_outputs"]["model"] == 5


@pytest.mark.slow
def test_refuses_to_overwrite_metrics(run_copy):
    assert evaluate_in_process("--model_dir", str(run_copy), "--baselines_only") == 0
    metrics_file = run_copy / "eval" / "metrics.json"
    before = metrics_file.read_bytes()
    result = run_cli("--model_dir", str(run_copy), "--max_new_tokens", "3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {metrics_file}: already exists; "
                                                  "pass --overwrite to replace it"]
    assert metrics_file.read_bytes() == before
    result = run_cli("--model_dir", str(run_copy), "--baselines_only", "--seed", "7", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads(metrics_file.read_text(encoding="utf-8"))["baseline_settings"]["seed"] == 7


@pytest.mark.slow
def test_baselines_only_needs_no_model_and_no_torch(tiny_run, tmp_path):
    run = tmp_path / "no_model"
    run.mkdir()
    shutil.copy(tiny_run / "test_samples.json", run)
    shutil.copy(tiny_run / "test_histories.json", run)
    code = ("import sys, evaluate_movie_review as ev; "
            f"rc = ev.main(['--model_dir', {str(run)!r}, '--baselines_only']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "| baseline: last |" in result.stdout and "| model |" not in result.stdout
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] is None and metrics["generation"] is None
    assert "prediction" not in read_jsonl(run / "eval" / "predictions.jsonl")[0]


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written
# --------------------------------------------------------------------------------------------------------------
def _fake_run(tmp_path: Path, test_samples: object | None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}", encoding="utf-8")  # the checks happen before any model loading
    if test_samples is not None:
        text = test_samples if isinstance(test_samples, str) else json.dumps(test_samples, ensure_ascii=False)
        (run / "test_samples.json").write_text(text, encoding="utf-8")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("case, content, message", [
    ("missing model_dir", None, "model folder not found"),
    ("no config.json", [{"prompt": "p", "reference": "r"}], "no config.json, not a model folder"),
    ("missing test file", None, "test_samples.json: file not found"),
    ("empty test set", [], "the test set is empty"),
    ("raw review data", REVIEWS, "sample #0 has no 'prompt' string"),
    ("not a list", {"prompt": "p", "reference": "r"}, "not a list of test samples"),
    ("reference not a string", [{"prompt": "p", "reference": 3}], "sample #0 has no 'reference' string"),
    ("invalid JSON", "[{", "invalid JSON at line 1"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, case, content, message):
    run = tmp_path / "does_not_exist" if case == "missing model_dir" else _fake_run(tmp_path, content)
    if case == "no config.json":
        (run / "config.json").unlink()
    result = run_cli("--model_dir", str(run))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (run / "eval").exists()


@pytest.mark.slow
def test_unloadable_model_exits_2_with_one_line(tmp_path):
    run = _fake_run(tmp_path, [{"prompt": "p", "reference": "r", "earlier_reviews": []}])  # config.json is "{}"
    result = run_cli("--model_dir", str(run))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run}: cannot load the model/tokenizer: ")
    assert not (run / "eval").exists()


@pytest.mark.slow
def test_baselines_only_without_earlier_reviews_exits_2(tmp_path):
    run = _fake_run(tmp_path, [{"prompt": "p", "reference": "r"}])
    result = run_cli("--model_dir", str(run), "--baselines_only")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {run / 'test_samples.json'}: samples have no earlier reviews (no 'earlier_reviews' and no "
        "test_histories.json beside it), so there are no baselines to compute"]
    assert not (run / "eval").exists()


@pytest.mark.slow
def test_compare_dir_without_metrics_exits_2(tmp_path):
    (tmp_path / "run").mkdir()
    result = run_cli("--compare", str(tmp_path / "run"), "--compare_out", str(tmp_path / "c.png"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run'}: no metrics.json here or in {tmp_path / 'run' / 'eval'} "
        "(run evaluate_movie_review.py --model_dir on it first)"]
    assert not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------------------------------------------
# Confidence intervals (review_lm.evaluation.bootstrap) in metrics.json, the tables and --compare
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_intervals_in_metrics_and_paired_compare(tiny_run, tmp_path, capsys):
    common = ("--model_dir", str(tiny_run), "--bootstrap", "300")
    assert evaluate_in_process(*common, "--max_new_tokens", "6", "--output_dir", str(tmp_path / "a" / "eval")) == 0
    assert evaluate_in_process(*common, "--max_new_tokens", "2", "--output_dir", str(tmp_path / "b" / "eval")) == 0
    capsys.readouterr()
    found = json.loads((tmp_path / "a" / "eval" / "metrics.json").read_text(encoding="utf-8"))
    section = found["intervals"]
    assert section["resamples"] == 300 and section["seed"] == 42 and "percentile bootstrap" in section["method"]
    assert "users, then" in section["method"]  # three users in the tiny run: users are resampled first
    for system, scores in (("model", found["model"]), *(("last", found["baselines"]["last"]),)):
        ci = section["model"] if system == "model" else section["baselines"][system]
        assert set(ci) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "avg_length",
                           "attribution", "copy_rate", "style_distance"}
        for key, (low, high) in ci.items():
            assert low <= scores[key] <= high, (system, key)

    png = tmp_path / "c.png"
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert ev.main(["--compare", a, a, b, "--compare_out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "±" in out.split("\n\n")[0]
    diff = out.split("difference to a (paired 95% bootstrap")[1].splitlines()
    self_row = next(line for line in diff if line.startswith("| a (2) |"))
    cells = [c.strip() for c in self_row.strip("|").split("|")][1:]
    assert cells and all(c in ("+0.00 [0.00, 0.00]", "+0.0 [0.0, 0.0]", "+0.000 [0.000, 0.000]") for c in cells)
    assert any(line.startswith("| b |") for line in diff)
    assert png.is_file()
