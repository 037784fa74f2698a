"""Overlap metrics of generated reviews against the real ones, the model-free baselines, and their definitions.

Scores (all on a 0-100 scale, except lengths in characters):
  * BLEU-4: sacrebleu corpus BLEU, ``tokenize="zh"`` (every CJK character is a word, latin text is split
    like 13a), exponential smoothing.
  * chrF: sacrebleu corpus chrF (character 6-grams, beta 2, whitespace ignored).
  * ROUGE-1/2/L F1: rouge-score with :class:`CharTokenizer` (rouge-score's default tokenizer keeps only
    [a-z0-9] and drops every Chinese character), averaged over samples.
  * distinct-1/2: unique n-grams / all n-grams over all predictions, in the same units as ROUGE.
  * avg length: mean number of characters of the (stripped) texts.

Baselines, on the same test samples, never looking at the reference: ``last`` copies the user's most recent
earlier review, ``random`` copies one earlier review drawn with ``random.Random(seed)``; "" when the user has
no earlier review.

sacrebleu / rouge-score are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from typing import Any

from review_lm.utils import package_version

# (key in metrics.json, column title). The order is the order of tables and charts.
METRICS = (
    ("bleu", "BLEU"),
    ("chrf", "chrF"),
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("avg_length", "avg length"),
)
SCORE_KEYS = tuple(key for key, _ in METRICS if key != "avg_length")  # the ones on the 0-100 scale
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# --------------------------------------------------------------------------------------------------------------
# Metrics (pure functions; the metric libraries are imported lazily)
# --------------------------------------------------------------------------------------------------------------
# A latin "word": ASCII letters/digits plus the Latin-1 / Latin Extended-A/B letters (é, ü, ...), without × and ÷.
_LATIN_WORD = r"[0-9A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F]+"
_UNIT_RE = re.compile(rf"{_LATIN_WORD}|\S")


class CharTokenizer:
    """Tokenizer for rouge-score (and distinct-n): one unit per character, latin words kept whole.

    Every non-whitespace character is a unit (CJK characters, Chinese and ASCII punctuation, emoji), except
    that a run of latin letters/digits is one unit ("Nolan", "2010"). Case is kept, as in sacrebleu's default
    (case:mixed). This mirrors sacrebleu's ``tok:zh``, which splits CJK text into characters and keeps latin
    words, so BLEU and ROUGE count the same units.
    """

    description = ("one unit per non-whitespace character; a run of latin letters/digits "
                   f"(regex {_LATIN_WORD}) is one unit; case kept; whitespace dropped")

    def tokenize(self, text: str) -> list[str]:
        return _UNIT_RE.findall(text)


def distinct_n(texts: Sequence[str], n: int, tokenizer: CharTokenizer | None = None) -> float:
    """100 * unique n-grams / all n-grams, counted over all ``texts`` (n-grams never cross two texts).

    0.0 when the texts hold no n-gram at all (e.g. every text is empty).
    """
    tokenizer = tokenizer or CharTokenizer()
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        units = tokenizer.tokenize(text)
        grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return 100.0 * len(seen) / total if total else 0.0


def average_length(texts: Sequence[str]) -> float:
    """Mean number of characters (Unicode code points, inner spaces included) per text."""
    return sum(len(t) for t in texts) / len(texts) if texts else 0.0


def sample_rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 (0-1) of each prediction against its reference (rouge-score with :class:`CharTokenizer`)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharTokenizer())
    out: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # score(target, prediction): argument order matters
        for name in ROUGE_TYPES:
            out[name].append(scores[name].fmeasure)
    return out


def compute_metrics(predictions: Sequence[str], references: Sequence[str],
                    rouge: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Scores of ``predictions`` against ``references`` (one reference each), as described in the module doc.

    ``rouge``: :func:`sample_rouge` of the same lists, if already computed (evaluation keeps the per-sample
    ROUGE-L for its per-user table). Empty predictions are fine (they score 0). Raises ``ValueError`` for an
    empty or mismatched list.
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    predictions, references = list(predictions), list(references)
    bleu = BLEU(tokenize="zh").corpus_score(predictions, [references]).score
    chrf = CHRF().corpus_score(predictions, [references]).score
    rouge = sample_rouge(predictions, references) if rouge is None else rouge
    metrics = {"bleu": bleu, "chrf": chrf}
    metrics.update({name: 100.0 * sum(rouge[name]) / len(predictions) for name in ROUGE_TYPES})
    metrics["distinct_1"] = distinct_n(predictions, 1)
    metrics["distinct_2"] = distinct_n(predictions, 2)
    metrics["avg_length"] = average_length(predictions)
    return metrics


def reference_statistics(references: Sequence[str]) -> dict[str, float]:
    """distinct-n and length of the references themselves: what a human-like output looks like."""
    return {"distinct_1": distinct_n(references, 1), "distinct_2": distinct_n(references, 2),
            "avg_length": average_length(references)}


def metric_definitions() -> dict[str, Any]:
    """How each score in metrics.json was computed, with library versions and sacrebleu signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    # sacrebleu only knows the number of references after scoring something; we always use one.
    bleu, chrf = BLEU(tokenize="zh"), CHRF()
    bleu.corpus_score(["a"], [["a"]])
    chrf.corpus_score(["a"], [["a"]])
    bleu_sig, chrf_sig = bleu.get_signature().format(), chrf.get_signature().format()
    rouge = f"rouge-score {package_version('rouge-score')}"
    units = CharTokenizer.description
    return {
        "scale": ("bleu, chrf, rouge*, distinct_*, attribution*, copy_* are 0-100; avg_length is in characters; "
                  "style_distance is in standard deviations of the real test reviews"),
        "bleu": {"what": "corpus BLEU-4, one reference per sample",
                 "how": "sacrebleu.metrics.BLEU(tokenize='zh').corpus_score (= sacrebleu.corpus_bleu)",
                 "signature": bleu_sig},
        "chrf": {"what": "corpus chrF (char 6-grams, beta 2, whitespace ignored)",
                 "how": "sacrebleu.metrics.CHRF().corpus_score (= sacrebleu.corpus_chrf)", "signature": chrf_sig},
        "rouge1": {"what": "ROUGE-1 F1 per sample, mean over samples, x100",
                   "how": f"{rouge} RougeScorer(['rouge1'], tokenizer=CharTokenizer()); no stemming",
                   "tokenization": units},
        "rouge2": {"what": "ROUGE-2 F1 per sample, mean over samples, x100",
                   "how": f"{rouge} RougeScorer(['rouge2'], tokenizer=CharTokenizer()); no stemming",
                   "tokenization": units},
        "rougeL": {"what": "ROUGE-L (LCS, not rougeLsum) F1 per sample, mean over samples, x100",
                   "how": f"{rouge} RougeScorer(['rougeL'], tokenizer=CharTokenizer())", "tokenization": units},
        "distinct_1": {"what": "100 * unique unigrams / all unigrams over all outputs", "tokenization": units},
        "distinct_2": {"what": "100 * unique bigrams / all bigrams over all outputs (not across outputs)",
                       "tokenization": units},
        "avg_length": {"what": "mean len(text) in characters (Unicode code points) of the stripped outputs"},
        "empty_outputs": "an empty output scores 0 in every metric and adds no n-grams to distinct-n",
    }


def baseline_last(earlier_reviews: Sequence[list[str]]) -> list[str]:
    """Per sample, the user's most recent earlier review (each list is oldest first); "" without one."""
    return [earlier[-1] if earlier else "" for earlier in earlier_reviews]


def baseline_random(earlier_reviews: Sequence[list[str]], seed: int) -> list[str]:
    """One earlier review per sample, drawn in sample order from ``random.Random(seed)``; "" without one."""
    rng = random.Random(seed)
    return [rng.choice(earlier) if earlier else "" for earlier in earlier_reviews]


def compute_baselines(earlier_reviews: Sequence[list[str]], seed: int) -> dict[str, list[str]]:
    """Both baselines from each sample's earlier reviews (``SampleSet.all_earlier_reviews``)."""
    return {"last": baseline_last(earlier_reviews), "random": baseline_random(earlier_reviews, seed)}


def references_digest(references: Sequence[str]) -> str:
    """Identifies the test set, so --compare can tell runs scored on different references apart."""
    return hashlib.sha256(json.dumps(list(references), ensure_ascii=False).encode("utf-8")).hexdigest()
