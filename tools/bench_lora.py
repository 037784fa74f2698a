"""Benchmark full fine-tuning against LoRA on the Qwen2.5-0.5B shape: peak RSS and trainable parameters.

Each mode runs in a fresh subprocess (so one mode's freed memory cannot hide the other's peak): a randomly
initialised Qwen2 with Qwen2.5-0.5B's configuration (24 layers, hidden 896, vocabulary 151,936, tied
embeddings), fp32 on the CPU, trained a few optimizer steps by transformers' Trainer (AdamW, as the training
script does) on real reviews tokenized with the real Qwen vocabulary. LoRA is applied by ``adapters.wrap_model``,
exactly as ``--finetuning_type lora`` does. Heavy (about 10 GB for the full run): run it alone::

    flock /tmp/heavy.lock .venv/bin/python tools/bench_lora.py
    flock /tmp/heavy.lock .venv/bin/python tools/bench_lora.py --steps 3 --seq_len 256 --json bench_lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Qwen/Qwen2.5-0.5B config.json (the fields that set the shape).
QWEN25_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def training_rows(seq_len: int, count: int) -> list[dict[str, list[int]]]:
    """``count`` rows of ``seq_len`` real-review tokens (the example file, repeated as needed)."""
    import data_loader_movie_review as dl
    from review_lm.testing.tiny_model import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer()
    text = "\n".join(s.target.text for s in dl.split_chronologically(
        dl.load_review_file(os.path.join(REPO, "example_movie_review_data.json")))["train"])
    ids = tokenizer(text).input_ids
    ids = (ids * (1 + seq_len * count // len(ids)))[: seq_len * count]
    return [{"input_ids": ids[i:i + seq_len], "labels": ids[i:i + seq_len]} for i in range(0, len(ids), seq_len)]


def worker(mode: str, steps: int, seq_len: int, rank: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Trainer, TrainingArguments

    from review_lm.training import adapters

    torch.manual_seed(0)
    rows = training_rows(seq_len, steps)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B), dtype=torch.float32)
    flags = argparse.Namespace(finetuning_type=mode, lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                               lora_target=None, gradient_checkpointing=False)
    model = adapters.wrap_model(model, flags, "Qwen/Qwen2.5-0.5B (random weights)", quantized=False)
    trainable, total = adapters.parameter_counts(model)
    rss_model = peak_rss_gib()
    args = TrainingArguments(output_dir=os.path.join("/tmp", f"bench_lora_{os.getpid()}"), use_cpu=True,
                             per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-4,
                             save_strategy="no", report_to="none", logging_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"mode": mode, "trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total,
            "rss_after_model_gib": round(rss_model, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
            "s_per_step": round(seconds / steps, 2), "steps": steps, "seq_len": seq_len}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per mode (batch 1)")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per training row")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank, as the script's defaults)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seq_len, args.rank)))
        return 0
    results = []
    for mode in ("full", "lora"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--steps", str(args.steps),
               "--seq_len", str(args.seq_len), "--rank", str(args.rank)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(f"error: {mode} run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"Qwen2.5-0.5B shape, random weights, fp32 CPU, {args.steps} steps of {args.seq_len} tokens, batch 1")
    print(f"{'mode':<6}{'trainable':>14}{'total':>14}{'trainable %':>13}{'RSS model GiB':>15}{'peak RSS GiB':>14}"
          f"{'s/step':>9}")
    for r in results:
        print(f"{r['mode']:<6}{r['trainable']:>14,}{r['total']:>14,}{r['trainable_pct']:>12.3f}%"
              f"{r['rss_after_model_gib']:>15.2f}{r['peak_rss_gib']:>14.2f}{r['s_per_step']:>9.2f}")
    full, lora = results
    print(f"LoRA / full: peak RSS {lora['peak_rss_gib'] / full['peak_rss_gib']:.1%}, "
          f"trainable {lora['trainable'] / full['trainable']:.2%}, time per step "
          f"{lora['s_per_step'] / full['s_per_step']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
