"""Stylometry: surface style features of a review and the distance between two sets of reviews per user.

Part of the style metrics (:mod:`review_lm.evaluation.style` bundles them with attribution and copying; its module doc
says what each number answers). Features are a few ``str.count`` / regex calls per text (15,000 texts: 0.3 s on
2 CPU cores); :func:`style_distance` compares per-user feature means in units of the real reviews' spread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

_ASCII_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_EMOJI_RE = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u2300-\u23FF]")
_LATIN_RE = re.compile(r"[A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F]")
_DIGIT_RE = re.compile(r"[0-9\uFF10-\uFF19]")
_SENTENCE_END_RE = re.compile(r"[。！？!?…\n]+|\.{2,}|(?<!\d)\.(?!\d)")
_REPEAT_RE = re.compile(r"[！!？?]{2,}|。{2,}|[～~〜]{2,}|，{2,}|,{2,}|\.{4,}|…{3,}")
_ASCII_ELLIPSIS_RE = re.compile(r"\.{2,}")
_WORDLIKE_RE = re.compile(r"[^\W_]")  # a letter, digit or CJK character (not punctuation, space or symbol)


def _is_fullwidth_punct(ch: str) -> bool:
    """Non-ASCII punctuation: Unicode category P* (，。！？、；：“”‘’（）《》【】…—·), the CJK
    symbols-and-punctuation block (U+3001-U+303F) and the full-width ASCII variants (U+FF01-U+FF65) that are
    not letters or digits (e.g. ～ ＋)."""
    import unicodedata

    cp = ord(ch)
    if cp < 128:
        return False
    if 0x3001 <= cp <= 0x303F:
        return True
    if 0xFF01 <= cp <= 0xFF65:
        return not ch.isalnum()
    return unicodedata.category(ch).startswith("P")


class _PunctClass(dict):
    """char -> 'f' (full-width punctuation), 'a' (ASCII punctuation) or '' for str.translate; cached."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        value = "a" if ch in _ASCII_PUNCT else "f" if _is_fullwidth_punct(ch) else ""
        self[cp] = value
        return value


_PUNCT_CLASS = _PunctClass()

# (name, description). Rates are per 100 characters of the stripped text (0 for an empty text).
STYLE_FEATURES: tuple[tuple[str, str], ...] = (
    ("length", "characters (Unicode code points) of the stripped text"),
    ("sentences", "number of sentences: maximal runs of text between sentence ends (。！？!?… newline, '..', "
                  "a '.' not between digits) that hold a letter, digit or CJK character"),
    ("fullwidth_punct_share", "full-width punctuation marks / all punctuation marks (ASCII + full-width); "
                              "undefined for a text without punctuation (left out of its means)"),
    ("punct_rate", "punctuation marks (ASCII + full-width) per 100 characters"),
    ("excl_fullwidth_rate", "'！' per 100 characters"),
    ("excl_ascii_rate", "'!' per 100 characters"),
    ("question_fullwidth_rate", "'？' per 100 characters"),
    ("question_ascii_rate", "'?' per 100 characters"),
    ("ellipsis_fullwidth_rate", "'…' characters per 100 characters ('……' counts 2)"),
    ("ellipsis_ascii_rate", "runs of 2+ '.' ('..', '...') per 100 characters"),
    ("tilde_fullwidth_rate", "'～' (U+FF5E) and '〜' (U+301C) per 100 characters"),
    ("tilde_ascii_rate", "'~' per 100 characters"),
    ("repeated_marks_rate", "runs of repeated marks per 100 characters: 2+ of ！!？? mixed, 2+ 。, 2+ ～~〜, 2+ ，, "
                            "2+ ',', 4+ '.', 3+ '…'"),
    ("latin_share", "latin letters (A-Z, a-z, Latin-1/Extended letters) / characters"),
    ("digit_share", "digits (0-9 and full-width ０-９) / characters"),
    ("emoji_rate", "emoji (U+1F000-U+1FAFF, U+2300-U+27BF, U+2B00-U+2BFF) per 100 characters"),
    ("whitespace_rate", "inner whitespace characters (spaces, newlines) per 100 characters"),
)
FEATURE_NAMES = tuple(name for name, _ in STYLE_FEATURES)


def text_features(text: str) -> dict[str, float]:
    """The :data:`STYLE_FEATURES` of one text (``fullwidth_punct_share`` is NaN without punctuation)."""
    return dict(zip(FEATURE_NAMES, _feature_row(text), strict=True))


def _feature_row(text: str) -> list[float]:
    t = text.strip() if isinstance(text, str) else ""
    n = len(t)
    if n == 0:
        return [0.0, 0.0, math.nan] + [0.0] * (len(FEATURE_NAMES) - 3)
    classes = t.translate(_PUNCT_CLASS)
    full, ascii_ = classes.count("f"), classes.count("a")
    per100 = 100.0 / n
    sentences = sum(1 for part in _SENTENCE_END_RE.split(t) if _WORDLIKE_RE.search(part))
    return [
        float(n),
        float(sentences),
        full / (full + ascii_) if full + ascii_ else math.nan,
        (full + ascii_) * per100,
        t.count("！") * per100,
        t.count("!") * per100,
        t.count("？") * per100,
        t.count("?") * per100,
        t.count("…") * per100,
        len(_ASCII_ELLIPSIS_RE.findall(t)) * per100,
        (t.count("～") + t.count("〜")) * per100,
        t.count("~") * per100,
        len(_REPEAT_RE.findall(t)) * per100,
        len(_LATIN_RE.findall(t)) / n,
        len(_DIGIT_RE.findall(t)) / n,
        len(_EMOJI_RE.findall(t)) * per100,
        sum(1 for ch in t if ch.isspace()) * per100,
    ]


def feature_matrix(texts: Sequence[str]) -> np.ndarray:
    """``len(texts) x len(FEATURE_NAMES)`` float64 matrix of :func:`text_features` (NaN = undefined)."""
    return np.array([_feature_row(t) for t in texts], dtype=np.float64).reshape(len(texts), len(FEATURE_NAMES))


def group_codes(keys: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Dense codes 0..U-1 in first-appearance order, and the keys in that order."""
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(keys))
    return codes, list(index)


def _group_means(values: np.ndarray, codes: np.ndarray, groups: int) -> np.ndarray:
    """Per group and column: mean of the defined (non-NaN) values; NaN where a group has none."""
    defined = ~np.isnan(values)
    out = np.empty((groups, values.shape[1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        for j in range(values.shape[1]):
            sums = np.bincount(codes, weights=np.where(defined[:, j], values[:, j], 0.0), minlength=groups)
            counts = np.bincount(codes, weights=defined[:, j].astype(np.float64), minlength=groups)
            out[:, j] = sums / counts
    return out


def _nanstd(values: np.ndarray) -> np.ndarray:
    """Population std per column over defined values; NaN for a column without any."""
    out = np.full(values.shape[1], math.nan)
    for j in range(values.shape[1]):
        col = values[:, j][~np.isnan(values[:, j])]
        if len(col):
            out[j] = float(col.std())
    return out


def reference_scale(reference_features: np.ndarray) -> np.ndarray:
    """Per feature: the population std of the real test references (all users together)."""
    return _nanstd(reference_features)


def style_distance(outputs: Sequence[str] | np.ndarray, references: Sequence[str] | np.ndarray,
                   intended_users: Sequence[Hashable], scale: np.ndarray | None = None) -> dict[str, Any]:
    """Standardised mean absolute difference between the outputs' and the references' features, per user.

    For user u and feature f: ``|mean_u(output f) - mean_u(reference f)| / s_f``, where ``s_f`` is the std of f
    over all real test references (``scale``; computed from ``references`` if not given); where that is 0 or
    undefined, the std of this system's outputs and the references pooled; where that is 0 too, both sides are
    the same constant and the term is 0. A term is undefined (left out) when one side has no defined value
    (``fullwidth_punct_share`` of a user whose outputs carry no punctuation). User distance = mean of its
    defined terms; ``style_distance`` = mean of user distances weighted by the user's test samples.
    ``outputs`` / ``references`` may be texts or :func:`feature_matrix` results.
    Returns ``style_distance`` and, per feature, ``system_mean`` / ``reference_mean`` (over all samples,
    defined values) and ``distance`` (its sample-weighted mean term).
    """
    out_f = outputs if isinstance(outputs, np.ndarray) else feature_matrix(outputs)
    ref_f = references if isinstance(references, np.ndarray) else feature_matrix(references)
    if not (len(out_f) == len(ref_f) == len(intended_users)):
        raise ValueError(f"{len(out_f)} outputs, {len(ref_f)} references, {len(intended_users)} users")
    if len(ref_f) == 0:
        raise ValueError("no test samples")
    codes, _ = group_codes(intended_users)
    groups = int(codes.max()) + 1
    weights = np.bincount(codes, minlength=groups).astype(np.float64)
    s = reference_scale(ref_f) if scale is None else np.asarray(scale, dtype=np.float64)
    pooled = _nanstd(np.vstack([out_f, ref_f]))
    s = np.where(np.isnan(s) | (s <= 0), pooled, s)
    diff = np.abs(_group_means(out_f, codes, groups) - _group_means(ref_f, codes, groups))
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(s > 0, diff / s, np.where(np.isnan(diff), np.nan, 0.0))
    defined = ~np.isnan(terms)
    per_user = np.where(defined.any(axis=1),
                        np.nansum(terms, axis=1) / np.maximum(defined.sum(axis=1), 1), np.nan)
    total = float(np.nansum(per_user * weights) / weights[~np.isnan(per_user)].sum())
    features = {}
    for j, name in enumerate(FEATURE_NAMES):
        w = weights[defined[:, j]]
        features[name] = {
            "system_mean": finite_values(np.nanmean(out_f[:, j]) if (~np.isnan(out_f[:, j])).any() else math.nan),
            "reference_mean": finite_values(np.nanmean(ref_f[:, j]) if (~np.isnan(ref_f[:, j])).any() else math.nan),
            "distance": finite_values(float((terms[defined[:, j], j] * w).sum() / w.sum()) if w.size else math.nan),
        }
    return {"style_distance": total, "style_features": features, "_per_user": per_user, "_codes": codes,
            "_scale": s}


def finite_values(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x
