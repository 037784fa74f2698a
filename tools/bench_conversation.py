"""Benchmark: --prompt_format spec vs conversation, one epoch side by side (plus TRL SFTTrainer on the spec samples).

Offline, on the CPU. Three parts:

  counts     the real users (every file of ../shared/data/douban_dmr), --max_length 4096: per format training
             sequences, reviews, tokens and labelled tokens of one epoch, optimizer steps (batch 2 x accumulation 8)
  train      one training epoch per configuration, each in a fresh subprocess (its own peak RSS): the project's
             trainer (train_distributed_MovieReview.build_trainer, packing + completion-only logits) in the spec and
             the conversation format, and TRL SFTTrainer on the spec samples (completion-only loss, padded,
             gradient_checkpointing=False, as tools/bench_train.py configures it). Shapes: "tiny" (hidden 64 x 2
             layers, the real 152k Qwen vocabulary) on all users; "0.5b" (Qwen2.5-0.5B's shape, random weights) on
             a few users (--users_05b). Training only: no evaluation, no checkpoints inside the measured runtime.
  synthetic  1,000 users x 100 reviews (review_lm.testing.synthetic, real texts cycled), --max_length 4096:
             token counts, windows and the windowing cost factor (counting only: nothing is trained)

    .venv/bin/python tools/bench_conversation.py                        # everything (~10 min on 2 cores)
    .venv/bin/python tools/bench_conversation.py --parts counts synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
REAL_DIR = os.path.join(REPO, "..", "shared", "data", "douban_dmr")

from tools.bench_train import run_worker  # noqa: E402 - one worker-process protocol for both benchmarks

BATCH, ACCUMULATION = 2, 8


def train_args(data: list[str], prompt_format: str, max_length: int, out: str):
    import train_distributed_MovieReview as tr

    return tr.parse_args(["--data_file", *data, "--output_dir", out, "--max_length", str(max_length),
                          "--batch_size", str(BATCH), "--gradient_accumulation_steps", str(ACCUMULATION),
                          "--learning_rate", "1e-4", "--max_epochs", "1", "--warmup_steps", "0", "--report_to",
                          "none", "--seed", "0", "--prompt_format", prompt_format])


def prepare(data: list[str], prompt_format: str, max_length: int, users: int | None = None):
    """(args, tokenizer, prepared data, steps per epoch) exactly as the trainer prepares them."""
    import data_loader_movie_review as dl
    import train_distributed_MovieReview as tr
    from review_lm.data import datasets as rd
    from review_lm.testing.tiny_model import load_qwen_tokenizer
    from review_lm.training import plan as rp
    from review_lm.training.plan import optimizer_steps_per_epoch

    args = train_args(data, prompt_format, max_length, tempfile.mkdtemp(prefix="bench-conv-"))
    tokenizer = load_qwen_tokenizer()
    loaded, splits = tr.load_splits(args)
    if users is not None:  # the smallest users with a training split (a few minutes at the 0.5B shape)
        keep = {u.index for u in sorted(loaded.users, key=lambda u: len(u.reviews)) if len(u.reviews) >= 3}
        keep = set(sorted(keep, key=lambda i: len(loaded.users[i].reviews))[:users])
        splits = {k: [s for s in v if s.user.index in keep] for k, v in splits.items()}
    template = rp.resolve_chat_template(prompt_format, None, bool(tokenizer.chat_template))
    prepared = rd.prepare_data(loaded, splits, tokenizer, max_length,
                               dl.PromptBuilder(args.use_profile, args.use_history), prompt_format, template)
    steps = optimizer_steps_per_epoch(prepared.size("train"), BATCH, 1, ACCUMULATION)
    return args, tokenizer, prepared, steps


def counts(data: list[str], max_length: int) -> dict[str, dict]:
    out = {}
    for fmt in ("spec", "conversation"):
        start = time.time()
        _, _, prepared, steps = prepare(data, fmt, max_length)
        out[fmt] = {**prepared.epoch_facts(steps), "build_s": round(time.time() - start, 2),
                    "chat_template": prepared.chat_template}
    return out


# --------------------------------------------------------------------------------------------------------------
# One training epoch (worker process)
# --------------------------------------------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    import dataclasses

    import train_distributed_MovieReview as tr
    from review_lm.training.plan import Hardware, plan_hardware
    from tools.bench_train import build_model, rss_bytes, trl_trainer  # the same model and TRL configuration

    config, shape = spec["config"], spec["shape"]
    prompt_format = "conversation" if config == "conversation" else "spec"
    args, tokenizer, prepared, _ = prepare(spec["data"], prompt_format, spec["max_length"], spec.get("users"))
    train = prepared.datasets["train"]
    items = [train[i] for i in range(len(train))]
    tokens = sum(len(item["input_ids"]) for item in items)
    labelled = sum(sum(label != -100 for label in item["labels"]) for item in items)
    plan = plan_hardware(args, Hardware(), 1).with_splits(args, False).with_steps(args, len(train))
    prepared = dataclasses.replace(prepared, datasets={**prepared.datasets, "val": []})
    model = build_model(shape, tokenizer, spec["max_length"])
    if config == "trl":
        trainer = trl_trainer(args, model, tokenizer, items, plan.runtime, padding_free=False)
    else:
        trainer = tr.build_trainer(args, model, tokenizer, prepared, plan)
    trainer.args.save_strategy = "no"
    rss_before = rss_bytes()
    result = trainer.train()
    runtime = result.metrics["train_runtime"]
    return {"config": config, "shape": shape, "sequences": len(train), "reviews": train.num_reviews,
            "tokens": tokens, "labelled": labelled, "optimizer_steps": trainer.state.global_step,
            "runtime_s": runtime, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_train_bytes": rss_before, "train_loss": result.metrics.get("train_loss")}


def print_training(title: str, results: dict[str, dict | str]) -> None:
    print(f"\n== train: {title}, 1 epoch, batch {BATCH} x accumulation {ACCUMULATION} ==")
    print(f"   {'config':<13} {'sequences':>9} {'reviews':>7} {'tokens':>9} {'labelled':>9} {'steps':>5} "
          f"{'runtime s':>9} {'vs spec':>8} {'peak RSS GiB':>12} {'train loss':>10}")
    spec = results.get("spec")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"   {name:<13} {r}")
            continue
        ratio = f"{spec['runtime_s'] / r['runtime_s']:.1f}x" if isinstance(spec, dict) else "-"
        loss = f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "-"
        print(f"   {name:<13} {r['sequences']:>9} {r['reviews']:>7} {r['tokens']:>9,} {r['labelled']:>9,} "
              f"{r['optimizer_steps']:>5} {r['runtime_s']:>9.1f} {ratio:>8} {r['peak_rss_bytes'] / 2**30:>12.2f} "
              f"{loss:>10}")


# --------------------------------------------------------------------------------------------------------------
# Synthetic scale (counting only)
# --------------------------------------------------------------------------------------------------------------
def synthetic(num_users: int, reviews: int, max_length: int) -> dict:
    import numpy as np

    from review_lm.data import windows as wn
    from review_lm.testing.synthetic import review_pool, synthetic_user

    pool = review_pool(all_files=True)
    folder = tempfile.mkdtemp(prefix="bench-conv-synth-")
    path = os.path.join(folder, "synthetic.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump([synthetic_user(pool, reviews, f"u{i}", start=i * 37) for i in range(num_users)], f,
                  ensure_ascii=False)
    result = counts([path], max_length)
    _, _, prepared, _ = prepare([path], "conversation", max_length)
    train = prepared.datasets["train"]
    p = train.pieces
    once = total = 0
    for row in range(len(p.users)):
        windows = [train.window(i) for i in np.nonzero(train.row == row)[0]]
        t, o = wn.windows_cost(windows, p.turn_lengths(row).tolist(), p.system_length(row), len(p.separator))
        total, once = total + t, once + o
    result["conversation"].update(windows_per_user=round(len(train) / len(p.users), 2),
                                  window_cost_factor=round(total / once, 3))
    return result


def print_counts(title: str, result: dict[str, dict]) -> None:
    print(f"\n== counts: {title} ==")
    print(f"   {'format':<13} {'sequences':>9} {'reviews':>7} {'tokens/epoch':>13} {'labelled':>11} {'steps':>6} "
          f"{'reviews/step':>12} {'build s':>8}")
    for fmt, r in result.items():
        print(f"   {fmt:<13} {r['train_sequences']:>9,} {r['train_reviews']:>7,} {r['tokens_per_epoch']:>13,} "
              f"{r['labelled_tokens_per_epoch']:>11,} {r['optimizer_steps_per_epoch']:>6,} "
              f"{r['reviews_per_optimizer_step']:>12} {r['build_s']:>8}")
    spec, conv = result["spec"], result["conversation"]
    extra = ""
    if "window_cost_factor" in conv:
        extra = f"; {conv['windows_per_user']} windows per user, windowing cost {conv['window_cost_factor']}x"
    print(f"   spec / conversation tokens per epoch: {spec['tokens_per_epoch'] / conv['tokens_per_epoch']:.1f}x"
          f" (template: {conv['chat_template']}){extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--parts", nargs="+", choices=["counts", "train", "synthetic"],
                        default=["counts", "train", "synthetic"])
    parser.add_argument("--shapes", nargs="+", choices=["tiny", "0.5b"], default=["tiny", "0.5b"])
    parser.add_argument("--configs", nargs="+", choices=["spec", "conversation", "trl"],
                        default=["spec", "conversation", "trl"])
    parser.add_argument("--users_05b", type=int, default=2, help="smallest real users trained at the 0.5B shape")
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--synthetic_users", type=int, default=1000)
    parser.add_argument("--synthetic_reviews", type=int, default=100)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per training configuration")
    parser.add_argument("--json", help="also write every result to this JSON file")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if not os.path.isdir(REAL_DIR):
        print(f"error: {REAL_DIR}: no such folder (the real Douban users)", file=sys.stderr)
        return 2
    data = [os.path.abspath(REAL_DIR)]
    everything: dict = {}
    if "counts" in args.parts:
        everything["counts"] = counts(data, args.max_length)
        print_counts(f"all real users ({REAL_DIR}), --max_length {args.max_length}", everything["counts"])
    if "train" in args.parts:
        for shape in args.shapes:
            users = None if shape == "tiny" else args.users_05b
            configs = [c for c in args.configs if not (shape == "0.5b" and c == "trl")]  # TRL: tiny only
            results = {}
            for config in configs:
                start = time.time()
                results[config] = run_worker(__file__, {"config": config, "shape": shape, "data": data,
                                                        "max_length": args.max_length, "users": users}, args.timeout)
                print(f"   [{shape} / {config}: {time.time() - start:.0f} s]", flush=True)
            who = "all real users" if users is None else f"the {users} smallest real users"
            print_training(f"shape {shape}, {who}", results)
            everything[f"train_{shape}"] = results
    if "synthetic" in args.parts:
        everything["synthetic"] = synthetic(args.synthetic_users, args.synthetic_reviews, args.max_length)
        print_counts(f"{args.synthetic_users} synthetic users x {args.synthetic_reviews} reviews, --max_length "
                     f"{args.max_length} (counting only)", everything["synthetic"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(everything, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
