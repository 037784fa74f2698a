"""Bootstrap confidence intervals for every headline score, and paired intervals between two runs.

Why: on a test split of a few hundred reviews, two ablations 1 ROUGE-L point apart may differ by noise alone.
Every score evaluation reports (BLEU, chrF, ROUGE-1/2/L, distinct-1/2, avg length, attribution, copy rate,
style distance) gets a 95% interval from :data:`DEFAULT_RESAMPLES` resamples of the test samples.

Resampling (:func:`resample_counts`): with one user, the test samples are drawn with replacement; with several
users, the users are drawn with replacement first and then, inside each drawn user, that user's samples
(a two-level / cluster bootstrap: a user's reviews are not independent of each other, so resampling samples
alone would make the intervals too narrow). A replicate is a count per test sample (how often it was drawn),
so every metric is computed from ``counts @ per-sample statistics`` in numpy instead of re-scoring strings:

* BLEU / chrF are corpus-level: they are computed from summed sufficient statistics (sacrebleu's per-segment
  n-gram counts, :func:`sample_statistics`), with sacrebleu's formulas re-written vectorised
  (:func:`bleu_from_stats`, :func:`chrf_from_stats`; equal to ``corpus_score`` on the full set, tested).
* ROUGE, avg length, attribution, copy rate: (weighted) means of per-sample values.
* distinct-n: unique n-grams among the drawn samples / all drawn n-grams (a duplicated sample repeats its
  n-grams, which pulls the ratio down: this ratio alone is reported with the bootstrap bias removed,
  see :func:`interval`).
* style distance: per-user feature means of outputs and references from the same drawn samples, in units of
  the full reference set's std (held fixed), as in :func:`review_lm.evaluation.stylometry.style_distance`.

Interval: the percentile interval of the replicates (2.5th and 97.5th percentile); ``--compare`` uses the same
counts for both runs (a **paired** bootstrap on the same test samples), so the difference of a run with itself
is exactly [0, 0]. Cost (2 CPU cores, 1,000 resamples): ~0.1 s per system for a few hundred samples; distinct-n
dominates at scale (unique n-grams per replicate, ~nnz(n-grams) x resamples operations).

The per-sample statistics of each system are written to ``sample_scores.npz`` beside metrics.json, so that
``--compare`` can pair runs without re-scoring them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from review_lm.evaluation import stylometry
from review_lm.evaluation.sample_stats import ROUGE, SampleStats, add_style, sample_statistics

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
MAX_BLOCK = 20_000_000  # floats per dense block when counting unique n-grams (bounds memory to ~160 MB)
# Scores reported with an interval, in table order; the first three are corpus-level and need statistics.
KEYS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "avg_length", "attribution",
        "copy_rate", "style_distance")
BIAS_CORRECTED = ("distinct_1", "distinct_2")
UNBOUNDED = ("avg_length", "style_distance")  # the others are shares on 0-100
METHOD = ("percentile bootstrap, {resamples} resamples, seed {seed}; resampling unit: {unit}; "
          "distinct-n intervals shifted by the bootstrap bias (a drawn duplicate repeats its n-grams)")


# --------------------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------------------
def group_codes(keys: Sequence[Hashable]) -> np.ndarray:
    """Dense group codes 0..U-1 in first-appearance order (the resampling units: users)."""
    return stylometry.group_codes(keys)[0]


def resample_counts(codes: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) draw counts: users with replacement, then each drawn user's samples with replacement.

    One user: plain resampling of the n samples. Drawing user u m times and then n_u of its samples each time
    is one multinomial draw of m * n_u samples over its n_u samples (numpy draws all replicates at once).
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((resamples, 0), dtype=np.int64)
    users = int(codes.max()) + 1
    counts = np.zeros((resamples, n), dtype=np.int64)
    if users == 1:
        counts[:] = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
        return counts
    drawn = rng.integers(0, users, size=(resamples, users))
    times = np.stack([np.bincount(row, minlength=users) for row in drawn])  # (resamples, users)
    for u in range(users):
        members = np.flatnonzero(codes == u)
        k = len(members)
        counts[:, members] = rng.multinomial(times[:, u] * k, np.full(k, 1.0 / k))
    return counts


def interval(point: float | None, replicates: np.ndarray, bias_corrected: bool = False,
             confidence: float = CONFIDENCE) -> list[float] | None:
    """[low, high] percentile interval of ``replicates`` (NaN replicates, e.g. no attributable sample drawn, are
    left out). ``bias_corrected``: shifted by point - mean(replicates), for a statistic whose replicates are
    biased by construction (distinct-n)."""
    if point is None or (isinstance(point, float) and math.isnan(point)):
        return None
    values = replicates[~np.isnan(replicates)]
    if values.size == 0:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    if bias_corrected:
        shift = point - float(values.mean())
        low, high = low + shift, high + shift
    return [float(low), float(high)]


# --------------------------------------------------------------------------------------------------------------
# Scores from summed statistics (vectorised over replicates)
# --------------------------------------------------------------------------------------------------------------
def bleu_from_stats(summed: np.ndarray, order: int = 4) -> np.ndarray:
    """sacrebleu BLEU (smooth 'exp', no effective order) of each row of summed segment statistics."""
    summed = np.atleast_2d(summed).astype(np.float64)
    sys_len, ref_len = summed[:, 0], summed[:, 1]
    correct, total = summed[:, 2:2 + order], summed[:, 2 + order:2 + 2 * order]
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(sys_len < ref_len, np.where(sys_len > 0, np.exp(1 - ref_len / np.maximum(sys_len, 1e-300)), 0.0),
                      1.0)
        # 'exp' smoothing: the k-th order without a match gets 100 / (2^k * total).
        misses = np.cumsum(correct == 0, axis=1)
        # An order with no n-gram at all (total 0) ends the loop in sacrebleu: it and all later stay 0.
        reached = np.cumprod(total > 0, axis=1).astype(bool)
        precision = np.where(correct > 0, 100.0 * correct / np.where(total > 0, total, 1),
                             100.0 / (2.0 ** misses * np.where(total > 0, total, 1)))
        precision = np.where(reached, precision, 0.0)
        logs = np.where(precision > 0, np.log(np.where(precision > 0, precision, 1)), -9999999999.0)
        score = bp * np.exp(logs.sum(axis=1) / order)
    return np.where(correct.sum(axis=1) > 0, score, 0.0)


def chrf_from_stats(summed: np.ndarray, beta: float = 2.0) -> np.ndarray:
    """sacrebleu chrF (effective-order averaging, no eps smoothing) of each row of summed statistics."""
    summed = np.atleast_2d(summed).astype(np.float64)
    hyp, ref, match = summed[:, 0::3], summed[:, 1::3], summed[:, 2::3]
    factor = beta ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(hyp > 0, match / np.where(hyp > 0, hyp, 1), 0.0)
        rec = np.where(ref > 0, match / np.where(ref > 0, ref, 1), 0.0)
        effective = (hyp > 0) & (ref > 0)
        orders = effective.sum(axis=1)
        avg_prec = np.where(orders > 0, (prec * effective).sum(axis=1) / np.maximum(orders, 1), 0.0)
        avg_rec = np.where(orders > 0, (rec * effective).sum(axis=1) / np.maximum(orders, 1), 0.0)
        denom = factor * avg_prec + avg_rec
        f_score = 100 * (1 + factor) * avg_prec * avg_rec / np.where(denom > 0, denom, 1)
    return np.where(avg_prec + avg_rec > 0, f_score, 0.0)


def _weighted_mean(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per replicate: mean of the defined (non-NaN) values, each counted as often as drawn; NaN if none."""
    defined = ~np.isnan(values)
    num = counts @ np.where(defined, values, 0.0)
    den = counts @ defined.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _distinct(counts: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per replicate: 100 * unique n-grams among drawn samples / all drawn n-grams (duplicates counted)."""
    import scipy.sparse as sp

    n = len(offsets) - 1
    per_sample = np.diff(offsets).astype(np.float64)
    totals = counts @ per_sample
    if ids.size == 0:
        return np.zeros(len(counts))
    rows = np.repeat(np.arange(n), np.diff(offsets))
    incidence = sp.csr_matrix((np.ones(ids.size), (ids, rows)), shape=(int(ids.max()) + 1, n))  # (V, n)
    incidence.data[:] = 1.0  # an n-gram repeated inside one sample is one column entry
    unique = np.empty(len(counts))
    block = max(1, MAX_BLOCK // incidence.shape[0])
    for start in range(0, len(counts), block):
        drawn = (counts[start:start + block] > 0).astype(np.float64).T  # (n, block)
        unique[start:start + block] = ((incidence @ drawn) > 0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * unique / np.where(totals > 0, totals, 1), 0.0)


def _style_distance(counts: np.ndarray, codes: np.ndarray, features: np.ndarray, reference: np.ndarray,
                    scale: np.ndarray) -> np.ndarray:
    """Per replicate: :func:`review_lm.evaluation.stylometry.style_distance` on the drawn samples (weights = draw
    counts), with the per-feature scale of the full test set held fixed."""
    total_num = np.zeros(len(counts))
    total_den = np.zeros(len(counts))
    out_ok, ref_ok = ~np.isnan(features), ~np.isnan(reference)
    out_filled, ref_filled = np.where(out_ok, features, 0.0), np.where(ref_ok, reference, 0.0)
    for u in range(int(codes.max()) + 1):
        members = np.flatnonzero(codes == u)
        c = counts[:, members].astype(np.float64)  # (B, k)
        weight = c.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out_mean = (c @ out_filled[members]) / (c @ out_ok[members].astype(np.float64))
            ref_mean = (c @ ref_filled[members]) / (c @ ref_ok[members].astype(np.float64))
            diff = np.abs(out_mean - ref_mean)
            terms = np.where(scale > 0, diff / np.where(scale > 0, scale, 1), np.where(np.isnan(diff), np.nan, 0.0))
        defined = ~np.isnan(terms)
        has = defined.any(axis=1) & (weight > 0)
        user = np.where(has, np.nansum(terms, axis=1) / np.maximum(defined.sum(axis=1), 1), 0.0)
        total_num += np.where(has, user * weight, 0.0)
        total_den += np.where(has, weight, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_den > 0, total_num / np.where(total_den > 0, total_den, 1), np.nan)


def replicate_scores(stats: SampleStats, counts: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    """Every score of one system for each replicate (row of ``counts``); a row of ones gives the point
    estimate, on the scales of metrics.json."""
    counts = np.atleast_2d(counts)
    c = counts.astype(np.float64)
    drawn = c.sum(axis=1)
    out = {"bleu": bleu_from_stats(c @ stats.bleu), "chrf": chrf_from_stats(c @ stats.chrf)}
    out.update({k: 100.0 * (c @ stats.rouge[k]) / drawn for k in ROUGE})
    for n in (1, 2):
        out[f"distinct_{n}"] = _distinct(counts, *stats.ngrams[n])
    out["avg_length"] = (c @ stats.length) / drawn
    if stats.attribution is not None:
        out["attribution"] = 100.0 * _weighted_mean(c, stats.attribution)
    if stats.copy is not None:
        out["copy_rate"] = 100.0 * (c @ stats.copy) / drawn
    if stats.features is not None:
        out["style_distance"] = _style_distance(counts, codes, stats.features, stats.reference_features,
                                                stats.scale)
    return out


# --------------------------------------------------------------------------------------------------------------
# Intervals of one evaluation, paired differences between runs
# --------------------------------------------------------------------------------------------------------------
def describe(resamples: int, seed: int, users: int) -> dict[str, Any]:
    unit = "users, then each drawn user's test samples" if users > 1 else "test samples (one user)"
    return {"method": METHOD.format(resamples=resamples, seed=seed, unit=unit), "confidence": CONFIDENCE,
            "resamples": resamples, "seed": seed, "users": users}


def system_intervals(stats: SampleStats, points: Mapping[str, float | None], counts: np.ndarray,
                     codes: np.ndarray) -> dict[str, list[float] | None]:
    """[low, high] of each score in ``points`` (the reported values) that the statistics can replicate."""
    return draws_intervals([stats], points, counts, codes)


def paired_differences(first: SampleStats | Sequence[SampleStats], other: SampleStats | Sequence[SampleStats],
                       counts: np.ndarray, codes: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per score: other - first (point estimate, on all samples once) with the paired interval (the same
    resampled test samples for both runs) and whether it excludes 0. A run with several draws per prompt
    (a list of statistics) is scored as the mean over its draws."""
    first = [first] if isinstance(first, SampleStats) else list(first)
    other = [other] if isinstance(other, SampleStats) else list(other)
    ones = np.ones((1, counts.shape[1]), dtype=np.int64)
    a_point, b_point = mean_replicates(first, ones, codes), mean_replicates(other, ones, codes)
    a_reps, b_reps = mean_replicates(first, counts, codes), mean_replicates(other, counts, codes)
    out = {}
    for key in KEYS:
        if key not in a_reps or key not in b_reps:
            continue
        point = float(b_point[key][0] - a_point[key][0])
        if math.isnan(point):
            continue
        ci = interval(point, b_reps[key] - a_reps[key], key in BIAS_CORRECTED)
        out[key] = {"difference": point, "interval": ci,
                    "significant": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}
    return out


def half_width(ci: Sequence[float] | None) -> float | None:
    return None if ci is None else (ci[1] - ci[0]) / 2.0


def evaluation_intervals(systems: Mapping[str, Sequence[str]], references: Sequence[str],
                         rouge: Mapping[str, Mapping[str, Sequence[float]]], evaluator: Any,
                         users: Sequence[Hashable], scores: Mapping[str, Mapping[str, Any]], main: str | None,
                         resamples: int, seed: int, more_draws: Sequence[Sequence[str]] | None = None,
                         ) -> tuple[dict[str, Any], dict[str, SampleStats], np.ndarray]:
    """metrics.json's "intervals" section (``model`` / ``baselines`` like the scores), every system's statistics
    (for sample_scores.npz; the main system's further draws as ``model#1``, ...) and the user codes.
    ``evaluator``: the fitted style.StyleEvaluator, or None. ``more_draws``: the main system's draws after the
    first (--num_samples): its interval is then that of the mean over draws, on the same resampled samples."""
    codes = group_codes(users)
    counts = resample_counts(codes, resamples, seed)
    stats, found = {}, {}

    def statistics(outputs: Sequence[str], rouge_scores=None) -> SampleStats:
        one = sample_statistics(outputs, references, rouge_scores)
        return add_style(one, evaluator.per_sample(outputs)) if evaluator is not None else one

    for name, outputs in systems.items():
        stats[name] = statistics(outputs, rouge.get(name))
        if name == main and more_draws:
            for k, texts in enumerate(more_draws, start=1):
                stats[f"{name}#{k}"] = statistics(texts)
            found[name] = draws_intervals([stats[name], *(stats[f"{name}#{k}"] for k in range(1, len(more_draws)
                                                                                               + 1))],
                                          scores[name], counts, codes)
        else:
            found[name] = system_intervals(stats[name], scores[name], counts, codes)
    section = {**describe(resamples, seed, int(codes.max()) + 1 if len(codes) else 0),
               "model": found.get(main) if main else None,
               "baselines": {name: v for name, v in found.items() if name != main}}
    return section, stats, codes


def draw_stats(systems: Mapping[str, SampleStats], name: str = "model") -> list[SampleStats]:
    """A system's draws as saved by :func:`evaluation_intervals`: ``name``, ``name#1``, ``name#2``, ..."""
    out = [systems[name]]
    while f"{name}#{len(out)}" in systems:
        out.append(systems[f"{name}#{len(out)}"])
    return out


def mean_replicates(draws: Sequence[SampleStats], counts: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    """Per score, the mean over draws of each replicate (the same resampled samples for every draw)."""
    each = [replicate_scores(d, counts, codes) for d in draws]
    return {key: np.mean([e[key] for e in each], axis=0) for key in each[0]}


def draws_intervals(draws: Sequence[SampleStats], points: Mapping[str, float | None], counts: np.ndarray,
                    codes: np.ndarray) -> dict[str, list[float] | None]:
    """As :func:`system_intervals`, for a score that is the mean over several draws per prompt."""
    reps = mean_replicates(draws, counts, codes)
    out = {}
    for key in KEYS:
        if key in reps and key in points:
            ci = interval(points.get(key), reps[key], key in BIAS_CORRECTED)
            # The bias shift may step past a bound the score cannot cross (distinct-n above 100).
            top = math.inf if key in UNBOUNDED else 100.0
            out[key] = None if ci is None else [max(0.0, ci[0]), min(top, ci[1])]
    return out


def mean_over_draws(per_draw: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the mean of each numeric score over the draws, metrics.json's "samples_per_prompt" section: the spread
    as population std, min and max, and every draw's scores). A score missing (None) in any draw stays None."""
    mean, spread = {}, {}
    for key in per_draw[0]:
        values = [d.get(key) for d in per_draw]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            arr = np.asarray(values, dtype=np.float64)
            mean[key] = float(arr.mean())
            spread[key] = {"std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}
        else:
            mean[key] = per_draw[0][key] if len(per_draw) == 1 else None
    return mean, {"samples": len(per_draw), "score": "mean over the samples (draw k = every prompt's k-th sample)",
                  "spread": spread, "per_sample": [dict(d) for d in per_draw]}
