"""review_lm.evaluation.style (attribution, stylometry, copying) and review_lm.evaluation.predictions (the
predictions file reader)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

import data_loader_movie_review as dl
from review_lm.evaluation import attribution, style, stylometry
from review_lm.evaluation.predictions import read_predictions
from review_lm.utils import UsageError


# --------------------------------------------------------------------------------------------------------------
# Real data: the 6 users of ../shared/data/douban_dmr, split 0.7 / 0.15 / 0.15
# --------------------------------------------------------------------------------------------------------------
class RealTest:
    def __init__(self, folder):
        data = dl.load_review_data(str(folder))
        splits = dl.split_chronologically(data, 0.7, 0.15, 0.15)
        self.test = splits["test"]
        self.users = [s.user.index for s in self.test]
        self.references = [s.target.text for s in self.test]
        self.earlier = [[r.text for r in s.history] for s in self.test]
        self.history: dict[int, list[str]] = {}  # train + val reviews per user, oldest first
        for s in splits["train"] + splits["val"]:
            self.history.setdefault(s.user.index, []).append(s.target.text)
        self.samples = [{"user_index": s.user.index, "record_index": s.target.record_index,
                         "earlier_reviews": e} for s, e in zip(self.test, self.earlier, strict=True)]


@pytest.fixture(scope="module")
def real(douban_dmr_dir):
    return RealTest(douban_dmr_dir)


@pytest.fixture(scope="module")
def evaluator(real):
    return style.StyleEvaluator(real.users, real.references, real.earlier, real.history, seed=0)


def stranger_outputs(real, seed=0):
    """Each test review replaced by a random train/val review of another user."""
    rng = random.Random(seed)
    return [rng.choice([t for k, texts in real.history.items() if k != u for t in texts]) for u in real.users]


def test_histories_before_test_are_the_train_and_val_reviews(real):
    derived = style.histories_before_test(real.users, real.earlier)
    assert derived == real.history
    assert not set(real.references) & {t for texts in derived.values() for t in texts} - {
        t for texts in real.history.values() for t in texts}


def test_real_references_reach_twice_chance(evaluator):
    summary = evaluator.summary()
    assert summary["attribution_skipped_reason"] is None
    assert summary["attribution_model"]["method"] == "linear_svc"
    assert summary["attribution_chance"] == pytest.approx(100 / 6)
    assert summary["attribution_samples"] == 48 and summary["attribution_excluded"] == 0
    assert summary["attribution_ceiling"] >= 2 * summary["attribution_chance"]


def test_nearest_centroid_path_also_separates_the_real_users(real):
    model = attribution.AttributionModel.fit(real.history, svc_max_classes=2)
    assert model.method == "nearest_centroid"
    report = attribution.attribution_report(model, real.references, real.users)
    assert report["attribution"] >= 2 * model.chance


def test_stranger_reviews_are_not_attributed_to_the_user(real, evaluator):
    for seed in range(3):
        scores = evaluator.score(stranger_outputs(real, seed))
        assert scores["attribution"] <= evaluator.summary()["attribution_chance"]


def test_copy_rates_of_baselines_and_references(real, evaluator):
    last = [e[-1] if e else "" for e in real.earlier]
    rng = random.Random(0)
    rand = [rng.choice(e) if e else "" for e in real.earlier]
    assert evaluator.score(last)["copy_rate"] >= 90
    assert evaluator.score(rand)["copy_rate"] >= 90
    assert evaluator.summary()["reference_copy_rate"] <= 10
    assert evaluator.score(real.references)["copy_rate"] == evaluator.summary()["reference_copy_rate"]


def test_classifier_never_sees_test_references(real, evaluator):
    planted = "ZQXJ瀑鲸"
    changed = [r + planted if i % 2 else planted for i, r in enumerate(real.references)]
    other = style.StyleEvaluator(real.users, changed, real.earlier, real.history, seed=0)
    vocabulary = evaluator.model.vectorizer.vocabulary_
    assert other.model.vectorizer.vocabulary_ == vocabulary
    assert not any(gram in vocabulary for gram in ("zqx", "qxj", "瀑鲸"))  # lowercased
    np.testing.assert_array_equal(other.model._classifier.coef_, evaluator.model._classifier.coef_)
    probe = real.references + stranger_outputs(real)
    assert other.model.predict(probe) == evaluator.model.predict(probe)
    # ... while the histories do shape it: plant the string in one user's history and it is learnt.
    history = {k: list(v) for k, v in real.history.items()}
    history[real.users[0]].append(planted)
    taught = attribution.AttributionModel.fit(history)
    assert "瀑鲸" in taught.vectorizer.vocabulary_


def test_two_runs_are_identical(real, evaluator):
    again = style.StyleEvaluator(real.users, real.references, real.earlier, real.history, seed=0)
    outputs = stranger_outputs(real)
    assert again.score(outputs) == evaluator.score(outputs)
    assert again.summary() == evaluator.summary()
    assert again.per_user_rows(outputs) == evaluator.per_user_rows(outputs)


def test_single_user_without_pool_is_skipped_with_a_reason(real):
    user = real.users[0]
    idx = [i for i, u in enumerate(real.users) if u == user]
    args = ([user] * len(idx), [real.references[i] for i in idx], [real.earlier[i] for i in idx])
    with pytest.raises(attribution.AttributionUnavailable, match="at least 2 candidate users"):
        attribution.AttributionModel.fit({user: real.history[user]})
    single = style.StyleEvaluator(*args, history_by_user={user: real.history[user]})
    assert single.model is None
    assert single.skipped_reason and "\n" not in single.skipped_reason
    assert single.summary()["attribution_skipped_reason"] == single.skipped_reason
    assert single.summary()["attribution_chance"] is None and single.summary()["attribution_ceiling"] is None
    scores = single.score(args[1])
    assert scores["attribution"] is None and scores["attribution_shuffled"] is None
    assert scores["style_distance"] == 0 and scores["copy_rate"] is not None
    # The same user with the other users' reviews as a negative-only pool: attribution is measured.
    pool = {f"pool-{k}": v for k, v in real.history.items() if k != user}
    pooled = style.StyleEvaluator(*args, history_by_user={user: real.history[user]}, pool_by_user=pool)
    assert pooled.model.pool == frozenset(pool) and pooled.model.intended == {user}
    assert pooled.summary()["attribution_chance"] == pytest.approx(100 / 6)
    assert 0 <= pooled.summary()["attribution_ceiling"] <= 100
    # A pool user's own review is attributed to the pool user: a miss for the intended user.
    stolen = [pool["pool-1"][0]] * len(idx)
    assert pooled.model.predict(stolen[:1]) == ["pool-1"]
    assert pooled.score(stolen)["attribution"] == 0


def test_pool_users_cannot_be_intended():
    with pytest.raises(ValueError, match="pool users must not be intended"):
        attribution.AttributionModel.fit({"a": ["好看"], "b": ["难看"]}, pool_by_user={"a": ["一般"]})
    model = attribution.AttributionModel.fit({"a": ["好看"]}, pool_by_user={"p": ["难看"]})
    with pytest.raises(ValueError, match="pool user"):
        attribution.attribution_report(model, ["好看"], ["p"])


SMALL = {"a": ["今天的电影真好看！！", "好看好看！", "  ", ""],
         "b": ["plot was boring, acting ok", "meh... not my thing", "\n"]}


def test_empty_texts_are_skipped_and_attributed_to_no_one():
    model = attribution.AttributionModel.fit(SMALL)
    assert model.train_texts == 4 and model.classes == ["a", "b"]
    assert model.predict(["好看！", "boring plot", "", "  \n"]) == ["a", "b", None, None]
    report = attribution.attribution_report(model, ["", "好看！"], ["a", "a"])
    assert report["attribution"] == 50.0
    # A user whose reviews are all empty is no class; its samples are excluded, not counted as misses.
    model = attribution.AttributionModel.fit({**SMALL, "c": ["", " "]})
    assert model.classes == ["a", "b"]
    report = attribution.attribution_report(model, ["好看！", "whatever"], ["a", "c"])
    assert report["attribution"] == 100.0 and report["attribution_excluded"] == 1


def test_shuffled_attribution_of_a_user_blind_system_equals_its_attribution(real, evaluator):
    # A system that writes the same text for everyone: permuting the intended users keeps their counts, so the
    # shuffled score must equal the real one exactly; a user-aware system is far above its shuffled score.
    constant = [real.history[4][0]] * len(real.users)
    blind = evaluator.score(constant)
    assert blind["attribution"] == pytest.approx(blind["attribution_shuffled"])
    assert blind["attribution"] == pytest.approx(100 * real.users.count(4) / len(real.users))
    own = evaluator.score([real.history[u][-1] for u in real.users])
    assert own["attribution"] == 100 and own["attribution_shuffled"] < 40
    assert evaluator.score(constant) == blind  # same permutations every call


# --------------------------------------------------------------------------------------------------------------
# Copying
# --------------------------------------------------------------------------------------------------------------
def plain_lcs(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for ca in a:
        current = [0]
        for j, cb in enumerate(b):
            current.append(previous[j] + 1 if ca == cb else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def plain_f1(a: str, b: str) -> float:
    a, b = "".join(a.split()), "".join(b.split())
    if not a or not b:
        return 0.0
    lcs = plain_lcs(a, b)
    precision, recall = lcs / len(a), lcs / len(b)
    return 0.0 if lcs == 0 else 2 * precision * recall / (precision + recall)


def test_rapidfuzz_lcs_equals_plain_dp_on_real_texts(real):
    texts = [t for texts in real.history.values() for t in texts]
    rng = random.Random(1)
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(300)]
    pairs += [(t, t + "，补一句") for t in texts[:20]] + [("好 看\n啊", "好看啊"), ("", "好看"), ("abc", "")]
    for a, b in pairs:
        assert style.char_rouge_l_f1(a, b) == pytest.approx(plain_f1(a, b), abs=1e-12), (a, b)
    outputs = [a for a, _ in pairs[:50]]
    earlier = [[b for _, b in pairs[k:k + 7]] for k in range(50)]
    expected = [max(plain_f1(o, e) for e in es) for o, es in zip(outputs, earlier, strict=True)]
    np.testing.assert_allclose(style.copy_overlaps(outputs, earlier), expected, atol=1e-12)


def test_copy_rules():
    earlier = ["这部电影真的很好看，推荐", "一般般"]
    outputs = ["这部 电影\n真的很好看，推荐", "这部电影真的很好看", "", "完全不同的文字内容", "任何"]
    overlaps = style.copy_overlaps(outputs, [earlier, earlier, earlier, earlier, ["", "  "]])
    assert overlaps[0] == 1.0  # whitespace ignored
    assert overlaps[1] == pytest.approx(2 * 9 / (9 + 12))  # 0.857: a near-copy
    assert overlaps[2] == 0.0 and overlaps[4] == 0.0  # empty output; only empty earlier reviews
    assert overlaps[3] < 0.8
    report = style.copy_report(outputs, [earlier] * 4 + [[]])
    assert report["copy_rate"] == pytest.approx(100 * 2 / 5)
    assert report["copy_overlap_mean"] == pytest.approx(100 * overlaps.mean())


# --------------------------------------------------------------------------------------------------------------
# Stylometry
# --------------------------------------------------------------------------------------------------------------
def test_features_of_hand_made_strings():
    f = stylometry.text_features("  太好看了！！真的？还行吧…… 2019年的ok片~  ")
    text = "太好看了！！真的？还行吧…… 2019年的ok片~"
    assert f["length"] == len(text) == 25
    assert f["sentences"] == 4  # 太好看了 / 真的 / 还行吧 / 2019年的ok片~
    per100 = 100 / 25
    assert f["excl_fullwidth_rate"] == pytest.approx(2 * per100)
    assert f["question_fullwidth_rate"] == pytest.approx(per100)
    assert f["ellipsis_fullwidth_rate"] == pytest.approx(2 * per100)
    assert f["tilde_ascii_rate"] == pytest.approx(per100) and f["tilde_fullwidth_rate"] == 0
    assert f["repeated_marks_rate"] == pytest.approx(per100)  # "！！" ("……" is the normal ellipsis)
    assert f["punct_rate"] == pytest.approx(6 * per100)  # ！！？……~
    assert f["fullwidth_punct_share"] == pytest.approx(5 / 6)
    assert f["latin_share"] == pytest.approx(2 / 25) and f["digit_share"] == pytest.approx(4 / 25)
    assert f["whitespace_rate"] == pytest.approx(per100) and f["emoji_rate"] == 0

    g = stylometry.text_features("What?! No way... 3.5 stars!!! 😂😂 ok～～")
    n = len("What?! No way... 3.5 stars!!! 😂😂 ok～～")
    assert g["question_ascii_rate"] == pytest.approx(100 / n)
    assert g["excl_ascii_rate"] == pytest.approx(400 / n)
    assert g["ellipsis_ascii_rate"] == pytest.approx(100 / n)  # "..." once; "3.5" is a decimal
    assert g["repeated_marks_rate"] == pytest.approx(300 / n)  # ?!  !!!  ～～
    assert g["emoji_rate"] == pytest.approx(200 / n)
    assert g["tilde_fullwidth_rate"] == pytest.approx(200 / n)
    assert g["sentences"] == 4  # What / No way / 3.5 stars / 😂😂 ok (the emoji run alone is no sentence)
    assert g["fullwidth_punct_share"] == pytest.approx(2 / 11)  # ～～ of ?!...!!!.～～ (11 marks, "." in 3.5)

    empty = stylometry.text_features("   ")
    assert empty["length"] == 0 and empty["sentences"] == 0 and math.isnan(empty["fullwidth_punct_share"])
    assert math.isnan(stylometry.text_features("没有标点")["fullwidth_punct_share"])
    assert stylometry.text_features("没有标点")["sentences"] == 1


def test_style_distance_basics():
    refs = ["好看！！", "一般吧。", "太长了……不过还行", "ok", "不推荐"]
    users = ["a", "a", "b", "b", "b"]
    same = stylometry.style_distance(refs, refs, users)
    assert same["style_distance"] == 0
    assert all(v["distance"] == 0 for v in same["style_features"].values() if v["distance"] is not None)
    shouty = stylometry.style_distance(["好看！！！！！"] * 5, refs, users)
    assert shouty["style_distance"] > 0
    assert shouty["style_features"]["excl_fullwidth_rate"]["system_mean"] == pytest.approx(100 * 5 / 7)
    assert shouty["style_features"]["length"]["reference_mean"] == pytest.approx(np.mean([len(r) for r in refs]))
    # Where the references never vary (no '?' at all) the pooled std scales the term: finite, not a blow-up.
    questions = stylometry.style_distance(["真的吗?"] * 5, refs, users)["style_features"]["question_ascii_rate"]
    assert questions["reference_mean"] == 0 and 0 < questions["distance"] < 10
    # Undefined share (no punctuation in any output of user a) is left out, not NaN in the total.
    plain = stylometry.style_distance(["好看", "一般", "太长了", "ok", "不推荐"], refs, users)
    assert math.isfinite(plain["style_distance"])


def test_style_distance_same_user_closer_than_strangers(real):
    # Each user's test reviews vs (a) the user's own most recent train/val reviews, (b) the same number of recent
    # reviews of another user, for every cyclic assignment of strangers. Measured: own 0.126, strangers
    # 0.123-0.154 (mean 0.142): on these stylistically similar users the signal is weak, so compare the mean.
    keys = list(real.history)
    rank: dict[int, int] = {}
    position = []
    for u in real.users:
        position.append(rank.get(u, 0))
        rank[u] = position[-1] + 1

    def recent(user, k):
        texts = real.history[user]
        return texts[-1 - k % len(texts)]

    own = stylometry.style_distance([recent(u, k) for u, k in zip(real.users, position, strict=True)],
                               real.references, real.users)["style_distance"]
    strangers = []
    for shift in range(1, len(keys)):
        other = {k: keys[(i + shift) % len(keys)] for i, k in enumerate(keys)}
        texts = [recent(other[u], k) for u, k in zip(real.users, position, strict=True)]
        strangers.append(stylometry.style_distance(texts, real.references, real.users)["style_distance"])
    assert own > 0
    assert np.mean(strangers) > own


def test_per_user_rows_add_up(real, evaluator):
    outputs = stranger_outputs(real)[:20] + [real.history[u][-1] for u in real.users[20:]]
    rows = evaluator.per_user_rows(outputs)
    assert [r["user"] for r in rows] == list(dict.fromkeys(real.users))
    assert sum(r["test_samples"] for r in rows) == len(outputs)
    scores = evaluator.score(outputs)
    weighted = sum(r["attribution"] * r["test_samples"] for r in rows) / len(outputs)
    assert weighted == pytest.approx(scores["attribution"])
    assert sum(r["copy_rate"] * r["test_samples"] for r in rows) / len(outputs) == pytest.approx(scores["copy_rate"])
    assert sum(r["style_distance"] * r["test_samples"] for r in rows) / len(outputs) == pytest.approx(
        scores["style_distance"])
    labels, matrix = evaluator.confusion(outputs, top_n=3)
    assert len(labels) == 3 and matrix.shape == (3, 4)
    assert matrix.sum() == sum(real.users.count(u) for u in labels)


def test_plot_writes_a_png(real, evaluator, tmp_path):
    path = tmp_path / "style.png"
    evaluator.plot(str(path), {"last": [e[-1] for e in real.earlier], "stranger": stranger_outputs(real)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_definitions_cover_every_reported_number(evaluator):
    defined = style.definitions()
    reported = set(evaluator.score(evaluator.references)) | {
        k for k in evaluator.summary() if k.startswith("attribution_") and k not in (
            "attribution_model", "attribution_samples", "attribution_excluded")}
    assert reported <= set(defined)
    assert set(defined["style_features"]["features"]) == set(style.FEATURE_NAMES)
    json.dumps(defined)


# --------------------------------------------------------------------------------------------------------------
# Predictions file
# --------------------------------------------------------------------------------------------------------------
SAMPLES = [{"user_index": 0, "record_index": 5}, {"user_index": 0, "record_index": 6},
           {"user_index": 1, "record_index": 2}]


def write_lines(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8") for line in lines))
    return str(path)


def row(index, prediction="好看", **extra):
    return json.dumps({"index": index, "prediction": prediction, **extra}, ensure_ascii=False)


def test_read_predictions_in_sample_order(tmp_path):
    path = write_lines(tmp_path, [row(2, "c", user_index=1, record_index=2), "", row(0, "a", user_index=0),
                                  "   ", row(1, "b", record_index=6, reference="x") + "\r", ""])
    assert read_predictions(path, SAMPLES) == ["a", "b", "c"]
    bom = write_lines(tmp_path, [b"\xef\xbb\xbf" + row(0).encode(), row(1), row(2)], "bom.jsonl")
    assert read_predictions(bom, SAMPLES) == ["好看"] * 3
    other_field = write_lines(tmp_path, [json.dumps({"index": i, "baseline_last": str(i)}) for i in range(3)], "f")
    assert read_predictions(other_field, SAMPLES, field="baseline_last") == ["0", "1", "2"]


@pytest.mark.parametrize("lines, message", [
    ([], "the file is empty"),
    (["", "  "], "the file is empty"),
    ([row(0), "{not json", row(2)], r"line 2: not JSON"),
    ([row(0), "[1, 2]"], r"line 2: expected a JSON object, got a list"),
    (['"text"'], r"line 1: expected a JSON object, got a string"),
    ([json.dumps({"prediction": "x"})], r"line 1: missing 'index'"),
    ([json.dumps({"index": True, "prediction": "x"})], r"line 1: 'index' must be an integer, got a boolean"),
    ([json.dumps({"index": 1.0, "prediction": "x"})], r"line 1: 'index' must be an integer, got a number"),
    ([json.dumps({"index": "0", "prediction": "x"})], r"line 1: 'index' must be an integer, got a string"),
    ([json.dumps({"index": 0})], r"line 1: missing 'prediction'"),
    ([json.dumps({"index": 0, "prediction": None})], r"line 1: 'prediction' must be a string, got null"),
    ([json.dumps({"index": 0, "prediction": 3})], r"line 1: 'prediction' must be a string, got an integer"),
    ([row(0), row(3)], r"line 2: index 3 is out of range \(the test set has 3 samples: 0\.\.2\)"),
    ([row(-1)], r"line 1: index -1 is out of range"),
    ([row(0), "", row(0)], r"line 3: duplicate index 0 \(already on line 1\)"),
    ([row(1)], r"no prediction for 2 of 3 test samples \(index 0, 2\)"),
    ([row(0), row(1), row(2, user_index=0)], r"line 3: user_index 0 does not match test sample 2 \(user_index 1\)"),
    ([row(0, record_index=6)], r"line 1: record_index 6 does not match test sample 0 \(record_index 5\)"),
    ([row(0, user_index=True)], r"line 1: 'user_index' must be an integer, got a boolean"),
    ([row(0, record_index="5")], r"line 1: 'record_index' must be an integer, got a string"),
    ([row(0), b'{"index": 1, "prediction": "\xff"}'], r"line 2: not UTF-8 text"),
])
def test_read_predictions_errors(tmp_path, lines, message):
    path = write_lines(tmp_path, lines)
    with pytest.raises(UsageError, match=message) as err:
        read_predictions(path, SAMPLES)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text


def test_read_predictions_names_the_first_missing_indices(tmp_path):
    samples = [{"user_index": 0, "record_index": i} for i in range(20)]
    path = write_lines(tmp_path, [row(i) for i in (0, 3, 19)])
    with pytest.raises(UsageError, match=r"no prediction for 17 of 20 test samples \(index 1, 2, 4, 5, 6, \.\.\.\)"):
        read_predictions(path, samples)


def test_read_predictions_missing_file(tmp_path):
    with pytest.raises(UsageError, match="file not found"):
        read_predictions(str(tmp_path / "nope.jsonl"), SAMPLES)
    with pytest.raises(UsageError, match="is a directory"):
        read_predictions(str(tmp_path), SAMPLES)
