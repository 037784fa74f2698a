"""Tests for review_lm.evaluation.bootstrap: replicate scores equal the reported scores on the full set, intervals are
seeded, contain the estimate, shrink with more users (real Douban users), and a run paired with itself differs
by exactly [0, 0]."""

from __future__ import annotations

import random

import numpy as np
import pytest

from review_lm.evaluation import bootstrap as bs
from review_lm.evaluation import metrics, sample_stats, style
from review_lm.runs import run_folder

REFERENCES = ["看完出门转了一下钥匙扣，确认自己不在梦里。Nolan你赢了。", "站着，还把钱挣了。台词密度高到要二刷。",
              "铁轨那几场很美，就是后半段太闷。", "拍了十年的海，看得我想去潜水。",
              "八分钟循环，最后那个定格太温柔了。",
              "刘德华和叶德娴，一个眼神就够了。", "光棍节看这个，自虐。", "老虎到底存不存在？我选择相信有！！",
              "笑完就忘，但确实笑了……", "IMAX必须的，太空里的安静最吓人。"] * 3


def _shuffled(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.sample(t, len(t))) for t in texts]


def _outputs() -> list[str]:
    out = _shuffled(REFERENCES, 0)
    out[3], out[7] = "", REFERENCES[7]  # an empty output and an exact hit
    return out


USERS = [i % 3 for i in range(len(REFERENCES))]
EARLIER = [[REFERENCES[(i + 1) % 10], REFERENCES[(i + 2) % 10]] for i in range(len(REFERENCES))]


def _stats(outputs, with_style=True):
    stats = sample_stats.sample_statistics(outputs, REFERENCES)
    if with_style:
        evaluator = style.StyleEvaluator(USERS, REFERENCES, EARLIER)
        sample_stats.add_style(stats, evaluator.per_sample(outputs))
        return stats, evaluator
    return stats, None


def test_replicate_of_all_samples_equals_the_reported_scores():
    outputs = _outputs()
    stats, evaluator = _stats(outputs)
    ones = np.ones((1, len(outputs)), dtype=np.int64)
    got = {k: float(v[0]) for k, v in bs.replicate_scores(stats, ones, bs.group_codes(USERS)).items()}
    expected = {**metrics.compute_metrics(outputs, REFERENCES), **evaluator.score(outputs)}
    for key in bs.KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.parametrize("hyp,ref", [
    (["a b c d e"], ["a b c d e"]),  # perfect
    (["x y"], ["a b c d e"]),  # no match at all
    (["a b x y z"], ["a b c d e"]),  # unigrams and bigrams only: exp smoothing of the missing orders
    (["a"], ["a b c"]),  # too short for bigrams (total 0 ends the orders)
    ([""], ["a b"]),  # empty hypothesis
])
def test_bleu_and_chrf_from_statistics_match_sacrebleu(hyp, ref):
    from sacrebleu.metrics import BLEU, CHRF

    stats = sample_stats.sample_statistics(hyp, ref, {k: [0.0] * len(hyp) for k in sample_stats.ROUGE})
    assert bs.bleu_from_stats(stats.bleu.sum(axis=0))[0] == pytest.approx(
        BLEU(tokenize="zh").corpus_score(hyp, [ref]).score, abs=1e-9)
    assert bs.chrf_from_stats(stats.chrf.sum(axis=0))[0] == pytest.approx(CHRF().corpus_score(hyp, [ref]).score,
                                                                           abs=1e-9)


def test_two_level_resampling_draws_whole_users():
    codes = np.array([0, 0, 0, 1, 1, 2])
    counts = bs.resample_counts(codes, 200, seed=1)
    assert counts.shape == (200, 6)
    # user u drawn m times contributes m * (its sample count) draws: totals per user are multiples of its size
    sizes = np.bincount(codes)
    per_user = np.stack([counts[:, codes == u].sum(axis=1) for u in range(3)], axis=1)
    assert (per_user % sizes == 0).all()
    assert (per_user.sum(axis=1) // 1 >= 0).all() and (per_user // sizes).sum(axis=1).tolist() == [3] * 200
    one_user = bs.resample_counts(np.zeros(7, dtype=np.int64), 50, seed=1)
    assert (one_user.sum(axis=1) == 7).all()


def test_intervals_are_reproducible_with_the_seed_and_contain_the_estimate():
    outputs = _outputs()
    stats, evaluator = _stats(outputs)
    codes = bs.group_codes(USERS)
    points = {**metrics.compute_metrics(outputs, REFERENCES), **evaluator.score(outputs)}

    def run(seed):
        return bs.system_intervals(stats, points, bs.resample_counts(codes, 300, seed), codes)

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert set(a) == set(bs.KEYS)
    for key, (low, high) in a.items():
        assert low <= points[key] <= high, key


def test_a_run_paired_with_itself_differs_by_exactly_zero():
    stats, _ = _stats(_outputs())
    codes = bs.group_codes(USERS)
    diff = bs.paired_differences(stats, stats, bs.resample_counts(codes, 200, 3), codes)
    assert set(diff) == set(bs.KEYS)
    for key, d in diff.items():
        assert d["difference"] == 0.0 and d["interval"] == [0.0, 0.0] and not d["significant"], key


def test_paired_interval_finds_a_real_difference():
    good, _ = _stats(REFERENCES[:], with_style=False)
    bad, _ = _stats(_shuffled(REFERENCES, 1), with_style=False)
    codes = bs.group_codes(USERS)
    diff = bs.paired_differences(bad, good, bs.resample_counts(codes, 300, 3), codes)
    assert diff["rougeL"]["difference"] > 0 and diff["rougeL"]["significant"]
    assert diff["rougeL"]["interval"][0] <= diff["rougeL"]["difference"] <= diff["rougeL"]["interval"][1]


def test_sample_scores_round_trip(tmp_path):
    stats, _ = _stats(_outputs())
    codes = bs.group_codes(USERS)
    path = str(tmp_path / run_folder.SAMPLE_SCORES_FILE)
    sample_stats.save_sample_scores(path, {"model": stats}, codes, "abc")
    systems, got_codes, digest = sample_stats.load_sample_scores(path)
    assert digest == "abc" and got_codes.tolist() == codes.tolist() and list(systems) == ["model"]
    counts = bs.resample_counts(codes, 50, 0)
    before, after = bs.replicate_scores(stats, counts, codes), bs.replicate_scores(systems["model"], counts, codes)
    for key in bs.KEYS:
        np.testing.assert_array_equal(before[key], after[key])
    assert sample_stats.load_sample_scores(str(tmp_path / "absent.npz")) is None


def _previous_review_system(users, per_user=None):
    """Every review after the first (up to ``per_user`` per user), predicted by the same user's previous review
    (the "last" baseline)."""
    outputs, references, keys = [], [], []
    for user in users:
        texts = [r.text for r in user.reviews][:None if per_user is None else per_user + 1]
        outputs += texts[:-1]
        references += texts[1:]
        keys += [user.index] * (len(texts) - 1)
    return outputs, references, keys


def test_intervals_shrink_from_one_real_user_to_six(douban_dmr_dir):
    """10 test samples of one user -> 10 of each of the six users -> all of theirs (~270): narrower each time.

    (Not "one user's 57 samples vs six users' 272": resampling users counts how much users differ, so six users
    who write very differently can give a wider ROUGE-L interval than one user alone; that is the point.)"""
    import data_loader_movie_review as dl

    data = dl.load_review_data(sorted(str(p) for p in douban_dmr_dir.glob("*.json")))
    assert len(data.users) == 6
    one = [u for u in data.users if len(u.reviews) > 40][:1]
    widths = []
    for users, per_user in ((one, 10), (data.users, 10), (data.users, None)):
        outputs, references, keys = _previous_review_system(users, per_user)
        stats = sample_stats.sample_statistics(outputs, references)
        points = metrics.compute_metrics(outputs, references)
        codes = bs.group_codes(keys)
        found = bs.system_intervals(stats, points, bs.resample_counts(codes, 1000, 42), codes)
        for key in ("bleu", "chrf", "rougeL", "avg_length", "distinct_2"):
            assert found[key][0] <= points[key] <= found[key][1], (len(users), per_user, key)
        widths.append({k: found[k][1] - found[k][0] for k in ("chrf", "rougeL", "avg_length", "distinct_2")})
    for key in widths[0]:
        assert widths[0][key] > widths[1][key] > widths[2][key], (key, widths)
