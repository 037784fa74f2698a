"""Benchmark: ``--preview_only`` on many users - time and the size of the test-set files, for this
checkout and for an earlier commit, side by side in one run (each run in a fresh process).

    python tools/bench_preview.py --users 10000 --reviews 100            # 1M reviews
    python tools/bench_preview.py --users 1000 --reviews 100 --old_ref fc1bb7d

The data is synthetic (real Douban texts cycled, ``review_lm.testing.synthetic``), written into a temporary folder and
removed afterwards; the tokenizer is the real Qwen vocabulary inside a tiny model folder (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from review_lm.testing.synthetic import REPO, review_pool, synthetic_user  # noqa: E402

OLD_REF = "fc1bb7d"  # before test_samples.json stopped repeating each sample's history (issue 17)


def write_data(path: str, users: int, reviews: int) -> None:
    pool = review_pool(all_files=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump([synthetic_user(pool, reviews, f"user{u:05d}", start=u * 7) for u in range(users)], f,
                  ensure_ascii=False)


def run_preview(repo: str, data: str, model: str, out: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(repo, "train_distributed_MovieReview.py"), "--data_file", data,
                           "--output_dir", out, "--model_path", model, "--preview_only", "--report_to", "none"],
                          capture_output=True, text=True, env=env, cwd=repo)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{repo}: preview failed: {proc.stderr[-2000:]}")
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in ("test_samples.json", "test_histories.json")
             if os.path.exists(os.path.join(out, name))}
    return {"seconds": seconds, "sizes": sizes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--reviews", type=int, default=100)
    parser.add_argument("--old_ref", default=OLD_REF, help="git commit to compare with ('' for none)")
    args = parser.parse_args()
    from review_lm.testing.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.json")
        write_data(data, args.users, args.reviews)
        model = make_tiny_model(os.path.join(tmp, "tiny"), hidden_size=8, num_layers=1, num_heads=1)
        runs = {"this checkout": REPO}
        if args.old_ref:
            old = os.path.join(tmp, "old")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", old, args.old_ref], check=True,
                           capture_output=True)
            runs[f"commit {args.old_ref}"] = old
        results = {}
        try:
            for name, repo in runs.items():  # the older one last: it needs more memory
                results[name] = run_preview(repo, data, model, os.path.join(tmp, f"out-{len(results)}"))
        finally:
            if args.old_ref:
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", old], capture_output=True)
    print(f"--preview_only on {args.users} users x {args.reviews} reviews ({args.users * args.reviews:,} reviews)")
    print("| run | time | test_samples.json | test_histories.json | total |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        samples, histories = r["sizes"].get("test_samples.json", 0), r["sizes"].get("test_histories.json", 0)
        print(f"| {name} | {r['seconds']:.1f} s | {samples / 2**20:,.0f} MiB | "
              f"{histories / 2**20:,.0f} MiB | {(samples + histories) / 2**20:,.0f} MiB |")
    if len(results) == 2:
        new, old = results.values()
        total = sum(new["sizes"].values()) / sum(old["sizes"].values())
        print(f"\nfiles: {total:.2f}x the earlier size; time: {new['seconds'] / old['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
