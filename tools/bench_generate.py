"""How fast does evaluation generate? samples/s with 1 process vs N processes (torchrun; gloo on CPU), and,
where a GPU and vllm exist, HF vs vLLM, on the real users' test split with a tiny model.

A tiny random Qwen2 (``review_lm.testing.tiny_model``, byte-level BPE trained on the review texts) stands in for a
trained run; its test_samples.json is the chronological test split of every file in ``--data`` (default
../shared/data/douban_dmr beside the repository), built by the real loader and dataset. Each configuration runs
``evaluate_movie_review.py`` as a user would; the numbers come from its metrics.json (``generation``:
generation time and samples/s, without model loading and scoring). The predictions of every configuration
are checked to be identical to the single process's (greedy).

    python tools/bench_generate.py --data /path/to/douban_dmr
    python tools/bench_generate.py --processes 1 2 4 --max_new_tokens 64 --batch_size 8
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from review_lm.inference.vllm_backend import vllm_installed  # noqa: E402
from review_lm.testing.synthetic import REAL_DIR, REPO  # noqa: E402

SCRIPT = os.path.join(REPO, "evaluate_movie_review.py")


def make_run(folder: str, files: list[str], max_length: int) -> int:
    """A run folder: tiny model + the real users' test split; returns the number of test samples."""
    from transformers import AutoTokenizer

    import data_loader_movie_review as dl
    from review_lm.data import datasets as rd
    from review_lm.runs import run_folder as rf
    from review_lm.runs import test_set
    from review_lm.testing.tiny_model import make_tiny_model

    make_tiny_model(folder, tokenizer_kind="bpe", corpus=files, vocab_size=2000, hidden_size=128, num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    splits = dl.split_chronologically(dl.load_review_data(files))
    test = rd.build_datasets({"test": splits["test"]}, tokenizer, max_length, dl.PromptBuilder())["test"]
    test_set.write_test_samples(os.path.join(folder, rf.TEST_SAMPLES), test.encoded_samples())
    test_set.write_test_histories(os.path.join(folder, rf.TEST_HISTORIES), splits["test"])
    return len(splits["test"])


def evaluate(run: str, out: str, processes: int, backend: str, args: argparse.Namespace) -> dict:
    cmd = [SCRIPT, "--model_dir", run, "--output_dir", out, "--backend", backend, "--batch_size",
           str(args.batch_size), "--max_new_tokens", str(args.max_new_tokens), "--bootstrap", "0", "--no_progress"]
    if processes > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    # torchrun gives every process OMP_NUM_THREADS=1; the single process gets the same, so that the figures
    # compare processes, not thread counts (a 2-thread process on a busy 2-core machine oversubscribes badly).
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    started = time.time()
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"error: {backend} x {processes}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        generation = json.load(f)["generation"]
    with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
        predictions = [json.loads(line)["prediction"] for line in f]
    return {"wall_s": time.time() - started, "generation_s": generation["generation_time_s"],
            "samples_per_s": generation["samples_per_s"], "predictions": predictions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=REAL_DIR, help="folder of review files (default ../shared/data/douban_dmr)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time (1 2)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--max_length", type=int, default=1024, help="prompt length cap of the test split (1024)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (1, torchrun's default)")
    args = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.data, "*.json")))
    if not files:
        print(f"error: {args.data}: no review files (*.json); pass --data DIR", file=sys.stderr)
        return 2
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        n = make_run(run, files, args.max_length)
        print(f"{n} test samples of {len(files)} files in {args.data}; tiny model; batch {args.batch_size}, "
              f"max_new_tokens {args.max_new_tokens}, greedy; {os.cpu_count()} CPU cores, {args.threads} thread(s) "
              f"per process; load average {os.getloadavg()[0]:.1f}")
        configs = [("hf", k) for k in args.processes]
        if torch.cuda.is_available() and vllm_installed():
            configs.append(("vllm", 1))
        results = {}
        for backend, k in configs:
            results[(backend, k)] = evaluate(run, os.path.join(tmp, f"{backend}{k}"), k, backend, args)
        first = results[configs[0]]
        print("| backend | processes | generation s | samples/s | speed-up | wall s (load + score too) | "
              "same predictions |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for (backend, k), r in results.items():
            same = sum(a == b for a, b in zip(r["predictions"], first["predictions"], strict=True))
            print(f"| {backend} | {k} | {r['generation_s']:.1f} | {r['samples_per_s']:.2f} | "
                  f"{r['samples_per_s'] / first['samples_per_s']:.2f}x | {r['wall_s']:.1f} | {same}/{n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
