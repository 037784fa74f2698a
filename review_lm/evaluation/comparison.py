"""Tables of scores and the comparison of evaluated runs (``evaluate_movie_review.py --compare``)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from review_lm.evaluation import sample_stats
from review_lm.evaluation.metrics import METRICS, SCORE_KEYS
from review_lm.evaluation.style_report import COLUMNS as STYLE_COLUMNS
from review_lm.evaluation.style_report import TABLE_LEGEND
from review_lm.runs import run_folder
from review_lm.runs.run_folder import EVAL_DIR, METRICS_FILE, read_json
from review_lm.utils import UsageError, pyplot, write_atomic

ONE_DECIMAL = ("avg_length", "attribution", "copy_rate")
THREE_DECIMALS = ("style_distance",)


def format_value(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if key in ONE_DECIMAL else f"{value:.3f}" if key in THREE_DECIMALS else f"{value:.2f}"


def has_style(rows: Sequence[tuple[str, dict[str, float] | None]]) -> bool:
    """Any row with a style number (metrics.json files written before the style metrics have none)."""
    return any((values or {}).get(key) is not None for _, values in rows for key, _ in STYLE_COLUMNS)


def format_cell(key: str, value: float | None, ci: Sequence[float] | None) -> str:
    """``score ±half-width`` of its 95% interval when there is one (review_lm.evaluation.bootstrap), else the score."""
    text = format_value(key, value)
    if ci is None or text == "-":
        return text
    return f"{text} ±{format_value(key, max(0.0, (ci[1] - ci[0]) / 2))}"  # max: float noise at 100 gives -0.00


def markdown_table(rows: Sequence[tuple[str, dict[str, float] | None]],
                   intervals: dict[str, dict[str, Sequence[float] | None]] | None = None) -> str:
    """One row per (name, metrics); a metric missing from a row shows as "-". The style columns (attribution,
    copy rate, style distance) are shown when any row has one of them. ``intervals``: row name -> score ->
    [low, high], shown as ``±half-width``."""
    columns = [*METRICS, *(STYLE_COLUMNS if has_style(rows) else ())]
    header = "| run | " + " | ".join(title for _, title in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [header, rule]
    for name, values in rows:
        found = (intervals or {}).get(name) or {}
        cells = [format_cell(key, (values or {}).get(key), found.get(key)) for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_rows(metrics: dict[str, Any], model_name: str = "model") -> list[tuple[str, dict[str, float]]]:
    """Rows of one metrics.json: the model (if evaluated), each baseline, the references' own stats (their
    attribution is the ceiling) and, when attribution was measured, its chance level."""
    rows = []
    if metrics.get("model"):
        rows.append((model_name, metrics["model"]))
    for name, values in (metrics.get("baselines") or {}).items():
        rows.append((f"baseline: {name}", values))
    if metrics.get("references"):
        rows.append(("reference", metrics["references"]))
    chance = (metrics.get("style") or {}).get("attribution_chance")
    if chance is not None:
        rows.append(("chance", {"attribution": chance}))
    return rows


def interval_rows(metrics: dict[str, Any], model_name: str = "model") -> dict[str, dict[str, Any]]:
    """Row name (as in :func:`table_rows`) -> score -> [low, high], from metrics.json's "intervals"."""
    section = metrics.get("intervals") or {}
    out = {f"baseline: {name}": v for name, v in (section.get("baselines") or {}).items()}
    if section.get("model"):
        out[model_name] = section["model"]
    return out


def find_metrics_file(path: str) -> str:
    """DIR may be a run folder (DIR/eval/metrics.json), an eval folder (DIR/metrics.json) or the file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such file or directory")
    for candidate in (os.path.join(path, METRICS_FILE), os.path.join(path, EVAL_DIR, METRICS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    raise UsageError(f"{path}: no {METRICS_FILE} here or in {os.path.join(path, EVAL_DIR)} "
                     "(run evaluate_movie_review.py --model_dir on it first)")


def run_name(metrics_path: str) -> str:
    """The run folder's name: the folder holding ``eval/`` (or holding metrics.json if it is not in eval/)."""
    folder = os.path.dirname(os.path.abspath(metrics_path))
    if os.path.basename(folder) == EVAL_DIR:
        folder = os.path.dirname(folder)
    return os.path.basename(folder) or folder


def load_metrics(path: str) -> dict[str, Any]:
    metrics_path = find_metrics_file(path)
    data = read_json(metrics_path)
    if not (isinstance(data, dict) and "model" in data and isinstance(data.get("baselines"), dict)
            and (data["model"] is None or isinstance(data["model"], dict))):
        raise UsageError(f"{metrics_path}: not a metrics.json written by evaluate_movie_review.py")
    data["_path"], data["_name"] = metrics_path, run_name(metrics_path)
    return data


def unique_names(names: Sequence[str]) -> list[str]:
    """Two runs in folders of the same name (a/exp, b/exp) get "exp" and "exp (2)"."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def comparison_rows(runs: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, float] | None]]:
    """Each run's model scores, then the first run's baselines and reference statistics."""
    names = unique_names([r["_name"] for r in runs])
    rows: list[tuple[str, dict[str, float] | None]] = [(n, r["model"]) for n, r in zip(names, runs, strict=True)]
    rows += [row for row in table_rows(runs[0]) if row[0] != "model"]
    return rows


def error_bars(values: dict[str, float], found: dict[str, Any], keys: Sequence[str]) -> list[list[float]] | None:
    """matplotlib ``yerr`` (below, above) of each key's bar from its [low, high]; None when no key has one."""
    below, above = [], []
    for key in keys:
        ci, value = found.get(key), values.get(key)
        ok = ci is not None and value is not None
        below.append(max(0.0, value - ci[0]) if ok else 0.0)
        above.append(max(0.0, ci[1] - value) if ok else 0.0)
    return [below, above] if any(below) or any(above) else None


def _plot_style(ax_share, ax_distance, bars: Sequence[tuple[str, dict[str, float]]], reference: dict[str, float],
                chance: float | None, intervals: dict[str, dict[str, Any]] | None = None) -> None:
    """Attribution and copy rate (0-100) with the ceiling and chance marked; style distance on its own axis."""
    shares = [("attribution", "attribution"), ("copy_rate", "copy rate")]
    width = 0.8 / max(1, len(bars))
    for j, (name, values) in enumerate(bars):
        hatch = "//" if name.startswith("baseline") else None
        offset = (j - (len(bars) - 1) / 2) * width
        found = (intervals or {}).get(name) or {}
        ax_share.bar([i + offset for i in range(len(shares))], [values.get(k) or 0.0 for k, _ in shares], width,
                     hatch=hatch, color=f"C{j}", yerr=error_bars(values, found, [k for k, _ in shares]), capsize=2)
        ax_distance.bar([offset], [values.get("style_distance") or 0.0], width, hatch=hatch, color=f"C{j}",
                        yerr=error_bars(values, found, ["style_distance"]), capsize=2)
    if reference.get("attribution") is not None:
        ax_share.hlines(reference["attribution"], -0.45, 0.45, colors="black", linestyles="--",
                        label="ceiling (real test reviews)")
    if chance is not None:
        ax_share.hlines(chance, -0.45, 0.45, colors="grey", linestyles=":", label="chance")
    if reference.get("copy_rate") is not None:
        ax_share.hlines(reference["copy_rate"], 0.55, 1.45, colors="black", linestyles="--")
    ax_share.set_xticks(range(len(shares)), [t for _, t in shares])
    ax_share.set_ylabel("% of outputs")
    ax_share.set_ylim(0, 118)  # room above 100 % for the legend
    ax_share.set_yticks(range(0, 101, 20))
    ax_share.grid(axis="y", alpha=0.3)
    ax_share.legend(fontsize="small", loc="upper center", ncol=2)
    ax_distance.set_xticks([0], ["style distance"])
    ax_distance.set_ylabel("std. deviations (0 = real reviews)")
    ax_distance.grid(axis="y", alpha=0.3)


def plot_comparison(path: str, rows: Sequence[tuple[str, dict[str, float] | None]],
                    intervals: dict[str, dict[str, Any]] | None = None) -> None:
    """Grouped bars: scores (0-100) on the left, average length (characters) on its own axis on the right;
    error bars: each bar's 95% bootstrap interval (``intervals``: row name -> score -> [low, high])."""
    plt = pyplot()
    bars = [(name, values or {}) for name, values in rows if name not in ("reference", "chance")]
    reference = dict(rows).get("reference") or {}
    style = has_style(rows)
    ratios = [6, 1.4, *([2.4, 1.4] if style else [])]
    fig, axes = plt.subplots(1, len(ratios), figsize=(13 + (6 if style else 0), 5),
                             gridspec_kw={"width_ratios": ratios})
    ax_scores, ax_len = axes[0], axes[1]
    if style:
        _plot_style(axes[2], axes[3], bars, reference, (dict(rows).get("chance") or {}).get("attribution"),
                    intervals)
    score_metrics = [(k, t) for k, t in METRICS if k in SCORE_KEYS]
    width = 0.8 / max(1, len(bars))
    for j, (name, values) in enumerate(bars):
        hatch = "//" if name.startswith("baseline") else None
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(score_metrics))]
        heights = [values.get(k) or 0.0 for k, _ in score_metrics]
        found = (intervals or {}).get(name) or {}
        ax_scores.bar(xs, heights, width, label=name, hatch=hatch, color=f"C{j}",
                      yerr=error_bars(values, found, [k for k, _ in score_metrics]), capsize=2)
        ax_len.bar([(j - (len(bars) - 1) / 2) * width], [values.get("avg_length") or 0.0], width, hatch=hatch,
                   color=f"C{j}", yerr=error_bars(values, found, ["avg_length"]), capsize=2)
    ax_scores.set_xticks(range(len(score_metrics)), [t for _, t in score_metrics])
    ax_scores.set_ylabel("score (0-100)")
    ax_scores.grid(axis="y", alpha=0.3)
    for i, (key, _) in enumerate(score_metrics):  # what the references themselves reach (distinct-n only)
        if reference.get(key) is not None:
            ax_scores.hlines(reference[key], i - 0.45, i + 0.45, colors="black", linestyles="--",
                             label="reference" if key == "distinct_1" else None)
    ax_scores.legend(fontsize="small")
    if reference.get("avg_length") is not None:
        ax_len.axhline(reference["avg_length"], color="black", linestyle="--", label="reference")
        ax_len.legend(fontsize="small")
    ax_len.set_xticks([0], ["avg length"])
    ax_len.set_ylabel("characters")
    ax_len.grid(axis="y", alpha=0.3)
    fig.suptitle("Movie-review generation: model runs vs. baselines")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def compare(paths: Sequence[str], out_png: str) -> int:
    runs = [load_metrics(p) for p in paths]  # validates every input before anything is written
    out_dir = os.path.dirname(os.path.abspath(out_png))
    if not os.path.isdir(out_dir):
        raise UsageError(f"{out_png}: folder {out_dir} does not exist")
    digests = {r.get("references_sha256") for r in runs}
    if len(digests) > 1:
        print("warning: the runs were scored on different test sets; their scores are not comparable",
              file=sys.stderr)
    rows = comparison_rows(runs)
    intervals = comparison_intervals(runs)
    print(markdown_table(rows, intervals))
    if has_style(rows):
        print(TABLE_LEGEND)
    if any(intervals.values()):
        print("±: half-width of each run's own 95% bootstrap interval")
    differences, notes = paired_differences(runs)
    if differences:
        print(f"\ndifference to {unique_names([r['_name'] for r in runs])[0]} (paired 95% bootstrap on the same "
              "test samples; * = the interval excludes 0):")
        print(difference_table(differences))
    if notes:
        print("\n" + "\n".join(f"note: {note}" for note in notes))
    plot_comparison(out_png, rows, intervals)
    print(f"\nchart: {out_png}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Intervals in the comparison
# --------------------------------------------------------------------------------------------------------------
def comparison_intervals(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Row name -> score -> [low, high]: each run's model, then the first run's baselines."""
    names = unique_names([r["_name"] for r in runs])
    out = {name: (run.get("intervals") or {}).get("model") or {} for name, run in zip(names, runs, strict=True)}
    out.update({k: v for k, v in interval_rows(runs[0]).items() if k != "model"})
    return out


def paired_differences(runs: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Each later run's model minus the first run's, with a paired bootstrap interval over the same resampled
    test samples (sample_scores.npz beside each metrics.json); notes for runs that cannot be paired."""
    import numpy as np

    from review_lm.evaluation import bootstrap

    names = unique_names([r["_name"] for r in runs])
    if len(runs) < 2:
        return [], []

    def scores_of(run: dict[str, Any]):
        folder = os.path.dirname(run["_path"])
        return sample_stats.load_sample_scores(os.path.join(folder, run_folder.SAMPLE_SCORES_FILE))

    first = scores_of(runs[0])
    if first is None or "model" not in first[0]:
        return [], [f"{names[0]}: no {run_folder.SAMPLE_SCORES_FILE} with a model beside its metrics.json "
                    "(evaluated without --bootstrap or by an older version): no paired intervals"]
    systems, codes, digest = first
    section = runs[0].get("intervals") or {}
    resamples, seed = section.get("resamples") or bootstrap.DEFAULT_RESAMPLES, section.get("seed", 42)
    counts = bootstrap.resample_counts(np.asarray(codes), resamples, seed)
    out, notes = [], []
    for name, run in zip(names[1:], runs[1:], strict=True):
        other = scores_of(run)
        if other is None or "model" not in other[0]:
            notes.append(f"{name}: no {run_folder.SAMPLE_SCORES_FILE} with a model: no paired interval")
        elif other[2] != digest:
            notes.append(f"{name}: scored on other test samples than {names[0]}: no paired interval")
        else:
            out.append((name, bootstrap.paired_differences(bootstrap.draw_stats(systems),
                                                           bootstrap.draw_stats(other[0]), counts,
                                                           np.asarray(codes))))
    return out, notes


def difference_table(differences: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """| run | BLEU | ... | with ``+d [low, high]`` cells, ``*`` where the interval excludes 0."""
    columns = [(k, t) for k, t in (*METRICS, *STYLE_COLUMNS) if any(k in d for _, d in differences)]
    lines = ["| run | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, found in differences:
        cells = []
        for key, _ in columns:
            d = found.get(key)
            if d is None or d["interval"] is None:
                cells.append("-")
                continue
            low, high = (format_value(key, v) for v in d["interval"])
            sign = "+" if d["difference"] >= 0 else ""
            cells.append(f"{sign}{format_value(key, d['difference'])} [{low}, {high}]" + ("*" if d["significant"]
                                                                                        else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
