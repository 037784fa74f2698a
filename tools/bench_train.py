"""Benchmark: training throughput and peak memory of this trainer (default / optimisations off) vs TRL SFTTrainer.

Offline, on the CPU (or one GPU where present). Every configuration trains the same random Qwen2 (same seed,
the real Qwen vocabulary from review_lm.testing.tiny_model.load_qwen_tokenizer) on the same samples (real Douban users,
../shared/data/douban_dmr/multi_user_4.json, built by this project's data loader), with the same batch,
learning rate and epochs, each in a fresh subprocess so peak memory is its own. Printed side by side:
tokens/s = non-pad tokens of the samples / Trainer's train_runtime, and peak memory (RSS on the CPU,
torch.cuda.max_memory_allocated on a GPU).

Configurations:
  ours            train_distributed_MovieReview.build_trainer with its defaults (packing + completion-only logits)
  ours-off        the same with --disable_packing --disable_completion_only_logits (the trainer before issue 8)
  trl             TRL SFTTrainer, the same ids with a completion_mask (completion-only loss), padded batches
  trl-padfree     the same with SFTConfig(padding_free=True)
For TRL, to match this trainer: gradient_checkpointing=False (its default is on), bf16=False on the CPU (its
default is on), max_length=None for padding_free (the samples are already cut to --max_length), no saving.
TRL still computes its per-step entropy / token-accuracy metrics, which it cannot switch off.

Cases: "tiny" (hidden 64 x 2 layers, all training samples unless --samples_tiny first:N), "0.5b" (the
Qwen2.5-0.5B shape with random weights, a few samples: --samples_05b, by default the 8 longest, i.e.
full-length prompts), "memory" (tiny, max_length 4096, batch 2, the longest samples; ours vs ours-off).

    flock /tmp/heavy.lock .venv/bin/python tools/bench_train.py                 # all cases
    flock /tmp/heavy.lock .venv/bin/python tools/bench_train.py --cases tiny --configs ours ours-off
    flock /tmp/heavy.lock .venv/bin/python tools/bench_train.py --samples_tiny first:32 --samples_05b first:4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
REAL_DATA = os.path.join(REPO, "..", "shared", "data", "douban_dmr", "multi_user_4.json")

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # Qwen/Qwen2.5-0.5B's config.json (random weights here).
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
}
CONFIGS = ("ours", "ours-off", "trl", "trl-padfree")


@dataclasses.dataclass
class Case:
    name: str
    shape: str
    max_length: int
    batch_size: int
    accumulation: int
    samples: str  # "all" | "first:N" | "longest:N"
    configs: tuple[str, ...]


def cases(args) -> list[Case]:
    return [c for c in (
        Case("tiny", "tiny", 512, 2, 8, args.samples_tiny, tuple(args.configs)),
        Case("0.5b", "0.5b", 512, 2, 1, args.samples_05b, tuple(args.configs)),
        Case("memory", "tiny", 4096, 2, 1, f"longest:{args.samples_memory}",
             tuple(c for c in args.configs if c.startswith("ours"))),
    ) if c.name in args.cases]


# --------------------------------------------------------------------------------------------------------------
# Worker (one configuration, in its own process)
# --------------------------------------------------------------------------------------------------------------
def build_model(shape: str, tokenizer, max_length: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=max(4096, max_length),
                         tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def select(lengths, how: str) -> list[int]:
    """Indices of the samples a case trains on: all, the first N, or the N longest."""
    if how == "all":
        return list(range(len(lengths)))
    kind, n = how.split(":")
    if kind == "first":
        return list(range(min(int(n), len(lengths))))
    return sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))[:int(n)]  # "longest"


class SubsetWithLengths:
    """Some samples of a review_lm.data.spec_dataset.ReviewDataset, keeping what the trainer reads (items, lengths)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        self.lengths = dataset.lengths[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]

    def encoded_samples(self) -> list:
        return [self.dataset.encoded(i) for i in self.indices]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    import torch

    import data_loader_movie_review as dl
    import train_distributed_MovieReview as tr
    from review_lm.data import datasets as rd
    from review_lm.testing.tiny_model import load_qwen_tokenizer
    from review_lm.training.plan import plan_hardware, probe_hardware

    config, case = spec["config"], Case(**spec["case"])
    out = tempfile.mkdtemp(prefix="bench-")
    flags = ["--disable_packing", "--disable_completion_only_logits"] if config == "ours-off" else []
    args = tr.parse_args(["--data_file", spec["data"], "--output_dir", out, "--max_length", str(case.max_length),
                          "--batch_size", str(case.batch_size), "--gradient_accumulation_steps",
                          str(case.accumulation), "--learning_rate", "1e-4", "--max_epochs", "1",
                          "--warmup_steps", "0", "--report_to", "none", "--seed", "0", *flags])
    tokenizer = load_qwen_tokenizer()
    data, splits = tr.load_splits(args)
    prepared = rd.prepare_data(data, splits, tokenizer, args.max_length,
                               dl.PromptBuilder(args.use_profile, args.use_history))
    train = SubsetWithLengths(prepared.datasets["train"], select(prepared.datasets["train"].lengths, case.samples))
    # Training only: no validation split (no evaluation inside train_runtime), no checkpoint saving.
    prepared = dataclasses.replace(prepared, datasets={
        **prepared.datasets, "train": train, "val": SubsetWithLengths(prepared.datasets["val"], [])})
    items = [train[i] for i in range(len(train))]
    tokens = sum(len(item["input_ids"]) for item in items)
    labelled = sum(sum(label != -100 for label in item["labels"]) - 1 for item in items)  # next-token targets
    model = build_model(case.shape, tokenizer, case.max_length)
    plan = plan_hardware(args, probe_hardware(args), 1).with_splits(args, False).with_steps(args, len(train))
    if config.startswith("ours"):
        trainer = tr.build_trainer(args, model, tokenizer, prepared, plan)
    else:
        trainer = trl_trainer(args, model, tokenizer, items, plan.runtime, padding_free=config == "trl-padfree")
    trainer.args.save_strategy = "no"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_bytes()
    result = trainer.train()
    runtime = result.metrics["train_runtime"]
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"config": config, "case": case.name, "samples": len(train), "tokens": tokens, "labelled": labelled,
            "runtime_s": runtime, "tokens_per_s": tokens / runtime, "peak_bytes": peak,
            "rss_before_train_bytes": rss_before, "train_loss": result.metrics.get("train_loss"),
            "memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS"}


def trl_trainer(args, model, tokenizer, features: list[dict], plan, padding_free: bool):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # The same token ids as ours; completion_mask marks the review + EOS, so TRL builds the same labels.
    dataset = Dataset.from_list([{"input_ids": f["input_ids"],
                                  "completion_mask": [int(label != -100) for label in f["labels"]]}
                                 for f in features])
    config = SFTConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        num_train_epochs=args.max_epochs, warmup_steps=args.warmup_steps, lr_scheduler_type="linear",
        seed=args.seed, report_to="none", save_strategy="no", logging_strategy="epoch",
        gradient_checkpointing=False, completion_only_loss=True, padding_free=padding_free,
        max_length=None if padding_free else args.max_length, **plan.training_kwargs())
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------
def run_worker(script: str, spec: dict, timeout: int) -> dict | str:
    """``script --worker SPEC`` in a fresh process (its own peak memory, nothing cached from another
    configuration); its last ``RESULT {json}`` line, or one line saying why there is none. Shared with
    tools/bench_conversation.py."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"failed (exit {proc.returncode}): {tail[0][:300]}"
    return json.loads(lines[-1][len("RESULT "):])


def run_config(data: str, case: Case, config: str, timeout: int) -> dict | str:
    return run_worker(__file__, {"data": data, "config": config, "case": dataclasses.asdict(case)}, timeout)


def print_case(case: Case, results: dict[str, dict | str]) -> None:
    print(f"\n== {case.name}: shape {case.shape}, max_length {case.max_length}, batch {case.batch_size} x "
          f"accumulation {case.accumulation}, 1 epoch ==")
    base = results.get("ours-off")
    first = next((r for r in results.values() if isinstance(r, dict)), None)
    if first:
        print(f"   {first['samples']} samples, {first['tokens']} tokens, {first['labelled']} labelled "
              f"({100 * first['labelled'] / first['tokens']:.1f}%); memory: {first['memory_kind']}")
    print(f"   {'config':<12} {'runtime s':>10} {'tokens/s':>10} {'vs ours-off':>12} {'vs trl':>8} "
          f"{'peak GiB':>9} {'vs ours-off':>12} {'train loss':>11}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"   {name:<12} {r}")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if isinstance(base, dict) else "-"
        trl = results.get("trl")
        vs_trl = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if isinstance(trl, dict) else "-"
        mem = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if isinstance(base, dict) else "-"
        loss = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        print(f"   {name:<12} {r['runtime_s']:>10.1f} {r['tokens_per_s']:>10.0f} {speed:>12} {vs_trl:>8} "
              f"{r['peak_bytes'] / 2**30:>9.2f} {mem:>12} {loss:>11}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data_file", default=REAL_DATA, help="review JSON file (real Douban users)")
    parser.add_argument("--cases", nargs="+", choices=["tiny", "0.5b", "memory"], default=["tiny", "0.5b", "memory"])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--samples_tiny", default="all",
                        help="training samples for the tiny shape: all, or first:N")
    parser.add_argument("--samples_05b", default="longest:8",
                        help="training samples for the 0.5B shape: first:N or longest:N (full-length prompts)")
    parser.add_argument("--samples_memory", type=int, default=4, help="longest samples for the memory case")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    parser.add_argument("--json", help="also write all results to this JSON file")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if not os.path.isfile(args.data_file):
        print(f"error: {args.data_file}: no such file (the real data lives in ../shared/data/douban_dmr)",
              file=sys.stderr)
        return 2
    import importlib.util

    configs = list(args.configs)
    if importlib.util.find_spec("trl") is None and any(c.startswith("trl") for c in configs):
        print("trl is not installed (pip install -r requirements-dev.txt): skipping the TRL configurations")
        args.configs = [c for c in configs if not c.startswith("trl")]
    import platform

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); data {args.data_file}")
    everything = []
    for case in cases(args):
        results = {}
        for config in case.configs:
            start = time.time()
            results[config] = run_config(args.data_file, case, config, args.timeout)
            print(f"   [{case.name} / {config}: {time.time() - start:.0f} s]", flush=True)
        print_case(case, results)
        everything.append({"case": dataclasses.asdict(case), "results": results})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(everything, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
