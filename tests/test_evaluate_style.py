"""Evaluation's style metrics (attribution, stylometry, copying), --predictions and --style_pool, on real users.

Test sets are written from the real douban_dmr users with the data loader's chronological split
(``review_lm.testing.synthetic.write_test_set``: no model needed); "predictions" are real reviews whose answer is known:
the real test reviews themselves, or a stranger's reviews. Evaluation runs in-process (``ev.main``); the cases
that need a fresh interpreter (exit code, no torch) run the CLI in a subprocess and are marked slow.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import data_loader_movie_review as dl
import evaluate_movie_review as ev
from review_lm.evaluation import style
from review_lm.evaluation.style_report import SYSTEM_KEYS
from review_lm.runs.test_set import load_test_samples
from review_lm.testing.synthetic import write_test_set
from tests.helpers import one_line_error, write_reviews

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "evaluate_movie_review.py")


# --------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------------------
def make_test_set(data, folder: Path) -> str:
    return write_test_set(dl.split_chronologically(dl.load_review_data(data))["test"], str(folder))


@pytest.fixture(scope="module")
def real_test_file(douban_dmr_dir, tmp_path_factory) -> str:
    """The 6 real users' test split: 48 samples."""
    return make_test_set([str(douban_dmr_dir)], tmp_path_factory.mktemp("real"))


def write_predictions(path: Path, predictions: list[str], test_file: str | None = None) -> str:
    samples = load_test_samples(test_file).samples if test_file else [{}] * len(predictions)
    lines = [json.dumps({"index": i, **{k: s[k] for k in ("user_index", "record_index") if k in s},
                         "prediction": p}, ensure_ascii=False) for i, (s, p) in enumerate(zip(samples, predictions,
                                                                                                strict=True))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def strangers(test_file: str, seed: int) -> list[str]:
    """Each test review replaced by a random review, from before the test split, of another user."""
    test = load_test_samples(test_file)
    before = test.reviews_before_test()
    rng = random.Random(seed)
    return [rng.choice([t for k, texts in before.items() if k != s["user_index"] for t in texts])
            for s in test.samples]


def evaluate(test_file: str, predictions: str, out: Path, *extra: str) -> dict:
    assert ev.main(["--test_file", test_file, "--predictions", predictions, "--output_dir", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def real_eval(real_test_file, tmp_path_factory):
    """The real test reviews given as --predictions: (metrics, stdout, output folder)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("real_eval")
    refs = load_test_samples(real_test_file).references
    predictions = write_predictions(folder / "real.jsonl", refs, real_test_file)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        metrics = evaluate(real_test_file, predictions, folder / "out")
    return metrics, buffer.getvalue(), folder / "out"


# --------------------------------------------------------------------------------------------------------------
# The answers we know, on real users
# --------------------------------------------------------------------------------------------------------------
def test_real_test_reviews_as_predictions(real_eval):
    metrics, _, _ = real_eval
    model, chance = metrics["model"], metrics["style"]["attribution_chance"]
    assert chance == pytest.approx(100 / 6)
    assert model["attribution"] >= 2 * chance
    assert model["attribution"] == metrics["references"]["attribution"] == metrics["style"]["attribution_ceiling"]
    assert model["copy_rate"] <= 10  # real reviews are not copies of the user's earlier ones
    assert model["style_distance"] == 0 and model["rougeL"] == pytest.approx(100)
    last = metrics["baselines"]["last"]
    assert last["copy_rate"] >= 90 and metrics["baselines"]["random"]["copy_rate"] >= 90
    assert last["style_distance"] > 0
    assert set(SYSTEM_KEYS) <= set(last) and set(SYSTEM_KEYS) <= set(model)


def test_strangers_reviews_score_at_most_chance(real_test_file, tmp_path):
    for seed in range(3):
        predictions = write_predictions(tmp_path / f"s{seed}.jsonl", strangers(real_test_file, seed), real_test_file)
        metrics = evaluate(real_test_file, predictions, tmp_path / f"out{seed}")
        assert metrics["model"]["attribution"] <= metrics["style"]["attribution_chance"]
        assert metrics["model"]["copy_rate"] <= 10  # someone else's text is no copy of this user's
        # ...while the overlap metrics barely notice (the point): ROUGE-L within a few points of the
        # real reviews' neighbours, the user's own earlier reviews (the random baseline).
        assert abs(metrics["model"]["rougeL"] - metrics["baselines"]["random"]["rougeL"]) < 5


def test_attribution_is_deterministic(real_test_file, real_eval, tmp_path):
    first, _, folder = real_eval
    second = evaluate(real_test_file, str(folder.parent / "real.jsonl"), tmp_path / "again")
    for key in ("model", "baselines", "references"):
        assert second[key] == first[key]
    drop = {"runtime_s"}
    assert {k: v for k, v in second["style"].items() if k not in drop} == {
        k: v for k, v in first["style"].items() if k not in drop}


def test_attribution_cannot_memorise_test_reviews(tmp_path):
    # 甲 writes Chinese before the test split and three near-identical English reviews in it; 乙 always writes
    # English. A classifier that saw any of 甲's test reviews (also the ones inside a later sample's earlier
    # reviews) would give the other two to 甲; trained only on reviews before the test split, it gives them to 乙.
    zh = ["看完出门转了一下钥匙扣，确认自己不在梦里。", "站着，还把钱挣了。台词密度高到要二刷。",
          "铁轨那几场很美，就是后半段太闷。", "八分钟循环，最后那个定格太温柔了。", "一个眼神就够了，演技炸裂。",
          "笑完就忘，但确实笑了。", "太空里的安静最吓人。", "光棍节看这个，自虐。", "老虎到底存不存在？我选择相信有。"]
    en = ["the plot was thin but the acting held it together", "slow first hour, great ending, would watch again",
          "too long and too loud, the score was the best part", "a quiet film about grief, very well acted",
          "fun popcorn movie, nothing more, nothing less", "the dialogue felt fake but the visuals were stunning",
          "overrated, i fell asleep twice during the middle act"]
    planted = ["zqx zqx planted review zqx, unlike anything before it zqx"] * 3
    users = [{**json.loads(Path(write_reviews(tmp_path / f"{n}.json", texts, n)).read_text())[0]}
             for n, texts in (("甲", [*zh, *planted]), ("乙", [*en, en[0] + " again", en[1] + " again", en[2]]))]
    data = tmp_path / "two.json"
    data.write_text(json.dumps(users, ensure_ascii=False), encoding="utf-8")
    test_file = make_test_set(str(data), tmp_path / "set")
    test = load_test_samples(test_file)
    jia = [i for i, s in enumerate(test.samples) if s["user"] == "甲"]
    assert [test.references[i] for i in jia] == planted and len(test.earlier_reviews(jia[-1])) == len(zh) + 2
    assert not set(planted) & {t for texts in test.reviews_before_test().values() for t in texts}

    metrics = evaluate(test_file, write_predictions(tmp_path / "p.jsonl", test.references, test_file), tmp_path / "o")
    rows = {r["user"]: r for r in metrics["style"]["per_user"]["model"]}
    assert rows["甲"]["attribution"] == 0 and rows["乙"]["attribution"] == 100

    # The check can fail: the same classifier given 甲's earlier reviews of every sample (test reviews
    # included) memorises the planted text.
    users_ = [s["user_index"] for s in test.samples]
    leaky = {u: max((test.earlier_reviews(i) for i in range(len(users_)) if users_[i] == u), key=len) for u in users_}
    evaluator = style.StyleEvaluator(users_, test.references, test.all_earlier_reviews(), leaky)
    assert {r["user"]: r["attribution"] for r in evaluator.per_user_rows(test.references)}[users_[jia[0]]] == 100


# --------------------------------------------------------------------------------------------------------------
# One user: attribution needs --style_pool
# --------------------------------------------------------------------------------------------------------------
def test_single_user_without_pool_skips_attribution_in_one_line(douban_dmr_dir, tmp_path, capsys):
    test_file = make_test_set(str(douban_dmr_dir / "user_3eeb2203.json"), tmp_path / "one")
    predictions = write_predictions(tmp_path / "p.jsonl", load_test_samples(test_file).references, test_file)
    capsys.readouterr()
    metrics = evaluate(test_file, predictions, tmp_path / "out")
    out = capsys.readouterr()
    said = [line for line in (out.out + out.err).splitlines() if "attribution" in line and "not measured" in line]
    assert len(said) == 1 and "--style_pool" in said[0] and "at least 2 candidate users" in said[0]
    assert metrics["model"]["attribution"] is None and metrics["style"]["attribution_chance"] is None
    assert metrics["style"]["attribution_skipped_reason"]
    assert metrics["model"]["copy_rate"] is not None and metrics["model"]["style_distance"] == 0
    assert metrics["model"]["bleu"] == pytest.approx(100) and metrics["baselines"]["last"]["copy_rate"] >= 90
    assert (tmp_path / "out" / "style.png").is_file()

    # With other users as a pool: measured, chance over 1 test user + 4 pool users. Giving the whole folder
    # (which holds the test user's own file) leaves the test user out of the pool.
    for pool, left_out in ((douban_dmr_dir / "multi_user_4.json", []), (douban_dmr_dir, ["一天到晚发呆"])):
        capsys.readouterr()
        metrics = evaluate(test_file, predictions, tmp_path / "pooled", "--style_pool", str(pool), "--overwrite")
        assert metrics["style"]["pool"]["left_out_as_test_users"] == left_out
        assert metrics["style"]["attribution_skipped_reason"] is None
        assert metrics["style"]["attribution_model"]["pool_classes"] == (5 if left_out else 4)  # + 演员新之助
        assert metrics["model"]["attribution"] >= 2 * metrics["style"]["attribution_chance"]
        assert "not measured" not in capsys.readouterr().out


def test_pool_sizes(douban_dmr_dir, tmp_path):
    test_file = make_test_set(str(douban_dmr_dir / "user_3eeb2203.json"), tmp_path / "one")
    predictions = write_predictions(tmp_path / "p.jsonl", strangers_of_pool(douban_dmr_dir, test_file), test_file)
    metrics = evaluate(test_file, predictions, tmp_path / "o", "--style_pool", str(douban_dmr_dir))
    model = metrics["style"]["attribution_model"]
    # 4 users of multi_user_4 + 演员新之助 (3 non-empty reviews); 一天到晚发呆 is the test user.
    assert (model["intended_classes"], model["pool_classes"]) == (1, 5)
    assert metrics["style"]["attribution_chance"] == pytest.approx(100 / 6)
    # Pool users' own reviews given as this user's: attributed to them, not to the test user.
    assert metrics["model"]["attribution"] <= 10


def strangers_of_pool(douban_dmr_dir: Path, test_file: str) -> list[str]:
    pool = dl.load_review_data(str(douban_dmr_dir / "multi_user_4.json"))
    texts = [r.text for u in pool.users for r in u.reviews]
    return [texts[i % len(texts)] for i in range(len(load_test_samples(test_file).samples))]


def test_bad_style_pool_is_one_line(real_test_file, tmp_path, capsys):
    predictions = write_predictions(tmp_path / "p.jsonl", load_test_samples(real_test_file).references,
                                    real_test_file)
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    for pool in (tmp_path / "missing.json", tmp_path / "bad.json"):
        capsys.readouterr()
        assert ev.main(["--test_file", real_test_file, "--predictions", predictions, "--output_dir",
                        str(tmp_path / "o"), "--style_pool", str(pool)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --style_pool: {pool}")
        assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------------
# --predictions: where results go, bad input, no torch
# --------------------------------------------------------------------------------------------------------------
def test_default_output_is_beside_the_predictions_file(real_test_file, tmp_path, capsys):
    refs = load_test_samples(real_test_file).references
    predictions = write_predictions(tmp_path / "other_system.jsonl", refs)  # no user/record index: fine
    assert ev.main(["--test_file", real_test_file, "--predictions", predictions]) == 0
    out = tmp_path / "other_system_eval"
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "predictions.jsonl", "sample_scores.npz", "style.png"]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["predictions_file"] == predictions and metrics["model_dir"] is None
    assert metrics["generation"] is None and metrics["training_arguments"] is None
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prediction"] for r in rows] == refs and "baseline_last" in rows[0]
    printed = capsys.readouterr().out
    assert "| predictions | 100.00 ±0.00 |" in printed and "| chance |" in printed
    assert "per user (predictions):" in printed and "| user | test samples | attribution |" in printed
    # Scoring a predictions.jsonl that evaluation wrote: its own folder would be overwritten, so refused.
    assert ev.main(["--test_file", real_test_file, "--predictions", str(out / "predictions.jsonl"),
                    "--output_dir", str(out), "--overwrite"]) == 2
    assert "would overwrite the predictions being scored" in capsys.readouterr().err


def test_per_user_table_and_figure(real_eval):
    metrics, printed, out = real_eval
    rows = metrics["style"]["per_user"]["model"]
    assert len(rows) == 6 and sum(r["test_samples"] for r in rows) == 48
    assert all(r["rougeL"] == pytest.approx(100) and r["style_distance"] == 0 for r in rows)
    assert [r["attribution"] for r in rows] == [r["attribution"] for r in metrics["style"]["per_user"]["references"]]
    assert set(metrics["style"]["per_user"]["baselines"]) == {"last", "random"}
    table = [line for line in printed.split("per user (predictions):")[1].splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6  # header + one line per user (the rule starts with "|---")
    assert metrics["style"]["figure"] == "style.png"
    png = (out / "style.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    features = metrics["style"]["style_features"]["baselines"]["last"]
    assert set(features) == set(style.FEATURE_NAMES)
    defined = metrics["metric_definitions"]
    assert {*SYSTEM_KEYS, "attribution_chance", "attribution_ceiling", "style_features", "bleu"} <= set(defined)


def test_compare_shows_style_columns_ceiling_and_chance(real_test_file, real_eval, tmp_path, capsys):
    _, _, real_out = real_eval
    stranger = tmp_path / "stranger"
    evaluate(real_test_file, write_predictions(tmp_path / "s.jsonl", strangers(real_test_file, 0)), stranger)
    capsys.readouterr()
    png = tmp_path / "c.png"
    assert ev.main(["--compare", str(real_out), str(stranger), "--compare_out", str(png)]) == 0
    lines = capsys.readouterr().out.split("\n\n")[0].splitlines()  # the scores table (then the differences)
    assert lines[0].endswith("| avg length | attribution | copy rate | style dist. |")
    # cells are "score ±half-width of its 95% interval": the scores alone here
    by_name = {line.split(" | ")[0][2:]: [c.split(" ±")[0] for c in line.split(" | ")] for line in lines
               if line.startswith("| ")}
    assert set(by_name) >= {"out", "stranger", "baseline: last", "reference", "chance"}
    assert by_name["chance"][9] == "16.7" and by_name["reference"][9] == by_name["out"][9]
    assert float(by_name["stranger"][9]) <= 16.7 and float(by_name["baseline: last"][10]) >= 90
    assert png.read_bytes()[:4] == b"\x89PNG"


BAD_PREDICTIONS = [
    ("empty file", [], "the file is empty"),
    ("missing index", "drop:3", "no prediction for 1 of 48 test samples (index 3)"),
    ("duplicate index", "dup:5", "line 49: duplicate index 5 (already on line 6)"),
    ("extra index", "extra", "line 49: index 48 is out of range (the test set has 48 samples: 0..47)"),
    ("prediction not a string", "type", "line 1: 'prediction' must be a string, got an integer"),
    ("wrong user", "user", "line 1: user_index 99 does not match test sample 0"),
    ("not JSON", "junk", "line 2: not JSON"),
]


def bad_predictions_file(path: Path, test_file: str, case) -> str:
    good = write_predictions(path, load_test_samples(test_file).references, test_file)
    lines = Path(good).read_text(encoding="utf-8").splitlines()
    if case == []:
        lines = []
    elif case.startswith("drop:"):
        del lines[int(case[5:])]
    elif case.startswith("dup:"):
        lines.append(lines[int(case[4:])])
    elif case == "extra":
        lines.append(json.dumps({"index": 48, "prediction": "多一条"}))
    elif case == "type":
        lines[0] = json.dumps({"index": 0, "prediction": 5})
    elif case == "user":
        lines[0] = json.dumps({**json.loads(lines[0]), "user_index": 99})
    elif case == "junk":
        lines[1] = "{not json"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case, change, message", BAD_PREDICTIONS, ids=[c for c, _, _ in BAD_PREDICTIONS])
def test_bad_predictions_are_one_line_and_write_nothing(real_test_file, tmp_path, capsys, case, change, message):
    predictions = bad_predictions_file(tmp_path / "p.jsonl", real_test_file, change)
    capsys.readouterr()
    assert ev.main(["--test_file", real_test_file, "--predictions", predictions]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {predictions}: {message}"), captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--model_dir", "{tmp}"], "--predictions scores a file of predictions, not a model: drop --model_dir"),
    (["--baselines_only"], "--baselines_only and --predictions exclude each other"),
    (["--no_test_file"], "--predictions needs --test_file"),
])
def test_ambiguous_predictions_arguments_are_refused(real_test_file, tmp_path, capsys, args, message):
    predictions = write_predictions(tmp_path / "p.jsonl", load_test_samples(real_test_file).references)
    argv = ["--predictions", predictions]
    if args != ["--no_test_file"]:
        argv += ["--test_file", real_test_file, *[a.format(tmp=tmp_path) for a in args]]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


@pytest.mark.slow
def test_predictions_cli_needs_no_torch_and_bad_input_exits_2(real_test_file, tmp_path):
    predictions = write_predictions(tmp_path / "p.jsonl", load_test_samples(real_test_file).references)
    code = ("import sys, evaluate_movie_review as ev; "
            f"rc = ev.main(['--test_file', {real_test_file!r}, '--predictions', {predictions!r}]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p_eval" / "metrics.json").is_file()

    bad = bad_predictions_file(tmp_path / "bad.jsonl", real_test_file, "dup:5")
    result = subprocess.run([sys.executable, SCRIPT, "--test_file", real_test_file, "--predictions", bad],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert one_line_error(result) == f"error: {bad}: line 49: duplicate index 5 (already on line 6)"
    assert not (tmp_path / "bad_eval").exists()
