"""Evaluate a trained movie-review model on its held-out test set, next to two model-free baselines.

    python evaluate_movie_review.py --model_dir outputs/exp1_full            # generate + score
    python evaluate_movie_review.py --model_dir outputs/exp1_full --baselines_only
    python evaluate_movie_review.py --test_file outputs/exp1_full/test_samples.json --predictions other.jsonl
    python evaluate_movie_review.py --compare outputs/exp1_full outputs/exp4_baseline

Input: ``test_samples.json`` written by ``train_distributed_MovieReview.py`` (a list of
``data_loader_movie_review.sample_record`` dicts). Each prompt is fed exactly as training saw it
(``tokenizer(prompt, add_special_tokens=False)``) and the model continues it with one review, up to EOS.

``--predictions P.jsonl`` scores outputs made elsewhere instead (one JSON object per line: ``index``,
``prediction``; read by ``review_lm.evaluation.predictions``) without loading a model: they take the model's place in
metrics.json (``model``), so ``--compare`` treats them like a model run. It needs ``--test_file`` and takes no
``--model_dir`` (the predictions are not that model's); output defaults to ``P_eval/`` beside the file.

Output (``MODEL_DIR/eval/`` or ``--output_dir``): ``predictions.jsonl`` (one line per test sample: reference,
prediction, baseline outputs), ``style.png`` (the style metrics at a glance) and ``metrics.json`` (scores plus
exactly how each was computed). metrics.json is written last, so its presence means the evaluation finished.

Two kinds of scores, for the model and every baseline on the same test samples: overlap with the user's real review
of the film (``review_lm.evaluation.metrics``) and whether the output writes like *this* user: attribution,
stylometry, copying (``review_lm.evaluation.style``, run by ``review_lm.evaluation.style_report``; ``--style_pool``
adds other users as attribution negatives). Every definition goes into metrics.json. Generation:
``review_lm.inference.generation``; tables and ``--compare``: ``review_lm.evaluation.comparison``. torch /
transformers / sacrebleu / rouge-score / scikit-learn / matplotlib are imported inside the functions that need them,
so ``--compare``, ``--baselines_only``,
``--predictions`` and input errors answer without loading torch.

At scale (docs/evaluation_at_scale.md): under ``torchrun`` / ``accelerate launch`` the test prompts are shared
between the processes and the main process scores (``review_lm.parallel_generation``); finished batches go to
partial files, so the same command resumes a killed run (``review_lm.resumable``); ``--backend vllm`` generates
with vLLM (``review_lm.vllm_backend``); ``--num_samples K`` scores the mean over K samples; every score gets a
95% bootstrap interval, and ``--compare`` a paired one (``review_lm.bootstrap``, ``sample_scores.npz``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from review_lm.evaluation import bootstrap, sample_stats, style
from review_lm.evaluation.comparison import compare, format_value, interval_rows, markdown_table, table_rows
from review_lm.evaluation.metrics import (
    METRICS,
    compute_baselines,
    compute_metrics,
    metric_definitions,
    reference_statistics,
    references_digest,
    sample_rouge,
)
from review_lm.evaluation.output import check_output_folder, staged_results
from review_lm.evaluation.predictions import read_predictions
from review_lm.evaluation.style_report import COLUMNS as STYLE_COLUMNS
from review_lm.evaluation.style_report import TABLE_LEGEND, load_style_pool, style_metrics
from review_lm.inference import model_loading, parallel_generation, resumable, vllm_backend
from review_lm.inference.generation import (
    Generated,
    GenerationSettings,
    add_decoding_arguments,
    add_loading_arguments,
    check_decoding,
)
from review_lm.runs import run_folder
from review_lm.runs.lock import check_not_in_training
from review_lm.runs.run_folder import (
    EVAL_DIR,
    METRICS_FILE,
    PREDICTIONS_EVAL_SUFFIX,
    PREDICTIONS_FILE,
    STYLE_FIGURE,
    TEST_SAMPLES,
)
from review_lm.runs.test_set import SampleSet, check_test_format, load_test_samples
from review_lm.utils import (
    ArgumentParser,
    UsageError,
    check_output_path,
    check_range,
    library_versions,
    write_json_atomic,
    write_text_atomic,
)


# --------------------------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------------------------
def prediction_rows(test: SampleSet, generated: Generated | None, given: list[str] | None,
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
            if generated.samples:  # --num_samples K: all K ("prediction" is the first)
                row["predictions"] = generated.samples[i]
        elif given is not None:
            row["prediction"] = given[i]
        for name, outputs in (baselines or {}).items():
            row[f"baseline_{name}"] = outputs[i]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------
def check_model_dir(model_dir: str, need_model: bool) -> None:
    if need_model:  # a full model or a LoRA adapter (model_loading knows both)
        model_loading.check_model_dir(model_dir)
    elif not os.path.isdir(model_dir):
        raise UsageError(f"{model_dir}: model folder not found" if not os.path.exists(model_dir)
                         else f"{model_dir}: not a folder")


def resolve_inputs(args: argparse.Namespace) -> tuple[str, str]:
    """The test file and the output folder; refuses a combination that would be ambiguous (one line)."""
    if args.predictions is None and not args.model_dir:  # --baselines_only --test_file T: no model at all
        return args.test_file, args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.test_file)),
                                                               EVAL_DIR)
    if args.predictions is None:
        check_model_dir(args.model_dir, need_model=not args.baselines_only)
        return (args.test_file or os.path.join(args.model_dir, TEST_SAMPLES),
                args.output_dir or os.path.join(args.model_dir, EVAL_DIR))
    if args.model_dir:
        raise UsageError("--predictions scores a file of predictions, not a model: drop --model_dir and name the "
                         "test set with --test_file (e.g. RUN/test_samples.json)")
    if args.baselines_only:
        raise UsageError("--baselines_only and --predictions exclude each other (the baselines are scored with "
                         "the predictions anyway)")
    if not args.test_file:
        raise UsageError("--predictions needs --test_file: the test_samples.json the predictions were made for")
    out_dir = args.output_dir or os.path.splitext(args.predictions)[0] + PREDICTIONS_EVAL_SUFFIX
    if os.path.abspath(os.path.join(out_dir, PREDICTIONS_FILE)) == os.path.abspath(args.predictions):
        raise UsageError(f"{args.predictions}: --output_dir {out_dir} would overwrite the predictions being scored; "
                         "choose another --output_dir")
    return args.test_file, out_dir


def check_before_work(args: argparse.Namespace, out_dir: str) -> None:
    """What must hold before anything slow: the output folder can be written, the run is not being trained
    right now, and a LoRA run's --base_model is the model its adapter was trained on (a note when it only moved)."""
    check_output_folder(out_dir)
    if args.model_dir:
        check_not_in_training(args.model_dir)
    if args.model_dir and args.predictions is None and not args.baselines_only:
        note = model_loading.check_base_model(args.model_dir, args.base_model)
        if note:
            print(f"note: {note}", file=sys.stderr)


def evaluate(args: argparse.Namespace) -> int:
    test_file, out_dir = resolve_inputs(args)
    check_before_work(args, out_dir)
    test = load_test_samples(test_file)
    if args.baselines_only and not test.has_history:
        raise UsageError(f"{test_file}: samples have no earlier reviews (no 'earlier_reviews' and no "
                         f"{run_folder.TEST_HISTORIES} beside it), so there are no baselines to compute")
    given = read_predictions(args.predictions, test.samples) if args.predictions else None
    pool = load_style_pool(args.style_pool, test)
    metrics_path = os.path.join(out_dir, METRICS_FILE)
    if os.path.exists(metrics_path) and not args.overwrite:
        raise UsageError(f"{metrics_path}: already exists; pass --overwrite to replace it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: exists and is not a folder")

    generating = not args.baselines_only and given is None
    if not generating and parallel_generation.launched_processes(os.environ) > 1 \
            and int(os.environ.get("RANK", "0")) != 0:
        return 0  # under a launcher only generation is shared; the main process does everything else
    started = time.time()
    references = test.references
    baselines = compute_baselines(test.all_earlier_reviews(), args.seed) if test.has_history else None
    if baselines is None:
        print(f"warning: {test_file}: samples have no earlier reviews; skipping the baselines", file=sys.stderr)
    generated = None
    record = None
    if generating:
        # The run's format decides the stop tokens (a conversation's reviews end with the end-of-turn token);
        # its test prompts are already in that format (test_samples.json), fed as their text's ids.
        record = run_folder.read_run_record(args.model_dir) if os.path.isfile(
            os.path.join(args.model_dir, run_folder.RUN_RECORD)) else None
        if record is not None:  # a model trained elsewhere has no format to compare with
            check_test_format(test.samples, record.prompt_format, test_file, args.model_dir)
        settings = GenerationSettings(args.max_new_tokens, args.batch_size, args.do_sample, args.temperature,
                                      args.top_p, args.top_k, args.seed, args.device, args.dtype,
                                      args.trust_remote_code, args.base_model,
                                      record.chat_template if record else "none", num_samples=args.num_samples)
        # Batches already in partial files of the same model, test file and settings are kept (a killed run
        # resumes); partial files of anything else are refused here, before the model loads.
        header = resumable.fingerprint(args.model_dir, test_file,
                                       parallel_generation.fingerprint_settings(settings, args.backend))
        if os.path.isdir(out_dir):
            resumable.read_done(out_dir, header)
        prompts = [s["prompt"] for s in test.samples]
        if args.backend == "vllm":
            generated = vllm_backend.generate_vllm(args.model_dir, prompts, settings, out_dir, header,
                                                   args.tensor_parallel_size)
        else:
            generated = parallel_generation.generate_resumable(args.model_dir, prompts, settings, out_dir, header,
                                                               progress=not args.no_progress)
        if generated is None:
            return 0  # not the main process: its batches are in its partial file, the main process scores
    outputs = generated.texts if generated is not None else given

    # Every system on the same samples: overlap with the real review, then does it write like this user?
    systems = {**({"model": outputs} if outputs is not None else {}), **(baselines or {})}
    rouge = {name: sample_rouge(texts, references) for name, texts in systems.items()}
    scores = {name: compute_metrics(texts, references, rouge[name]) for name, texts in systems.items()}
    label = "predictions" if given is not None else "model"
    styled = style_metrics(test, systems, "model" if outputs is not None else None, label, pool, args.seed,
                           {name: r["rougeL"] for name, r in rouge.items()}, STYLE_FIGURE)
    for name, numbers in styled.systems.items():
        scores[name].update(numbers)
    # --num_samples K: the model's score is the mean over its K draws (draw k = every prompt's k-th sample).
    draws = [list(d) for d in zip(*generated.samples, strict=True)] if generated and generated.samples else None
    draw_section = None
    if draws:
        per_draw = [scores["model"]]
        for texts in draws[1:]:
            numbers = compute_metrics(texts, references)
            if styled.evaluator is not None:
                numbers.update({k: v for k, v in styled.evaluator.score(texts).items() if k in scores["model"]})
            per_draw.append(numbers)
        scores["model"], draw_section = bootstrap.mean_over_draws(per_draw)
    intervals, system_stats, user_codes = None, None, None
    if args.bootstrap:  # 95% intervals of every score; the per-sample statistics let --compare pair runs
        intervals, system_stats, user_codes = bootstrap.evaluation_intervals(
            systems, references, rouge, styled.evaluator, test.user_keys(), scores,
            "model" if outputs is not None else None, args.bootstrap, args.seed, draws[1:] if draws else None)

    metrics = {
        "model": scores.get("model"),
        "baselines": {name: scores[name] for name in baselines or {}},
        "references": {**reference_statistics(references), **styled.reference},
        "num_samples": len(test.samples),
        "empty_outputs": {"model": sum(not t for t in outputs) if outputs is not None else None,
                          **{name: sum(not t for t in texts) for name, texts in (baselines or {}).items()}},
        "model_dir": os.path.abspath(args.model_dir) if args.model_dir else None,
        "predictions_file": os.path.abspath(args.predictions) if args.predictions else None,
        "test_file": os.path.abspath(test_file),
        "references_sha256": references_digest(references),
        "generation": None if generated is None else {
            **generated.info,
            "outputs_hitting_max_new_tokens": sum(generated.hit_limit),
            "decoding": "new tokens up to the first stop token (generation_config.eos_token_id: EOS, and the "
                        "end-of-turn for chat-formatted runs), tokenizer.decode(skip_special_tokens=True).strip()",
            "prompt_format": record.prompt_format if record else "spec",
            "chat_template": settings.chat_template,
        },
        "baseline_settings": {
            "last": "the user's most recent review before the target (earlier reviews[-1]); '' if none",
            "random": f"random.Random({args.seed}).choice(earlier reviews) per sample in file order; '' if none",
            "seed": args.seed,
        } if baselines else None,
        "style": styled.section,
        "intervals": intervals,
        "samples_per_prompt": draw_section,
        "metric_definitions": {**metric_definitions(), **style.definitions()},
        "training_arguments": run_folder.recorded_arguments(args.model_dir) if args.model_dir else None,
        "versions": library_versions(("sacrebleu", "rouge-score", "scikit-learn", "rapidfuzz", "torch",
                                      "transformers")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runtime_s": round(time.time() - started, 2),
    }

    rows = prediction_rows(test, generated, given, baselines)
    # Written beside the old results and swapped in only when complete: a failure leaves them byte-identical.
    with staged_results(out_dir) as stage:
        write_text_atomic(os.path.join(stage, PREDICTIONS_FILE),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        styled.write_figure(os.path.join(stage, STYLE_FIGURE))
        if system_stats is not None:  # without it, an earlier evaluation's statistics are removed by the swap
            sample_stats.save_sample_scores(os.path.join(stage, run_folder.SAMPLE_SCORES_FILE), system_stats,
                                            user_codes, metrics["references_sha256"])
        write_json_atomic(os.path.join(stage, METRICS_FILE), metrics)
    figure = os.path.join(out_dir, STYLE_FIGURE)
    resumable.remove_partials(out_dir)  # predictions.jsonl holds them all now

    print(f"{len(test.samples)} test samples from {test_file}" + (f", predictions from {args.predictions}"
                                                                  if given is not None else ""))
    for note in styled.notes:
        print(f"note: {note}")
    print(markdown_table(table_rows(metrics, label), interval_rows(metrics, label)))
    if intervals:
        print(f"±: half-width of the 95% interval ({intervals['method']})")
    if draw_section:
        spread = ", ".join(f"{title} {format_value(key, draw_section['spread'][key]['std'])}" for key, title in
                           (*METRICS, *STYLE_COLUMNS) if key in draw_section["spread"])
        print(f"{label}: mean over {draw_section['samples']} samples per prompt; std over the samples: {spread}")
    if styled.systems:
        print(TABLE_LEGEND)
    if styled.per_user_table:
        print(f"\nper user ({label}):\n{styled.per_user_table}")
    if generated is not None and any(generated.hit_limit):
        print(f"note: {sum(generated.hit_limit)} predictions stopped at --max_new_tokens {args.max_new_tokens} "
              "without EOS")
    written = [os.path.join(out_dir, PREDICTIONS_FILE), *([figure] if styled.evaluator else []),
               *([os.path.join(out_dir, run_folder.SAMPLE_SCORES_FILE)] if system_stats is not None else []),
               metrics_path]
    print(f"\nwritten: {', '.join(written)}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description="Evaluate a movie-review model on its test set against baselines, "
                                            "or compare several evaluated runs.")
    p.add_argument("--model_dir", help="trained model folder (with test_samples.json) to evaluate")
    p.add_argument("--test_file", help="test samples JSON (default: MODEL_DIR/test_samples.json)")
    p.add_argument("--predictions", metavar="P.jsonl",
                   help="score these predictions (JSONL: index, prediction) for --test_file instead of a model")
    p.add_argument("--style_pool", nargs="+", metavar="FILE|DIR",
                   help="other users' review files: extra attribution classes (negatives only), e.g. for one user")
    p.add_argument("--output_dir", help="where to write predictions.jsonl, style.png and metrics.json "
                                        "(default: MODEL_DIR/eval; with --predictions P.jsonl: P_eval/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json in the output folder")
    p.add_argument("--baselines_only", action="store_true", help="score only the model-free baselines (no model)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together (default 8)")
    add_decoding_arguments(p, sample_by_default=False, max_new_tokens=128)
    p.add_argument("--num_samples", type=int, default=1, metavar="K",
                   help="continuations per prompt, with --do_sample: all kept in predictions.jsonl, each score the "
                        "mean over the K draws with its spread (default 1)")
    p.add_argument("--seed", type=int, default=42, help="seed for sampling and the random baseline (42)")
    add_loading_arguments(p)
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--backend", choices=vllm_backend.BACKENDS, default="hf",
                   help="hf: transformers generate (under torchrun: one shard per process); vllm: vLLM's offline "
                        "engine (optional package; LoRA served without merging, prefix caching)")
    p.add_argument("--tensor_parallel_size", type=int, default=1,
                   help="GPUs one vLLM engine spreads the model over (--backend vllm; default 1)")
    p.add_argument("--bootstrap", type=int, default=bootstrap.DEFAULT_RESAMPLES, metavar="N",
                   help=f"bootstrap resamples for the 95%% intervals of every score (default "
                        f"{bootstrap.DEFAULT_RESAMPLES}; 0 = no intervals)")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="compare evaluated runs (run dir, its eval dir, or a metrics.json) instead of evaluating")
    p.add_argument("--compare_out", default="comparison.png", help="chart written by --compare (./comparison.png)")
    args = p.parse_args(argv)
    if args.compare is None and not (args.model_dir or args.predictions or (args.baselines_only and args.test_file)):
        p.error("--model_dir is required (or --test_file T --predictions P.jsonl, or --compare DIR [DIR ...])")
    try:
        check_range("batch_size", args.batch_size, 1)
        check_decoding(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
        check_range("bootstrap", args.bootstrap, 0)
        check_range("tensor_parallel_size", args.tensor_parallel_size, 1)
        check_range("num_samples", args.num_samples, 1)
        if args.num_samples > 1 and not args.do_sample:
            raise UsageError(f"--num_samples {args.num_samples} needs --do_sample (greedy decoding writes the same "
                             "review every time)")
    except UsageError as err:
        p.error(str(err))
    generating = args.compare is None and args.predictions is None and not args.baselines_only
    reason = vllm_backend.refusal(args.backend, args.backend != "vllm" or vllm_backend.vllm_installed(),
                                  parallel_generation.launched_processes(os.environ), args.tensor_parallel_size,
                                  generating)
    if reason:
        p.error(reason)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.compare is not None:
            check_output_path(args.compare_out, "--compare_out", kind="file")
            return compare(args.compare, args.compare_out)
        return evaluate(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
