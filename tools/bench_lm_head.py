"""Benchmark: the LM head's memory and time with the kept logits built whole vs chunked (issue 23), plus TRL.

Offline, on the CPU. One training epoch per configuration on the real users (every file of
../shared/data/douban_dmr, read from there), each in a fresh subprocess so its peak RSS is its own. The model is
the tiny random Qwen2 of tools/bench_train.py (hidden 64 x 2 layers) with the real 152k Qwen vocabulary, so the
head dominates and its memory shows; batch 2 x accumulation 8, --max_length 4096, training only (no evaluation,
no checkpoints inside the measured runtime). Configurations:

  conversation-unchunked  --prompt_format conversation --lm_head_loss unchunked (the kept logits built whole:
                          labelled tokens x vocab x 4 B per micro-batch, the trainer before issue 23)
  conversation-chunked    --prompt_format conversation (default: chunked head + loss on the CPU)
  spec-chunked            the spec format (default)
  trl-spec                TRL SFTTrainer's default loss on the spec-format prompt/completion ids, configured as
                          tools/bench_train.py configures it (completion-only loss, padded batches,
                          gradient_checkpointing=False, fp32 on the CPU)

On 2 shared cores the conversation configurations take ~1 min each, spec ~3 min; TRL (logits at every padded
position) ~285 s per optimizer step, about an hour for the epoch: --timeout bounds it.

    flock /tmp/heavy.lock .venv/bin/python tools/bench_lm_head.py
    .venv/bin/python tools/bench_lm_head.py --configs conversation-unchunked conversation-chunked --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CONFIGS = ("conversation-unchunked", "conversation-chunked", "spec-chunked", "trl-spec")
# The repository's sibling folder; a git worktree one level deeper finds the same folder one level up.
DATA_CANDIDATES = [os.path.join(REPO, "..", "shared", "data", "douban_dmr"),
                   os.path.join(REPO, "..", "..", "shared", "data", "douban_dmr")]


def worker(spec: dict) -> dict:
    import dataclasses

    import train_distributed_MovieReview as tr
    from review_lm.training import lm_head_plan
    from review_lm.training.plan import Hardware, plan_hardware
    from tools.bench_conversation import prepare
    from tools.bench_train import build_model, rss_bytes, trl_trainer

    config = spec["config"]
    prompt_format = "conversation" if config.startswith("conversation") else "spec"
    args, tokenizer, prepared, _ = prepare(spec["data"], prompt_format, spec["max_length"])
    args.lm_head_loss = "unchunked" if config.endswith("unchunked") else "auto"  # the hidden switch
    train = prepared.datasets["train"]
    items = [train[i] for i in range(len(train))]
    model = build_model("tiny", tokenizer, spec["max_length"])
    plan = plan_hardware(args, Hardware(), 1).with_data(args, len(train), False).with_vocab(model.config.vocab_size)
    prepared = dataclasses.replace(prepared, datasets={**prepared.datasets, "val": []})
    if config == "trl-spec":
        trainer = trl_trainer(args, model, tokenizer, items, plan.runtime, padding_free=False)
    else:
        trainer = tr.build_trainer(args, model, tokenizer, prepared, plan)
    trainer.args.save_strategy = "no"
    memory = lm_head_plan.memory_facts(plan.lm_head, sum(p.numel() for p in model.parameters()), "float32",
                             train.labelled_tokens(), len(train), args.batch_size, args.max_length)
    rss_before = rss_bytes()
    result = trainer.train()
    return {"config": config, "lm_head_loss": plan.lm_head.kind if config != "trl-spec" else "trl",
            "chunk_rows": plan.lm_head.chunk_rows, "sequences": len(train),
            "tokens": sum(len(item["input_ids"]) for item in items), "labelled": train.labelled_tokens(),
            "optimizer_steps": trainer.state.global_step, "runtime_s": result.metrics["train_runtime"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_train_bytes": rss_before, "train_loss": result.metrics.get("train_loss"),
            "head_logits_bytes": memory["lm_head_peak_logits_bytes"] if config != "trl-spec" else None,
            "model_weights_bytes": memory["model_weights_bytes"]}


def print_table(results: dict[str, dict | str]) -> None:
    gib = 2**30
    base, spec = results.get("conversation-unchunked"), results.get("spec-chunked")
    print(f"\n   {'config':<23} {'sequences':>9} {'tokens':>9} {'labelled':>9} {'steps':>5} {'epoch s':>8} "
          f"{'vs unchunked':>12} {'peak RSS GiB':>12} {'vs unchunked':>12} {'vs spec':>8} {'head logits':>11} "
          f"{'train loss':>11}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"   {name:<23} {r}")
            continue
        time_ratio = f"{r['runtime_s'] / base['runtime_s']:.2f}x" if isinstance(base, dict) else "-"
        rss_ratio = f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x" if isinstance(base, dict) else "-"
        spec_ratio = f"{r['peak_rss_bytes'] / spec['peak_rss_bytes']:.2f}x" if isinstance(spec, dict) else "-"
        head = f"{r['head_logits_bytes'] / 2**20:.0f} MiB" if r.get("head_logits_bytes") else "-"
        loss = f"{r['train_loss']:.5f}" if r.get("train_loss") is not None else "-"
        print(f"   {name:<23} {r['sequences']:>9} {r['tokens']:>9,} {r['labelled']:>9,} {r['optimizer_steps']:>5} "
              f"{r['runtime_s']:>8.1f} {time_ratio:>12} {r['peak_rss_bytes'] / gib:>12.2f} {rss_ratio:>12} "
              f"{spec_ratio:>8} {head:>11} {loss:>11}")
    first = next((r for r in results.values() if isinstance(r, dict)), None)
    if first:
        print(f"   model weights {first['model_weights_bytes'] / 2**20:.0f} MiB (fp32); head logits = the head's peak "
              "logits per micro-batch (chunked: chunk x vocab x 4 B; unchunked: average micro-batch)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", default=None, help="folder of the real users' JSON files")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    parser.add_argument("--json", help="also write every result to this JSON file")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    data_dir = args.data_dir or next((d for d in DATA_CANDIDATES if os.path.isdir(d)), None)
    if not data_dir or not os.path.isdir(data_dir):
        print(f"error: no real-user folder ({args.data_dir or DATA_CANDIDATES[0]}); pass --data_dir", file=sys.stderr)
        return 2
    import platform

    data = [os.path.abspath(data_dir)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); data {data[0]}; "
          f"tiny Qwen2 (hidden 64 x 2 layers, vocab 151,936), batch 2 x accumulation 8, --max_length "
          f"{args.max_length}, 1 epoch")
    from tools.bench_train import run_worker  # each case in a fresh process: its own peak RSS

    results = {}
    for config in args.configs:
        start = time.time()
        spec = {"config": config, "data": data, "max_length": args.max_length}
        results[config] = run_worker(__file__, spec, args.timeout)
        print(f"   [{config}: {time.time() - start:.0f} s]", flush=True)
    print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
