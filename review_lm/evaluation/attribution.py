"""Authorship attribution: who, among the test users, wrote a text? A char 1-3-gram TF-IDF classifier trained only
on each user's reviews before the test split (plus optional negative-only "pool" users).

``attribution`` = share of outputs attributed to their intended user; ``attribution_shuffled`` = the same
predictions scored against randomly permuted intended users (what ignoring the user reaches);
``attribution_chance`` = 100 / classes; ``attribution_ceiling`` = attribution of the real test references.

Scale (measured on 2 CPU cores with synthetic users whose reviews are char-bigram Markov text of ~90 chars):
copy detection uses rapidfuzz's C LCS (15,000 outputs x 85 earlier reviews: 1.8 s), style features are a few
str.count / regex calls per text (15,000 texts: 0.3 s). The attribution classifier is a one-vs-rest
``LinearSVC`` on an exact ``TfidfVectorizer`` up to :data:`SVC_MAX_CLASSES` classes (50 users x 85 reviews:
fit 4.6 s, 0.7 GB peak; its dense coefficient matrix is classes x vocabulary float64, the vocabulary grows with
the data: 425k n-grams there). Above it: nearest-centroid cosine on the same TF-IDF with the n-grams hashed into
:data:`HASHED_FEATURES` columns (no vocabulary of millions of strings; 5x faster to fit): 1,000 users: fit
8.6 s, 15,000 predictions 6.3 s, 0.8 GB; 10,000 users x 85 reviews: fit 64 s, 5.1 GB peak, predictions
~3.3 ms each (they scale with the number of classes: ~8 min for 150,000 test samples).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

TFIDF_SETTINGS = {"analyzer": "char", "ngram_range": (1, 3), "sublinear_tf": True}
TFIDF_SETTINGS_NO_TF = {k: v for k, v in TFIDF_SETTINGS.items() if k != "sublinear_tf"}
HASHED_FEATURES = 2**23  # columns of the hashed TF-IDF used above SVC_MAX_CLASSES
SVC_MAX_CLASSES = 50  # above this many classes: nearest-centroid cosine instead of LinearSVC (see module doc)
ATTRIBUTION_SHUFFLES = 5
PREDICT_CHUNK = 2048  # test texts scored per block (bounds the dense score block to chunk x classes)
EMPTY_PREDICTION = None  # what AttributionModel.predict returns for an empty / whitespace-only text


class AttributionUnavailable(ValueError):
    """Attribution cannot be computed for this data (e.g. fewer than 2 candidate users); ``str()`` is one line."""


# --------------------------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------------------------
def _non_empty(texts: Sequence[str]) -> list[str]:
    return [t for t in texts if isinstance(t, str) and t.strip()]


class AttributionModel:
    """Who wrote a text? A char n-gram TF-IDF classifier over the candidate users' earlier reviews.

    Build it with :meth:`fit`. ``classes`` are the candidate users in fit order (intended users with at least
    one non-empty earlier review, then pool users); ``intended`` is the set of non-pool classes.
    """

    def __init__(self, classes: list[Hashable], pool: frozenset, vectorizer: Any, method: str,
                 classifier: Any = None, centroids: Any = None, train_texts: int = 0):
        self.classes = classes
        self.pool = pool
        self.intended = frozenset(c for c in classes if c not in pool)
        self.vectorizer = vectorizer
        self.method = method
        self._classifier = classifier
        self._centroids = centroids
        self.train_texts = train_texts
        self.index = {c: i for i, c in enumerate(classes)}

    @classmethod
    def fit(cls, history_by_user: Mapping[Hashable, Sequence[str]],
            pool_by_user: Mapping[Hashable, Sequence[str]] | None = None, seed: int = 0,
            svc_max_classes: int = SVC_MAX_CLASSES) -> AttributionModel:
        """Train on the users' earlier reviews only (never on test references or outputs).

        Empty / whitespace-only texts are skipped; a user left without any text is no class. Pool users are
        extra classes (negatives: they can be predicted, but are never an intended user); their keys must differ
        from the intended users'. Raises :class:`AttributionUnavailable` with fewer than 2 classes.
        Deterministic: ``LinearSVC(random_state=seed)``; nearest centroid has no randomness.
        """
        from sklearn.feature_extraction.text import TfidfVectorizer

        pool_by_user = pool_by_user or {}
        clash = [k for k in pool_by_user if k in history_by_user]
        if clash:
            raise ValueError(f"pool users must not be intended users too: {clash[:5]!r}")
        classes: list[Hashable] = []
        texts: list[str] = []
        labels: list[int] = []
        pool: set = set()
        for source, is_pool in ((history_by_user, False), (pool_by_user, True)):
            for key, reviews in source.items():
                kept = _non_empty(reviews)
                if not kept:
                    continue
                labels.extend([len(classes)] * len(kept))
                texts.extend(kept)
                classes.append(key)
                if is_pool:
                    pool.add(key)
        if len(classes) < 2:
            intended = sum(1 for c in classes if c not in pool)
            raise AttributionUnavailable(
                f"attribution needs at least 2 candidate users with non-empty earlier reviews; there are "
                f"{len(classes)} ({intended} test user(s), {len(classes) - intended} pool user(s)): give the "
                "reviews of other users as a pool to measure it")
        y = np.asarray(labels)
        if len(classes) <= svc_max_classes:
            from sklearn.svm import LinearSVC

            vectorizer = TfidfVectorizer(**TFIDF_SETTINGS, dtype=np.float32)
            classifier = LinearSVC(random_state=seed).fit(vectorizer.fit_transform(texts), y)
            return cls(classes, frozenset(pool), vectorizer, "linear_svc", classifier=classifier,
                       train_texts=len(texts))
        vectorizer = _hashed_tfidf()
        features = vectorizer.fit_transform(texts)
        return cls(classes, frozenset(pool), vectorizer, "nearest_centroid",
                   centroids=_centroids(features, y, len(classes)), train_texts=len(texts))

    def predict_indices(self, texts: Sequence[str]) -> np.ndarray:
        """Class index per text (into ``classes``); -1 for an empty / whitespace-only text (attributed to no one).
        Ties go to the lower class index."""
        out = np.full(len(texts), -1, dtype=np.int64)
        rows = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        for start in range(0, len(rows), PREDICT_CHUNK):
            block = rows[start:start + PREDICT_CHUNK]
            x = self.vectorizer.transform([texts[i] for i in block])
            if self.method == "linear_svc":
                scores = self._classifier.decision_function(x)
                if scores.ndim == 1:  # binary LinearSVC: one score, > 0 means classes_[1]
                    pred = (scores > 0).astype(np.int64)
                else:
                    pred = np.argmax(scores, axis=1)
                pred = self._classifier.classes_[pred]
            else:  # dense block, so that ties (e.g. no shared n-gram at all) go to the lowest index
                pred = np.argmax((x @ self._centroids.T).toarray(), axis=1)
            out[block] = pred
        return out

    def predict(self, texts: Sequence[str]) -> list[Hashable | None]:
        """The predicted user key per text; ``None`` for an empty / whitespace-only text."""
        return [self.classes[i] if i >= 0 else EMPTY_PREDICTION for i in self.predict_indices(texts)]

    @property
    def chance(self) -> float:
        """100 / number of candidate classes."""
        return 100.0 / len(self.classes)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "classes": len(self.classes), "intended_classes": len(self.intended),
                "pool_classes": len(self.pool), "train_texts": self.train_texts,
                "features": (len(self.vectorizer.vocabulary_) if self.method == "linear_svc"
                             else f"hashed into {HASHED_FEATURES}")}


def _hashed_tfidf():
    """TfidfVectorizer's features (same analyzer, n-grams, sublinear tf, smooth idf, L2 norm) with the n-grams
    hashed into HASHED_FEATURES columns instead of a vocabulary: 5x faster to fit on 85k texts, and no
    vocabulary of millions of n-gram strings in memory (collisions among rare n-grams are the price)."""
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.pipeline import make_pipeline

    hashing = HashingVectorizer(**TFIDF_SETTINGS_NO_TF, n_features=HASHED_FEATURES, alternate_sign=False,
                                norm=None, dtype=np.float32)
    return make_pipeline(hashing, TfidfTransformer(sublinear_tf=True))


def _centroids(features, y: np.ndarray, n_classes: int):
    """Per class: the L2-normalised sum of its (already L2-normalised) TF-IDF rows, as a sparse CSR matrix."""
    import scipy.sparse as sp
    from sklearn.preprocessing import normalize

    indicator = sp.csr_matrix((np.ones(len(y), dtype=np.float32), (y, np.arange(len(y)))),
                              shape=(n_classes, len(y)))
    return normalize(indicator @ features).tocsr()


def intended_indices(model: AttributionModel, intended_users: Sequence[Hashable]) -> np.ndarray:
    """Class index of each intended user; -1 for a user who is no class (no non-empty earlier review)."""
    out = np.empty(len(intended_users), dtype=np.int64)
    for i, user in enumerate(intended_users):
        if user in model.pool:
            raise ValueError(f"test sample #{i}: user {user!r} is a pool user; pool users are never intended")
        out[i] = model.index.get(user, -1)
    return out


def attribution_report(model: AttributionModel, outputs: Sequence[str], intended_users: Sequence[Hashable],
                       seed: int = 0, shuffles: int = ATTRIBUTION_SHUFFLES) -> dict[str, float | int | None]:
    """``attribution`` and ``attribution_shuffled`` (0-100) of ``outputs`` (one per test sample).

    Samples whose intended user is no class (no non-empty earlier review) are left out of both numbers and
    counted in ``attribution_excluded``. An empty output is attributed to no one (a miss). ``shuffled``: the
    intended users are permuted among the scored samples with ``numpy.random.default_rng(seed)``, ``shuffles``
    times; the mean share of predictions that match the permuted user (the same permutations for every system).
    """
    if len(outputs) != len(intended_users):
        raise ValueError(f"{len(outputs)} outputs for {len(intended_users)} test samples")
    intended = intended_indices(model, intended_users)
    keep = intended >= 0
    predicted = model.predict_indices(list(outputs))[keep]
    return attribution_numbers(predicted, intended[keep], seed, shuffles, int((~keep).sum()))


def attribution_numbers(predicted: np.ndarray, intended: np.ndarray, seed: int, shuffles: int,
                         excluded: int) -> dict[str, float | int | None]:
    n = len(intended)
    if n == 0:
        return {"attribution": None, "attribution_shuffled": None, "attribution_samples": 0,
                "attribution_excluded": excluded}
    rng = np.random.default_rng(seed)
    shuffled = [float(np.mean(predicted == intended[rng.permutation(n)])) for _ in range(shuffles)]
    return {"attribution": 100.0 * float(np.mean(predicted == intended)),
            "attribution_shuffled": 100.0 * float(np.mean(shuffled)) if shuffled else None,
            "attribution_samples": n, "attribution_excluded": excluded}
