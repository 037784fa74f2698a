"""Overlap metrics (review_lm.evaluation.metrics) checked by hand: ROUGE, BLEU, chrF, distinct-n, lengths."""

from __future__ import annotations

import pytest

from review_lm.evaluation import metrics


# --------------------------------------------------------------------------------------------------------------
# Metrics, checked by hand
# --------------------------------------------------------------------------------------------------------------
def test_identical_texts_score_perfect():
    refs = ["看完出门转了一下钥匙扣，确认自己不在梦里。", "Nolan你赢了，陀螺到底倒没倒？"]
    m = metrics.compute_metrics(refs, refs)
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert m[key] == pytest.approx(100.0), key


def test_disjoint_texts_score_zero():
    m = metrics.compute_metrics(["我喜欢电影"], ["你讨厌音乐"])
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert m[key] == pytest.approx(0.0), key


def test_rouge_partial_overlap_by_hand():
    m = metrics.compute_metrics(["我喜欢音乐"], ["我喜欢电影"])
    # ROUGE-1: 5 chars each, 3 shared (我 喜 欢) -> P = R = 3/5 -> F1 = 0.6 -> 60
    assert m["rouge1"] == pytest.approx(60.0)
    # ROUGE-2: bigrams 我喜 喜欢 欢音 音乐 vs 我喜 喜欢 欢电 电影 -> 2 of 4 shared -> F1 = 0.5 -> 50
    assert m["rouge2"] == pytest.approx(50.0)
    # ROUGE-L: longest common subsequence 我喜欢 = 3 of 5 -> F1 = 0.6 -> 60
    assert m["rougeL"] == pytest.approx(60.0)


def test_rouge_counts_latin_words_as_one_unit():
    # units: Nolan 你 赢 了 vs Nolan 输 了 -> 2 shared; P = 2/3, R = 2/4 -> F1 = 2PR/(P+R) = 4/7
    m = metrics.compute_metrics(["Nolan 输了"], ["Nolan你赢了"])
    assert m["rouge1"] == pytest.approx(100 * 4 / 7)


def test_bleu_partial_overlap_by_hand():
    # hyp 我喜欢看电影 vs ref 我喜欢看电视 (tok:zh -> one word per character, 6 each, BP = 1)
    # n-gram precisions: 1: 5/6, 2: 4/5, 3: 3/4, 4: 2/3 -> product 1/3 -> BLEU = (1/3)^(1/4) = 0.7598
    m = metrics.compute_metrics(["我喜欢看电影"], ["我喜欢看电视"])
    assert m["bleu"] == pytest.approx(100 * (1 / 3) ** 0.25, abs=1e-6)


def test_chrf_partial_overlap_by_hand():
    # char n-grams of 我喜欢音乐 vs 我喜欢电影, orders 1-5 exist on both sides (no 6-grams, so they don't count):
    # precision = recall per order: 3/5, 2/4, 1/3, 0/2, 0/1 -> mean P = mean R = 1.4333/5 = 0.28667
    # F-beta with P == R is P -> chrF = 28.667
    m = metrics.compute_metrics(["我喜欢音乐"], ["我喜欢电影"])
    assert m["chrf"] == pytest.approx(100 * (3 / 5 + 2 / 4 + 1 / 3) / 5, abs=1e-6)


def test_char_tokenizer_units():
    units = metrics.CharTokenizer().tokenize("Nolan你赢了，陀螺 2010年 café!")
    assert units == ["Nolan", "你", "赢", "了", "，", "陀", "螺", "2010", "年", "café", "!"]


def test_distinct_n_by_hand():
    texts = ["我喜欢", "我喜欢电影"]
    # unigrams: 我 喜 欢 | 我 喜 欢 电 影 -> 5 unique of 8 -> 62.5
    assert metrics.distinct_n(texts, 1) == pytest.approx(62.5)
    # bigrams: 我喜 喜欢 | 我喜 喜欢 欢电 电影 -> 4 unique of 6 (none across the two texts) -> 66.67
    assert metrics.distinct_n(texts, 2) == pytest.approx(100 * 4 / 6)
    assert metrics.distinct_n(["", "a"], 2) == 0.0  # no bigram at all


def test_average_length_in_characters():
    assert metrics.average_length(["ab", "", "我喜欢"]) == pytest.approx(5 / 3)


def test_empty_predictions_score_zero_without_crashing():
    m = metrics.compute_metrics(["", ""], ["我喜欢电影", "好看"])
    assert m == {key: 0.0 for key, _ in metrics.METRICS}


def test_compute_metrics_rejects_mismatched_or_empty_lists():
    with pytest.raises(ValueError):
        metrics.compute_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        metrics.compute_metrics([], [])


def test_metric_definitions_name_tokenization_and_versions():
    d = metrics.metric_definitions()
    assert "tok:zh" in d["bleu"]["signature"] and "version:2.6" in d["bleu"]["signature"]
    assert "nc:6" in d["chrf"]["signature"]
    assert "rouge-score 0.1.2" in d["rouge1"]["how"] and "latin" in d["rouge1"]["tokenization"]
