"""Does the output write like *this* user? Attribution, stylometry and copying, for model outputs and baselines.

Pure functions and classes over plain Python data; evaluation calls them once per system on the same test
samples. Inputs, per test sample ``i``: its intended user key (any hashable), the system's output text, the
real reference text, and the texts the user wrote before it (``earlier_reviews[i]``, oldest first, as in
``test_samples.json``); per user: the reviews written before the test split (``history_by_user``: train + val
reviews, oldest first; :func:`histories_before_test` derives it from the test samples).

Three questions, one number each (plus context numbers, see :func:`definitions` for the exact rules):

* **Attribution** (``review_lm.evaluation.attribution``: ``AttributionModel``, ``attribution_report``): a char
  1-3-gram TF-IDF classifier trained only on ``history_by_user`` (plus optional negative-only "pool" users) says
  who wrote each output. ``attribution`` = share of outputs attributed to their intended user;
  ``attribution_shuffled`` = the same predictions scored against randomly permuted intended users;
  ``attribution_chance`` = 100 / classes; ``attribution_ceiling`` = attribution of the real test references.
* **Stylometry** (:mod:`review_lm.evaluation.stylometry`: ``text_features``, ``style_distance``): surface style features
  per text; the distance between a system's per-user feature means and the real test reviews' per-user means,
  in units of the reference standard deviation, averaged over features and over test samples.
* **Copying** (:func:`copy_overlaps`, :func:`copy_report`): share of outputs whose character ROUGE-L F1 against
  one of the user's earlier reviews is >= 0.8, and the mean best overlap.

:class:`StyleEvaluator` bundles the three for one test set (fit once, score every system); it also gives a
per-user table (:meth:`StyleEvaluator.per_user_rows`) and a figure (:meth:`StyleEvaluator.plot`).

Scale: copy detection uses rapidfuzz's C LCS (15,000 outputs x 85 earlier reviews: 1.8 s on 2 cores), style
features are a few str.count / regex calls per text (15,000 texts: 0.3 s); the attribution classifier's cost is in
``review_lm.evaluation.attribution``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from review_lm.evaluation.attribution import (
    ATTRIBUTION_SHUFFLES,
    HASHED_FEATURES,
    SVC_MAX_CLASSES,
    AttributionModel,
    AttributionUnavailable,
    attribution_numbers,
    intended_indices,
)
from review_lm.evaluation.stylometry import (
    FEATURE_NAMES,
    STYLE_FEATURES,
    feature_matrix,
    finite_values,
    group_codes,
    reference_scale,
    style_distance,
)
from review_lm.runs.test_set import histories_before_test
from review_lm.utils import pyplot

# --------------------------------------------------------------------------------------------------------------
# Settings (named in definitions(), so metrics.json states what was used)
# --------------------------------------------------------------------------------------------------------------
COPY_THRESHOLD = 0.8  # char ROUGE-L F1 at or above which an output is a near-copy of an earlier review


# --------------------------------------------------------------------------------------------------------------
# Copying
# --------------------------------------------------------------------------------------------------------------
def _squeeze(text: str) -> str:
    """The text without any whitespace (copy detection compares characters, whitespace ignored)."""
    return "".join(text.split()) if isinstance(text, str) else ""


def char_rouge_l_f1(a: str, b: str) -> float:
    """Character ROUGE-L F1 with whitespace ignored: ``2 * LCS / (len(a) + len(b))`` (0 when either is empty).

    Symmetric; equal to F1 of precision LCS/len(a) and recall LCS/len(b).
    """
    from rapidfuzz.distance import LCSseq

    a, b = _squeeze(a), _squeeze(b)
    if not a or not b:
        return 0.0
    return 2.0 * LCSseq.similarity(a, b) / (len(a) + len(b))


def copy_overlaps(outputs: Sequence[str], earlier_reviews: Sequence[Sequence[str]]) -> np.ndarray:
    """Per output: its highest :func:`char_rouge_l_f1` against its own sample's earlier reviews (0 when the
    output is empty or there is no non-empty earlier review). One rapidfuzz ``cdist`` call per sample."""
    from rapidfuzz import process
    from rapidfuzz.distance import LCSseq

    if len(outputs) != len(earlier_reviews):
        raise ValueError(f"{len(outputs)} outputs for {len(earlier_reviews)} earlier-review lists")
    squeezed_text: dict[str, str] = {}  # one squeezed copy per distinct text (memory: distinct texts, not pairs)
    best = np.zeros(len(outputs))
    previous: Any = None
    squeezed: list[str] = []
    lengths = np.zeros(0)
    for i, (output, earlier) in enumerate(zip(outputs, earlier_reviews, strict=True)):
        out = _squeeze(output)
        if not out:
            continue
        if earlier is not previous:  # samples of one user often share one list object
            squeezed = []
            for text in earlier:
                short = squeezed_text.get(text)
                if short is None:
                    short = squeezed_text[text] = _squeeze(text)
                if short:
                    squeezed.append(short)
            lengths = np.array([len(t) for t in squeezed], dtype=np.float64)
            previous = earlier
        if not squeezed:
            continue
        lcs = process.cdist([out], squeezed, scorer=LCSseq.similarity, dtype=np.int32)[0]
        best[i] = float(np.max(2.0 * lcs / (lengths + len(out))))
    return best


def copy_report(outputs: Sequence[str], earlier_reviews: Sequence[Sequence[str]],
                threshold: float = COPY_THRESHOLD) -> dict[str, float]:
    """``copy_rate``: 100 * share of outputs with overlap >= ``threshold``; ``copy_overlap_mean``: 100 * mean
    overlap (see :func:`copy_overlaps`). ``earlier_reviews[i]``: the texts the user wrote before sample i."""
    best = copy_overlaps(outputs, earlier_reviews)
    if len(best) == 0:
        raise ValueError("no outputs")
    return {"copy_rate": 100.0 * float(np.mean(best >= threshold)), "copy_overlap_mean": 100.0 * float(best.mean())}


# --------------------------------------------------------------------------------------------------------------
# One test set, every system
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Analysis:
    predicted: np.ndarray | None  # class index per sample (-1 = empty output), None without attribution
    overlaps: np.ndarray
    features: np.ndarray


class StyleEvaluator:
    """Attribution, stylometry and copying of any number of systems on one test set.

    Fits the attribution model once (on ``history_by_user`` and the optional pool only), computes the reference
    features and the ceiling; :meth:`score` then scores one system's outputs (one per test sample, in sample
    order). ``skipped_reason`` is a one-line reason when attribution cannot be computed (its numbers are None).
    """

    def __init__(self, intended_users: Sequence[Hashable], references: Sequence[str],
                 earlier_reviews: Sequence[Sequence[str]],
                 history_by_user: Mapping[Hashable, Sequence[str]] | None = None,
                 pool_by_user: Mapping[Hashable, Sequence[str]] | None = None, seed: int = 0,
                 shuffles: int = ATTRIBUTION_SHUFFLES, copy_threshold: float = COPY_THRESHOLD,
                 svc_max_classes: int = SVC_MAX_CLASSES):
        if not (len(intended_users) == len(references) == len(earlier_reviews)):
            raise ValueError(f"{len(intended_users)} users, {len(references)} references, "
                             f"{len(earlier_reviews)} earlier-review lists: one of each per test sample")
        if not references:
            raise ValueError("no test samples")
        self.intended_users = list(intended_users)
        self.references = list(references)
        self.earlier_reviews = earlier_reviews
        self.history_by_user = (histories_before_test(intended_users, earlier_reviews) if history_by_user is None
                                else history_by_user)
        self.seed, self.shuffles, self.copy_threshold = seed, shuffles, copy_threshold
        self.model: AttributionModel | None = None
        self.skipped_reason: str | None = None
        self._analyses: dict[tuple[str, ...], _Analysis] = {}
        try:
            self.model = AttributionModel.fit(self.history_by_user, pool_by_user, seed, svc_max_classes)
        except AttributionUnavailable as err:
            self.skipped_reason = str(err)
        self._intended = None if self.model is None else intended_indices(self.model, self.intended_users)
        self.reference_features = feature_matrix(self.references)
        self.scale = reference_scale(self.reference_features)
        analysis = self._analyse(self.references)
        self.reference_scores = self._score(analysis)
        self.reference_rows = self._rows(analysis)  # per_user_rows(references), computed once

    def _analyse(self, outputs: Sequence[str]) -> _Analysis:
        if len(outputs) != len(self.references):
            raise ValueError(f"{len(outputs)} outputs for {len(self.references)} test samples")
        outputs = list(outputs)
        key = tuple(outputs)  # the last analyses are kept: per_sample after score_and_rows costs nothing more
        if key in self._analyses:
            return self._analyses[key]
        predicted = None if self.model is None else self.model.predict_indices(outputs)
        analysis = _Analysis(predicted, copy_overlaps(outputs, self.earlier_reviews), feature_matrix(outputs))
        if len(self._analyses) >= 8:
            self._analyses.pop(next(iter(self._analyses)))
        self._analyses[key] = analysis
        return analysis

    def per_sample(self, outputs: Sequence[str]) -> dict[str, Any]:
        """Per test sample, what the system's numbers are made of (the input of review_lm.evaluation.bootstrap):
        ``attribution`` 1/0 hit, NaN where not scored (None without attribution), ``copy`` 1/0 near-copy,
        ``features`` (n, f), plus the references' features and the per-feature ``scale`` style_distance used."""
        a = self._analyse(outputs)
        attribution = None
        if a.predicted is not None:
            attribution = np.where(self._intended >= 0, (a.predicted == self._intended).astype(np.float64), np.nan)
        style = style_distance(a.features, self.reference_features, self.intended_users, self.scale)
        return {"attribution": attribution, "copy": (a.overlaps >= self.copy_threshold).astype(np.float64),
                "features": a.features, "reference_features": self.reference_features, "scale": style["_scale"]}

    def score(self, outputs: Sequence[str]) -> dict[str, Any]:
        """One system's numbers: attribution, attribution_shuffled, copy_rate, copy_overlap_mean, style_distance
        and style_features (per feature: system_mean, reference_mean, distance)."""
        return self._score(self._analyse(outputs))

    def _score(self, a: _Analysis) -> dict[str, Any]:
        if a.predicted is None:
            result: dict[str, Any] = {"attribution": None, "attribution_shuffled": None}
        else:
            keep = self._intended >= 0
            numbers = attribution_numbers(a.predicted[keep], self._intended[keep], self.seed, self.shuffles,
                                           int((~keep).sum()))
            result = {k: numbers[k] for k in ("attribution", "attribution_shuffled")}
        result["copy_rate"] = 100.0 * float(np.mean(a.overlaps >= self.copy_threshold))
        result["copy_overlap_mean"] = 100.0 * float(a.overlaps.mean())
        style = style_distance(a.features, self.reference_features, self.intended_users, self.scale)
        result["style_distance"] = style["style_distance"]
        result["style_features"] = style["style_features"]
        return result

    def summary(self) -> dict[str, Any]:
        """Once per evaluation: chance, ceiling (attribution of the real references), the model, skipped reason,
        and the references' own copy rate / overlap."""
        out: dict[str, Any] = {
            "attribution_chance": None if self.model is None else self.model.chance,
            "attribution_ceiling": self.reference_scores["attribution"],
            "attribution_skipped_reason": self.skipped_reason,
            "attribution_model": None if self.model is None else self.model.describe(),
            "attribution_samples": None, "attribution_excluded": None,
            "reference_copy_rate": self.reference_scores["copy_rate"],
            "reference_copy_overlap_mean": self.reference_scores["copy_overlap_mean"],
            "test_samples": len(self.references), "users": len(set(self.intended_users)),
        }
        if self.model is not None:
            out["attribution_samples"] = int((self._intended >= 0).sum())
            out["attribution_excluded"] = int((self._intended < 0).sum())
        return out

    def per_user_rows(self, outputs: Sequence[str]) -> list[dict[str, Any]]:
        """One row per user (first-sample order): user, test_samples, attribution (share of this user's outputs
        attributed to them, 0-100; None without attribution or when the user is no class), copy_rate, and
        style_distance (this user's distance, as in :func:`style_distance`)."""
        return self._rows(self._analyse(outputs))

    def score_and_rows(self, outputs: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """:meth:`score` and :meth:`per_user_rows` of one system from one analysis (attribution, copying and
        features computed once)."""
        a = self._analyse(outputs)
        return self._score(a), self._rows(a)

    def _rows(self, a: _Analysis) -> list[dict[str, Any]]:
        style = style_distance(a.features, self.reference_features, self.intended_users, self.scale)
        codes, users = style["_codes"], group_codes(self.intended_users)[1]
        rows = []
        for u, user in enumerate(users):
            mine = codes == u
            attribution = None
            if a.predicted is not None and self._intended[mine][0] >= 0:
                attribution = 100.0 * float(np.mean(a.predicted[mine] == self._intended[mine]))
            rows.append({"user": user, "test_samples": int(mine.sum()), "attribution": attribution,
                         "copy_rate": 100.0 * float(np.mean(a.overlaps[mine] >= self.copy_threshold)),
                         "style_distance": finite_values(style["_per_user"][u])})
        return rows

    def confusion(self, outputs: Sequence[str], top_n: int = 12) -> tuple[list[Hashable], np.ndarray]:
        """Attribution confusion over the ``top_n`` users with the most test samples (ties: first seen): rows =
        intended user, columns = predicted user among them plus a last column "other" (another class or an
        empty output). Samples of other users are left out."""
        if self.model is None:
            raise AttributionUnavailable(self.skipped_reason)
        a = self._analyse(outputs)
        codes, users = group_codes(self.intended_users)
        counts = np.bincount(codes)
        top = sorted(range(len(users)), key=lambda u: (-counts[u], u))[:top_n]
        labels = [users[u] for u in top]
        column = {self.model.index[user]: k for k, user in enumerate(labels) if user in self.model.index}
        matrix = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
        row_of = {u: k for k, u in enumerate(top)}
        for i, code in enumerate(codes):
            if code in row_of:
                matrix[row_of[code], column.get(int(a.predicted[i]), len(labels))] += 1
        return labels, matrix

    def plot(self, path: str, systems: Mapping[str, Sequence[str]], confusion_system: str | None = None,
             top_n: int = 12, user_labels: Mapping[Hashable, str] | None = None) -> None:
        """A PNG: length distribution and mean punctuation rates of each system vs the real test reviews, and
        (when attribution is available) the attribution confusion matrix of ``confusion_system`` (default: the
        first system) over the ``top_n`` users with the most test samples (named by ``user_labels``, else the key).
        Without a CJK font, Chinese names draw as boxes: matplotlib's missing-glyph warnings are silenced."""
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
            self._plot(path, systems, confusion_system, top_n, user_labels or {})

    def _plot(self, path: str, systems: Mapping[str, Sequence[str]], confusion_system: str | None, top_n: int,
              user_labels: Mapping[Hashable, str]) -> None:
        plt = pyplot()
        named = {"real test reviews": self.references, **systems}
        has_confusion = self.model is not None and bool(systems)
        fig, axes = plt.subplots(1, 3 if has_confusion else 2, figsize=(17 if has_confusion else 12, 4.8))
        ax = axes[0]
        lengths = [feature_matrix(texts)[:, 0] for texts in named.values()]
        top = max(float(np.percentile(np.concatenate(lengths), 99)), 1.0)
        bins = np.linspace(0, top, 30)
        for name, values in zip(named, lengths, strict=True):
            ax.hist(np.clip(values, 0, top), bins=bins, histtype="step", linewidth=1.6, label=name)
        ax.set_title("length (characters)")
        ax.set_xlabel(f"characters per text (clipped at {top:.0f}, the 99th percentile)")
        ax.set_ylabel("texts")
        ax.legend(fontsize=8)
        ax = axes[1]
        shown = ["excl_fullwidth_rate", "excl_ascii_rate", "question_fullwidth_rate",
                 "question_ascii_rate", "ellipsis_fullwidth_rate", "tilde_fullwidth_rate", "repeated_marks_rate",
                 "emoji_rate"]
        columns = [FEATURE_NAMES.index(f) for f in shown]
        width = 0.8 / len(named)
        for k, texts in enumerate(named.values()):
            means = np.nanmean(feature_matrix(texts)[:, columns], axis=0) if len(texts) else np.zeros(len(shown))
            ax.bar(np.arange(len(shown)) + k * width, means, width, label=list(named)[k])
        ax.set_xticks(np.arange(len(shown)) + 0.4 - width / 2)
        ax.set_xticklabels([f.replace("_rate", "") for f in shown], rotation=35, ha="right", fontsize=8)
        ax.set_title("marks per 100 characters (mean over texts)")
        ax.legend(fontsize=8)
        if has_confusion:
            name = confusion_system or next(iter(systems))
            labels, matrix = self.confusion(systems[name], top_n)
            ax = axes[2]
            shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
            ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
            names = [str(user_labels.get(u, u))[:14] for u in labels]
            ax.set_xticks(range(len(labels) + 1))
            ax.set_xticklabels([*names, "other"], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(names, fontsize=7)
            for r in range(matrix.shape[0]):
                for c in range(matrix.shape[1]):
                    if matrix[r, c]:
                        ax.text(c, r, str(matrix[r, c]), ha="center", va="center", fontsize=7,
                                color="white" if shares[r, c] > 0.5 else "black")
            ax.set_xlabel("attributed to")
            ax.set_ylabel("intended user")
            ax.set_title(f"attribution of '{name}' (top {len(labels)} users)")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Definitions (for metrics.json)
# --------------------------------------------------------------------------------------------------------------
def definitions() -> dict[str, Any]:
    """How each number is computed, in English, for metrics.json."""
    return {
        "attribution": (
            "100 * share of outputs that an authorship classifier attributes to the sample's intended user. "
            "Classifier: sklearn TfidfVectorizer(analyzer='char', ngram_range=(1, 3), sublinear_tf=True) + "
            f"LinearSVC(random_state=seed) (one-vs-rest) for up to {SVC_MAX_CLASSES} classes, above that a "
            "nearest-centroid cosine classifier on the same features (class centroid = L2-normalised sum of its "
            f"L2-normalised TF-IDF rows, n-grams hashed into {HASHED_FEATURES} columns; predict the class with "
            "the highest dot product). Trained only on the "
            "reviews each test user wrote before the test split (train + val) and on optional pool users "
            "(negative-only classes); empty texts skipped. An empty output is attributed to no one. Samples "
            "whose user has no non-empty earlier review are left out (attribution_excluded)."),
        "attribution_shuffled": (
            f"the same predictions scored against the intended users randomly permuted among the scored test "
            f"samples (numpy default_rng(seed), mean over {ATTRIBUTION_SHUFFLES} permutations, the same for every "
            "system): what a system that ignores the user reaches with its own output distribution"),
        "attribution_chance": "100 / number of candidate classes (test users with earlier reviews + pool users)",
        "attribution_ceiling": "attribution of the real test references (how separable the users are)",
        "attribution_skipped_reason": "why attribution is None (fewer than 2 candidate classes), else null",
        "style_distance": (
            "standardised mean absolute difference of style features: for each user u and feature f, "
            "|mean_u(system f) - mean_u(real test review f)| / s_f, with s_f = population std of f over all real "
            "test reviews (all users); where s_f is 0, the std of the system's outputs and the references pooled; "
            "where that is 0 too the term is 0. Undefined terms (a side without a defined value) are left out. "
            "Per user: mean over features; overall: mean over users weighted by their test samples. 0 = the "
            "same per-user feature means as the real reviews; larger = further away"),
        "style_features": {
            "what": "per feature: system_mean and reference_mean over all test samples (defined values), and "
                    "distance = the feature's term averaged over users weighted by test samples",
            "features": dict(STYLE_FEATURES),
        },
        "copy_rate": (
            f"100 * share of outputs that are near-copies of one of the user's earlier reviews (those written "
            f"before the test sample): character ROUGE-L F1 >= {COPY_THRESHOLD} against any of them"),
        "copy_overlap_mean": (
            "100 * mean over outputs of the output's highest character ROUGE-L F1 against the user's earlier "
            "reviews (0 for an empty output or without earlier reviews)"),
        "char_rouge_l_f1": ("2 * LCS / (len(a) + len(b)) over characters with all whitespace removed "
                            "(= F1 of LCS precision and recall); LCS by rapidfuzz.distance.LCSseq"),
        "per_user": ("per user: test_samples, attribution (share of the user's outputs attributed to them), "
                     "copy_rate, style_distance (the user's distance as above)"),
    }
