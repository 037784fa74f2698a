"""Per-sample statistics of one system's outputs: what every headline score is made of, kept so that the
bootstrap (``review_lm.evaluation.bootstrap``) can resample test samples without re-scoring any text, and so that
``--compare`` can pair two runs on the same samples (``sample_scores.npz`` beside metrics.json).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SampleStats:
    """Everything a replicate of one system's scores needs, one row per test sample (in test order)."""
    bleu: np.ndarray  # (n, 2 + 2 * 4): sys_len, ref_len, correct 1-4, total 1-4 (sacrebleu's segment statistics)
    chrf: np.ndarray  # (n, 3 * 6): hyp, ref, match counts per char order
    rouge: dict[str, np.ndarray]  # rouge1/2/L F1 (0-1)
    length: np.ndarray  # characters
    ngrams: dict[int, tuple[np.ndarray, np.ndarray]]  # n -> (per-sample offsets (n+1,), n-gram ids): distinct-n
    attribution: np.ndarray | None = None  # 1 hit, 0 miss, NaN not attributable; None without attribution
    copy: np.ndarray | None = None  # 1 near-copy, 0 not
    features: np.ndarray | None = None  # (n, f) style features
    reference_features: np.ndarray | None = None
    scale: np.ndarray | None = None  # (f,) the std used by style_distance
    extra: dict[str, Any] = field(default_factory=dict)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat name -> array, for ``np.savez``."""
        out = {f"{prefix}bleu": self.bleu, f"{prefix}chrf": self.chrf, f"{prefix}length": self.length}
        out.update({f"{prefix}{k}": v for k, v in self.rouge.items()})
        for n, (offsets, ids) in self.ngrams.items():
            out[f"{prefix}ngram{n}_offsets"], out[f"{prefix}ngram{n}_ids"] = offsets, ids
        for name in ("attribution", "copy", "features", "reference_features", "scale"):
            if getattr(self, name) is not None:
                out[f"{prefix}{name}"] = getattr(self, name)
        return out

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray], prefix: str) -> SampleStats:
        def get(name: str) -> np.ndarray | None:
            return data[prefix + name] if prefix + name in data else None

        ngrams = {n: (data[f"{prefix}ngram{n}_offsets"], data[f"{prefix}ngram{n}_ids"]) for n in (1, 2)}
        return cls(data[prefix + "bleu"], data[prefix + "chrf"], {k: data[prefix + k] for k in ROUGE},
                   data[prefix + "length"], ngrams, get("attribution"), get("copy"), get("features"),
                   get("reference_features"), get("scale"))


ROUGE = ("rouge1", "rouge2", "rougeL")


def _ngram_ids(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per text, ids of its n-grams (ids dense within this call), as CSR offsets + ids."""
    from review_lm.evaluation.metrics import CharTokenizer

    tokenizer, index = CharTokenizer(), {}
    offsets, ids = [0], []
    for text in texts:
        units = tokenizer.tokenize(text)
        ids.extend(index.setdefault(tuple(units[i:i + n]), len(index)) for i in range(len(units) - n + 1))
        offsets.append(len(ids))
    return np.asarray(offsets, dtype=np.int64), np.asarray(ids, dtype=np.int64)


def sample_statistics(outputs: Sequence[str], references: Sequence[str],
                      rouge: Mapping[str, Sequence[float]] | None = None) -> SampleStats:
    """Per-sample statistics of the overlap metrics (:mod:`review_lm.evaluation.metrics`' settings).

    BLEU: each sample's ``BLEU(tokenize="zh").corpus_score`` fields (sys_len, ref_len, counts, totals: what a
    corpus score sums; ~60 us a sample). chrF: per char order, hypothesis / reference / matching n-gram counts
    from sacrebleu's ``extract_all_char_ngrams`` with CHRF()'s settings (CHRF keeps its own statistics
    private). Both checked against ``corpus_score`` in the tests, so a change in sacrebleu shows there.
    """
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.metrics.helpers import extract_all_char_ngrams

    from review_lm.evaluation.metrics import sample_rouge

    outputs, references = list(outputs), list(references)
    rouge = sample_rouge(outputs, references) if rouge is None else rouge
    scorer, settings = BLEU(tokenize="zh"), CHRF()
    bleu, chrf = [], []
    for output, reference in zip(outputs, references, strict=True):
        one = scorer.corpus_score([output], [[reference]])
        bleu.append([one.sys_len, one.ref_len, *one.counts, *one.totals])
        row = []
        hyp_grams = extract_all_char_ngrams(output, settings.char_order, settings.whitespace)
        ref_grams = extract_all_char_ngrams(reference, settings.char_order, settings.whitespace)
        for hyp, ref in zip(hyp_grams, ref_grams, strict=True):
            row += [sum(hyp.values()), sum(ref.values()), sum((hyp & ref).values())]
        chrf.append(row)
    bleu_stats, chrf_stats = np.asarray(bleu, dtype=np.float64), np.asarray(chrf, dtype=np.float64)
    return SampleStats(bleu_stats.reshape(len(outputs), -1), chrf_stats.reshape(len(outputs), -1),
                       {k: np.asarray(rouge[k], dtype=np.float64) for k in ROUGE},
                       np.asarray([len(t) for t in outputs], dtype=np.float64),
                       {n: _ngram_ids(outputs, n) for n in (1, 2)})


def add_style(stats: SampleStats, per_sample: Mapping[str, Any]) -> SampleStats:
    """Attach :meth:`review_lm.evaluation.style.StyleEvaluator.per_sample` results."""
    stats.attribution = per_sample.get("attribution")
    stats.copy = per_sample["copy"]
    stats.features = per_sample["features"]
    stats.reference_features = per_sample["reference_features"]
    stats.scale = per_sample["scale"]
    return stats


def save_sample_scores(path: str, systems: Mapping[str, SampleStats], codes: np.ndarray,
                       references_sha256: str) -> None:
    """All systems' statistics in one npz (written atomically: a tmp file renamed into place)."""
    arrays: dict[str, np.ndarray] = {"user_codes": np.asarray(codes, dtype=np.int64),
                                     "references_sha256": np.asarray(references_sha256),
                                     "systems": np.asarray(list(systems))}
    for name, stats in systems.items():
        arrays.update(stats.arrays(f"{name}/"))
    tmp = f"{path}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_sample_scores(path: str) -> tuple[dict[str, SampleStats], np.ndarray, str] | None:
    """(systems, user codes, references digest) from :func:`save_sample_scores`; None when absent (older runs)."""
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    systems = {str(name): SampleStats.from_arrays(arrays, f"{name}/") for name in arrays["systems"]}
    return systems, arrays["user_codes"], str(arrays["references_sha256"])
