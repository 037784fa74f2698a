"""The style metrics of one evaluation: does each system write like *this* user? (glue for evaluation)

Evaluation hands over its test set (:class:`~review_lm.runs.test_set.SampleSet`) and every system's outputs (the
model or a predictions file under the name ``model``, and the baselines); :func:`style_metrics` scores them all
on the same test samples with :class:`review_lm.evaluation.style.StyleEvaluator` (attribution, stylometry, copying; the
exact rules are in :func:`review_lm.evaluation.style.definitions`, which evaluation writes into metrics.json):

* the attribution classifier is trained only on the reviews each test user wrote before the test split
  (``SampleSet.reviews_before_test``) plus the optional ``--style_pool`` users (negatives only, never intended);
* copying is checked against each sample's own earlier reviews (``SampleSet.earlier_reviews``);
* per system, the numbers in :data:`SYSTEM_KEYS` join its entry of metrics.json (``model``, ``baselines.NAME``,
  ``references`` = the real test reviews: their attribution is the ceiling); the rest (chance, the classifier,
  per-feature values, the per-user table, the pool) goes to metrics.json's ``style`` section.

:func:`load_style_pool` reads ``--style_pool`` with the data loader; pool users that are test users (the same
name, or sharing a test review of :data:`POOL_MATCH_MIN_CHARS`+ characters: the test data itself given as pool)
are left out, so a test review never becomes training text for attribution.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from review_lm.data.reviews import ReviewDataError, load_review_data
from review_lm.evaluation import style
from review_lm.runs.test_set import SampleSet
from review_lm.utils import UsageError, write_atomic

# Per-system numbers that join each system's entry of metrics.json.
SYSTEM_KEYS = ("attribution", "attribution_shuffled", "copy_rate", "copy_overlap_mean", "style_distance")
# (key, column title): the style columns of the summary and --compare tables, after the overlap metrics.
COLUMNS = (("attribution", "attribution"), ("copy_rate", "copy rate"), ("style_distance", "style dist."))
TABLE_LEGEND = ("attribution: % of outputs that a classifier trained on each user's earlier reviews gives to the "
                "intended user\n  (reference = the ceiling: the real test reviews; chance = 100 / candidate users)\n"
                "copy rate: % near-copies (char ROUGE-L F1 >= 0.8) of one of the user's earlier reviews\n"
                "style dist.: style features vs the real test reviews, in their standard deviations (0 = the same)")
POOL_MATCH_MIN_CHARS = 8  # a pool user sharing a test review this long is the test user again
PER_USER_SHOWN = 30  # rows of the printed per-user table (all users are in metrics.json)


# --------------------------------------------------------------------------------------------------------------
# --style_pool
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StylePool:
    by_user: dict[tuple[str, int], list[str]]  # ("pool", global user index) -> review texts, oldest first
    files: list[str]
    left_out: list[str] = field(default_factory=list)  # names of pool users left out as test users

    def describe(self) -> dict[str, Any]:
        return {"files": self.files, "users": len(self.by_user), "left_out_as_test_users": self.left_out,
                "rule": f"a pool user with a test user's name, or sharing a test review of at least "
                        f"{POOL_MATCH_MIN_CHARS} characters, is left out; the others are negative-only classes"}

    def note(self) -> str:
        left = (f" ({len(self.left_out)} left out: the same as a test user)" if self.left_out else "")
        return f"style pool: {len(self.by_user)} other users from {len(self.files)} file(s) as negatives{left}"


def load_style_pool(paths: Sequence[str] | None, test: SampleSet) -> StylePool | None:
    """The ``--style_pool`` files/folders (the review JSON format), read with the data loader; None without."""
    if not paths:
        return None
    try:
        data = load_review_data(list(paths))
    except ReviewDataError as err:
        raise UsageError(f"--style_pool: {err}") from None
    test_names = {s.get("user") for s in test.samples}
    references = {r.strip() for r in test.references if len(r.strip()) >= POOL_MATCH_MIN_CHARS}
    pool = StylePool({}, data.files or [data.path])
    for user in data.users:
        texts = [r.text for r in user.reviews]
        if user.name in test_names or references.intersection(texts):
            pool.left_out.append(user.name)
        elif texts:
            pool.by_user[("pool", user.index)] = texts
    return pool


# --------------------------------------------------------------------------------------------------------------
# Scoring every system
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StyleResult:
    systems: dict[str, dict[str, Any]]  # system name -> SYSTEM_KEYS numbers
    reference: dict[str, Any]  # the same numbers for the real test reviews (attribution = the ceiling)
    section: dict[str, Any]  # metrics.json "style"
    notes: list[str]  # one line each, for the terminal
    per_user_table: str | None  # markdown, the main system's per-user rows (several users only)
    evaluator: style.StyleEvaluator | None = field(default=None, repr=False)
    figure_systems: dict[str, Sequence[str]] = field(default_factory=dict, repr=False)
    confusion_system: str | None = None
    user_labels: dict[Hashable, str] = field(default_factory=dict, repr=False)

    def write_figure(self, path: str) -> None:
        """The PNG (lengths, punctuation marks, attribution confusion of the main system), written atomically."""
        if self.evaluator is None:
            return
        write_atomic(path, lambda tmp: self.evaluator.plot(tmp, self.figure_systems, self.confusion_system,
                                                               user_labels=self.user_labels))


def style_metrics(test: SampleSet, systems: Mapping[str, Sequence[str]], main: str | None, main_label: str,
                  pool: StylePool | None, seed: int, rouge_l: Mapping[str, Sequence[float]],
                  figure_name: str) -> StyleResult:
    """Score ``systems`` (name -> one output per test sample; ``main`` = the model's name among them, if any).

    ``rouge_l``: per system, each sample's ROUGE-L F1 (0-1), for the per-user table; ``main_label`` names the
    main system in the figure and tables ("model" or "predictions").
    """
    if not test.has_history:
        return StyleResult({}, {}, {"skipped_reason": "the test samples carry no earlier reviews"},
                           ["style metrics not measured: the test samples carry no earlier reviews"], None)
    started = time.time()
    users = test.user_keys()
    evaluator = style.StyleEvaluator(users, test.references, test.all_earlier_reviews(), test.reviews_before_test(),
                                     pool.by_user if pool else None, seed=seed)
    several = len(set(users)) > 1
    names = _user_names(test.samples)
    scores: dict[str, dict[str, Any]] = {}
    features: dict[str, Any] = {}
    per_user: dict[str, list[dict[str, Any]]] = {}
    for name, outputs in systems.items():
        numbers, rows = evaluator.score_and_rows(outputs)
        scores[name] = {k: numbers[k] for k in SYSTEM_KEYS}
        features[name] = numbers["style_features"]
        per_user[name] = _named_rows(rows, names, users, rouge_l.get(name))
    reference = {k: evaluator.reference_scores[k] for k in SYSTEM_KEYS}
    reference_rows = _named_rows(evaluator.reference_rows, names, users, None)

    notes = [pool.note()] if pool else []
    if evaluator.skipped_reason:
        hint = "" if pool else " (--style_pool FILE|DIR)"
        notes.append(f"attribution not measured: {evaluator.skipped_reason}{hint}")
    section = {
        **evaluator.summary(),
        "pool": pool.describe() if pool else None,
        "seed": seed,
        "style_features": _by_system(features, main),
        "per_user": ({**_by_system(per_user, main), "references": reference_rows} if several else None),
        "figure": figure_name,
        "runtime_s": round(time.time() - started, 2),
    }
    table = per_user_table(per_user[main], reference_rows) if several and main in per_user else None
    labelled = {(main_label if name == main else f"baseline: {name}"): outputs for name, outputs in systems.items()}
    confusion = main_label if main in systems else next(iter(labelled), None)
    labels = {key: f"#{key} {name}" if isinstance(key, int) else name for key, name in names.items()}
    return StyleResult(scores, reference, section, notes, table, evaluator, labelled, confusion, labels)


def _by_system(values: dict[str, Any], main: str | None) -> dict[str, Any]:
    """{"model": ..., "baselines": {name: ...}}: the layout of metrics.json's score entries."""
    return {"model": values.get(main) if main else None,
            "baselines": {name: v for name, v in values.items() if name != main}}


def _user_names(samples: Sequence[Mapping[str, Any]]) -> dict[Hashable, str]:
    return {SampleSet.user_key(s): str(s.get("user", SampleSet.user_key(s))) for s in samples}


def _named_rows(rows: list[dict[str, Any]], names: Mapping[Hashable, str], users: Sequence[Hashable],
                rouge_l: Sequence[float] | None) -> list[dict[str, Any]]:
    """The core's per-user rows with the user's name and index, and (when given) the user's mean ROUGE-L."""
    sums: dict[Hashable, float] = {}
    if rouge_l is not None:
        for user, value in zip(users, rouge_l, strict=True):
            sums[user] = sums.get(user, 0.0) + value
    out = []
    for row in rows:
        key = row["user"]
        named = {"user": names.get(key, str(key)), "user_index": key if isinstance(key, int) else None,
                 **{k: v for k, v in row.items() if k != "user"}}
        if rouge_l is not None:
            named["rougeL"] = 100.0 * sums[key] / row["test_samples"]
        out.append(named)
    return out


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def per_user_table(rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]],
                   shown: int = PER_USER_SHOWN) -> str:
    """Markdown: one line per user (most test samples first, at most ``shown``), the real reviews' attribution
    beside the system's."""
    ceiling = {r["user"] + str(r["user_index"]): r["attribution"] for r in reference_rows}
    order = sorted(rows, key=lambda r: -r["test_samples"])
    lines = ["| user | test samples | attribution | attribution of real reviews | copy rate | style dist. | ROUGE-L |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in order[:shown]:
        lines.append(f"| {r['user']} | {r['test_samples']} | {_cell(r['attribution'])} | "
                     f"{_cell(ceiling.get(r['user'] + str(r['user_index'])))} | {_cell(r['copy_rate'])} | "
                     f"{_cell(r['style_distance'], 3)} | {_cell(r.get('rougeL'), 2)} |")
    if len(order) > shown:
        lines.append(f"({len(order) - shown} more users in metrics.json)")
    return "\n".join(lines)
