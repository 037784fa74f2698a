"""Evaluate a trained movie-review model on its held-out test set, next to two model-free baselines.

    python evaluate_movie_review.py --model_dir outputs/exp1_full            # generate + score
    python evaluate_movie_review.py --model_dir outputs/exp1_full --baselines_only
    python evaluate_movie_review.py --compare outputs/exp1_full outputs/exp4_baseline

Input: ``test_samples.json`` written by ``train_distributed_MovieReview.py`` (a list of
``data_loader_movie_review.sample_record`` dicts). Each prompt is fed exactly as training saw it
(``tokenizer(prompt, add_special_tokens=False)``) and the model continues it with one review, up to EOS.

Output (``MODEL_DIR/eval/`` or ``--output_dir``): ``predictions.jsonl`` (one line per test sample: reference,
prediction, baseline outputs) and ``metrics.json`` (scores plus exactly how each was computed). metrics.json is
written last, so its presence means the evaluation finished.

Scores (all on a 0-100 scale, except lengths in characters):
  * BLEU-4: sacrebleu corpus BLEU, ``tokenize="zh"`` (every CJK character is a word, latin text is split
    like 13a), exponential smoothing.
  * chrF: sacrebleu corpus chrF (character 6-grams, beta 2, whitespace ignored).
  * ROUGE-1/2/L F1: rouge-score with :class:`CharTokenizer` (rouge-score's default tokenizer keeps only
    [a-z0-9] and drops every Chinese character), averaged over samples.
  * distinct-1/2: unique n-grams / all n-grams over all predictions, in the same units as ROUGE.
  * avg length: mean number of characters of the (stripped) texts.

Baselines, on the same test samples, never looking at the reference: ``last`` copies the user's most recent
earlier review, ``random`` copies one earlier review drawn with ``random.Random(--seed)``; "" when the user has
no earlier review.

torch / transformers / sacrebleu / rouge-score / matplotlib are imported inside the functions that need them,
so ``--compare``, ``--baselines_only`` and input errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import data_loader_movie_review as dl
import model_loading
from model_loading import load_model_and_tokenizer
from run_utils import (
    UsageError,
    library_versions,
    package_version,
    pyplot,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)

TEST_FILE = "test_samples.json"
EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
BASELINES = ("last", "random")

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


def compute_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Scores of ``predictions`` against ``references`` (one reference each), as described in the module doc.

    Empty predictions are fine (they score 0). Raises ``ValueError`` for an empty or mismatched list.
    """
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    predictions, references = list(predictions), list(references)
    bleu = BLEU(tokenize="zh").corpus_score(predictions, [references]).score
    chrf = CHRF().corpus_score(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharTokenizer())
    rouge_sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # score(target, prediction): argument order matters
        for name in ROUGE_TYPES:
            rouge_sums[name] += scores[name].fmeasure
    metrics = {"bleu": bleu, "chrf": chrf}
    metrics.update({name: 100.0 * total / len(predictions) for name, total in rouge_sums.items()})
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
        "scale": "bleu, chrf, rouge*, distinct_* are 0-100; avg_length is in characters",
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


# --------------------------------------------------------------------------------------------------------------
# Test samples and baselines
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SampleSet:
    path: str
    samples: list[dict[str, Any]]
    has_history: bool  # every sample carries earlier_reviews, so the baselines can be computed

    @property
    def references(self) -> list[str]:
        return [s["reference"] for s in self.samples]


def read_json(path: str) -> Any:
    """The data loader's JSON reading, with its one-line errors (missing, not UTF-8, bad JSON with position)."""
    try:
        return dl.read_json_file(path)
    except dl.ReviewDataError as err:
        raise UsageError(str(err)) from None


def load_test_samples(path: str) -> SampleSet:
    """Read and check ``test_samples.json``: a non-empty list of objects with string prompt and reference."""
    data = read_json(path)
    expected = "expected test_samples.json as written by train_distributed_MovieReview.py"
    if not isinstance(data, list):
        raise UsageError(f"{path}: not a list of test samples ({expected})")
    if not data:
        raise UsageError(f"{path}: the test set is empty (no samples to evaluate)")
    for i, sample in enumerate(data):
        if not isinstance(sample, dict):
            raise UsageError(f"{path}: sample #{i} is not an object ({expected})")
        for key in ("prompt", "reference"):
            if not isinstance(sample.get(key), str):
                raise UsageError(f"{path}: sample #{i} has no '{key}' string ({expected})")
        earlier = sample.get("earlier_reviews")
        if earlier is not None and not (isinstance(earlier, list) and all(isinstance(r, str) for r in earlier)):
            raise UsageError(f"{path}: sample #{i}: 'earlier_reviews' must be a list of strings")
    return SampleSet(path, data, all("earlier_reviews" in s for s in data))


def baseline_last(samples: Sequence[dict[str, Any]]) -> list[str]:
    """The user's most recent earlier review (earlier_reviews is oldest first); "" without one."""
    return [s["earlier_reviews"][-1] if s["earlier_reviews"] else "" for s in samples]


def baseline_random(samples: Sequence[dict[str, Any]], seed: int) -> list[str]:
    """One earlier review per sample, drawn in sample order from ``random.Random(seed)``; "" without one."""
    rng = random.Random(seed)
    return [rng.choice(s["earlier_reviews"]) if s["earlier_reviews"] else "" for s in samples]


def compute_baselines(samples: Sequence[dict[str, Any]], seed: int) -> dict[str, list[str]]:
    return {"last": baseline_last(samples), "random": baseline_random(samples, seed)}


# --------------------------------------------------------------------------------------------------------------
# Generation (torch / transformers imported here only)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    base_model: str | None = None  # overrides a LoRA adapter's recorded base model


@dataclass
class Generated:
    texts: list[str]
    token_counts: list[int]  # new tokens before EOS (EOS itself not counted)
    hit_limit: list[bool]  # no EOS within max_new_tokens: the output was cut off
    info: dict[str, Any]  # resolved device / dtype / generation config, for metrics.json


def generation_config_kwargs(settings: GenerationSettings, eos_id: int, pad_id: int) -> dict[str, Any]:
    """Everything that decides the output is set explicitly: a field left unset would be filled from the
    model's own generation_config.json (a chat model's may turn sampling or a repetition penalty on)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample, "num_beams": 1,
        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "use_cache": True,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return kwargs


def split_at_eos(ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """New token ids up to (not including) the first EOS, and whether EOS was never reached."""
    ids = list(ids)
    if eos_id in ids:
        return ids[:ids.index(eos_id)], False
    return ids, True


def generate_predictions(model_dir: str, prompts: Sequence[str], settings: GenerationSettings,
                         progress: bool = True) -> Generated:
    """One continuation per prompt, greedy unless ``settings.do_sample``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, set_seed

    loaded = load_model_and_tokenizer(model_dir, settings.device, settings.dtype, settings.trust_remote_code,
                                      settings.base_model)
    print(loaded.summary, file=sys.stderr)
    model, tokenizer, device, dtype = loaded.model, loaded.tokenizer, loaded.device, loaded.dtype
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen_kwargs = generation_config_kwargs(settings, eos_id, pad_id)
    gen_config = GenerationConfig(**gen_kwargs)
    set_seed(settings.seed)  # only matters when sampling; makes --do_sample runs repeatable

    # Prompts are the exact training prefix: no BOS/special tokens added (the data loader's contract).
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    # Longest first: batches of similar length waste less on padding, and an out-of-memory error shows up
    # in the first batch instead of after an hour. Results are put back in the input order.
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    hit_limit: list[bool] = [False] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generating", unit="sample", disable=not progress)
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        enc = tokenizer([prompts[i] for i in batch], add_special_tokens=False, padding=True,
                        return_tensors="pt").to(device)
        with torch.inference_mode():
            # use_cache=True lives in gen_config (generate takes it from there, whatever config.json says after
            # Trainer saved use_cache=False); passing it again as a kwarg only adds a deprecation warning.
            out = model.generate(**enc, generation_config=gen_config)
        new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()  # drop the (left-padded) prompt
        for i, ids in zip(batch, new_tokens, strict=True):
            kept, cut = split_at_eos(ids, eos_id)
            texts[i] = tokenizer.decode(kept, skip_special_tokens=True).strip()
            counts[i], hit_limit[i] = len(kept), cut
        bar.update(len(batch))
    bar.close()
    info = {
        "device": device, "dtype": dtype, "batch_size": settings.batch_size, "seed": settings.seed,
        "generation_config": gen_kwargs,
        "model_generation_config": model.generation_config.to_diff_dict(),
        "note": "generation_config is passed to model.generate; model_generation_config "
                "(the model's generation_config.json) only fills fields not set there",
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
    }
    return Generated(texts, counts, hit_limit, info)


# --------------------------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------------------------
def prediction_rows(test: SampleSet, generated: Generated | None,
                    baselines: dict[str, list[str]] | None) -> list[dict[str, Any]]:
    rows = []
    for i, s in enumerate(test.samples):
        row = {"index": i}
        row.update({k: s.get(k) for k in ("user", "user_index", "record_index", "movie", "timestamp")})
        row["reference"] = s["reference"]
        if generated is not None:
            row["prediction"] = generated.texts[i]
            row["prediction_tokens"] = generated.token_counts[i]
            row["hit_max_new_tokens"] = generated.hit_limit[i]
        for name, outputs in (baselines or {}).items():
            row[f"baseline_{name}"] = outputs[i]
        rows.append(row)
    return rows


def references_digest(references: Sequence[str]) -> str:
    """Identifies the test set, so --compare can tell runs scored on different references apart."""
    return hashlib.sha256(json.dumps(list(references), ensure_ascii=False).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Tables and comparison
# --------------------------------------------------------------------------------------------------------------
def format_value(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if key == "avg_length" else f"{value:.2f}"


def markdown_table(rows: Sequence[tuple[str, dict[str, float] | None]]) -> str:
    """One row per (name, metrics); a metric missing from a row shows as "-"."""
    header = "| run | " + " | ".join(title for _, title in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    lines = [header, rule]
    for name, values in rows:
        cells = [format_value(key, (values or {}).get(key)) for key, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_rows(metrics: dict[str, Any], model_name: str = "model") -> list[tuple[str, dict[str, float]]]:
    """Rows of one metrics.json: the model (if evaluated), each baseline, and the references' own stats."""
    rows = []
    if metrics.get("model"):
        rows.append((model_name, metrics["model"]))
    for name, values in (metrics.get("baselines") or {}).items():
        rows.append((f"baseline: {name}", values))
    if metrics.get("references"):
        rows.append(("reference", metrics["references"]))
    return rows


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


def plot_comparison(path: str, rows: Sequence[tuple[str, dict[str, float] | None]]) -> None:
    """Grouped bars: scores (0-100) on the left, average length (characters) on its own axis on the right."""
    plt = pyplot()
    bars = [(name, values or {}) for name, values in rows if name != "reference"]
    reference = dict(rows).get("reference") or {}
    fig, (ax_scores, ax_len) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [6, 1.4]})
    score_metrics = [(k, t) for k, t in METRICS if k in SCORE_KEYS]
    width = 0.8 / max(1, len(bars))
    for j, (name, values) in enumerate(bars):
        hatch = "//" if name.startswith("baseline") else None
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(score_metrics))]
        heights = [values.get(k) or 0.0 for k, _ in score_metrics]
        ax_scores.bar(xs, heights, width, label=name, hatch=hatch, color=f"C{j}")
        ax_len.bar([(j - (len(bars) - 1) / 2) * width], [values.get("avg_length") or 0.0], width, hatch=hatch,
                   color=f"C{j}")
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
    print(markdown_table(rows))
    plot_comparison(out_png, rows)
    print(f"\nchart: {out_png}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------
def check_model_dir(model_dir: str, need_model: bool) -> None:
    if need_model:  # a full model or a LoRA adapter (model_loading knows both)
        model_loading.check_model_dir(model_dir)
    elif not os.path.isdir(model_dir):
        raise UsageError(f"{model_dir}: model folder not found" if not os.path.exists(model_dir)
                         else f"{model_dir}: not a folder")


def training_arguments(model_dir: str) -> dict[str, Any] | None:
    """The training run's arguments (use_profile, use_history, ...), to tell ablations apart later."""
    try:
        with open(os.path.join(model_dir, "training_config.json"), encoding="utf-8") as f:
            arguments = json.load(f).get("arguments")
        return arguments if isinstance(arguments, dict) else None
    except (OSError, ValueError, AttributeError):
        return None  # optional: a model made by hand has none


def evaluate(args: argparse.Namespace) -> int:
    model_dir = args.model_dir
    check_model_dir(model_dir, need_model=not args.baselines_only)
    test_file = args.test_file or os.path.join(model_dir, TEST_FILE)
    test = load_test_samples(test_file)
    if args.baselines_only and not test.has_history:
        raise UsageError(f"{test_file}: samples have no 'earlier_reviews', so there are no baselines to compute")
    out_dir = args.output_dir or os.path.join(model_dir, EVAL_DIR)
    metrics_path = os.path.join(out_dir, METRICS_FILE)
    if os.path.exists(metrics_path) and not args.overwrite:
        raise UsageError(f"{metrics_path}: already exists; pass --overwrite to replace it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: exists and is not a folder")

    started = time.time()
    references = test.references
    baselines = compute_baselines(test.samples, args.seed) if test.has_history else None
    if baselines is None:
        print(f"warning: {test_file}: samples have no 'earlier_reviews'; skipping the baselines", file=sys.stderr)
    generated = None
    if not args.baselines_only:
        settings = GenerationSettings(args.max_new_tokens, args.batch_size, args.do_sample, args.temperature,
                                      args.top_p, args.top_k, args.seed, args.device, args.dtype,
                                      args.trust_remote_code, args.base_model)
        generated = generate_predictions(model_dir, [s["prompt"] for s in test.samples], settings,
                                         progress=not args.no_progress)

    metrics = {
        "model": compute_metrics(generated.texts, references) if generated else None,
        "baselines": {name: compute_metrics(outputs, references) for name, outputs in (baselines or {}).items()},
        "references": reference_statistics(references),
        "num_samples": len(test.samples),
        "empty_outputs": {"model": sum(not t for t in generated.texts) if generated else None,
                          **{name: sum(not t for t in outputs) for name, outputs in (baselines or {}).items()}},
        "model_dir": os.path.abspath(model_dir),
        "test_file": os.path.abspath(test_file),
        "references_sha256": references_digest(references),
        "generation": None if generated is None else {
            **generated.info,
            "outputs_hitting_max_new_tokens": sum(generated.hit_limit),
            "decoding": "new tokens up to the first EOS, tokenizer.decode(skip_special_tokens=True).strip()",
        },
        "baseline_settings": {
            "last": "earlier_reviews[-1] (the user's most recent review before the target); '' if none",
            "random": f"random.Random({args.seed}).choice(earlier_reviews) per sample in file order; '' if none",
            "seed": args.seed,
        } if baselines else None,
        "metric_definitions": metric_definitions(),
        "training_arguments": training_arguments(model_dir),
        "versions": library_versions(("sacrebleu", "rouge-score", "torch", "transformers")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runtime_s": round(time.time() - started, 2),
    }

    os.makedirs(out_dir, exist_ok=True)
    # metrics.json marks a finished evaluation: drop the old one first, so that a crash between the two writes
    # leaves new predictions without metrics (re-runnable) rather than new predictions beside old metrics.
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    rows = prediction_rows(test, generated, baselines)
    write_text_atomic(os.path.join(out_dir, PREDICTIONS_FILE),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(metrics_path, metrics)

    print(f"{len(test.samples)} test samples from {test_file}")
    print(markdown_table(table_rows(metrics)))
    if generated is not None and any(generated.hit_limit):
        print(f"note: {sum(generated.hit_limit)} predictions stopped at --max_new_tokens {args.max_new_tokens} "
              "without EOS")
    print(f"\nwritten: {os.path.join(out_dir, PREDICTIONS_FILE)}, {metrics_path}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a movie-review model on its test set against baselines, "
                                            "or compare several evaluated runs.")
    p.add_argument("--model_dir", help="trained model folder (with test_samples.json) to evaluate")
    p.add_argument("--test_file", help="test samples JSON (default: MODEL_DIR/test_samples.json)")
    p.add_argument("--output_dir", help="where to write predictions.jsonl and metrics.json (default: MODEL_DIR/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json in the output folder")
    p.add_argument("--baselines_only", action="store_true", help="score only the model-free baselines (no model)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="most tokens generated per review (default 128)")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature with --do_sample (0.7)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass with --do_sample (0.9)")
    p.add_argument("--top_k", type=int, default=0, help="top-k filter with --do_sample; 0 = off (default)")
    p.add_argument("--seed", type=int, default=42, help="seed for sampling and the random baseline (42)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights dtype; auto = bf16 on a GPU that supports it, else fp32")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from MODEL_DIR")
    p.add_argument("--base_model", help="base model of a LoRA adapter run, if not where adapter_config.json says")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="compare evaluated runs (run dir, its eval dir, or a metrics.json) instead of evaluating")
    p.add_argument("--compare_out", default="comparison.png", help="chart written by --compare (./comparison.png)")
    args = p.parse_args(argv)
    if args.compare is None and not args.model_dir:
        p.error("--model_dir is required (or use --compare DIR [DIR ...])")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        p.error("--do_sample needs --temperature > 0, 0 < --top_p <= 1 and --top_k >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.compare is not None:
            return compare(args.compare, args.compare_out)
        return evaluate(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
