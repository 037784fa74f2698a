"""Benchmark: building one user's samples from cached token pieces vs re-tokenizing every rendered prompt.

A user's n-th sample repeats all n-1 earlier reviews, so tokenizing each rendered prompt costs O(n^2)
tokenizer work; ``SampleTokenizer`` tokenizes each review once and assembles ids from the pieces. This prints
both timings for growing synthetic histories made from the real Douban reviews in ../shared (or the example
file) with the real Qwen vocabulary, and checks that both give identical ids.

    python tools/bench_loader.py                 # sizes 250 500 1000 2000
    python tools/bench_loader.py --sizes 100 400 --naive_max 400
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import data_loader_movie_review as dl  # noqa: E402
from tools.make_tiny_model import load_qwen_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA = os.path.join(REPO, "..", "shared", "data", "douban_dmr", "multi_user_4.json")


def review_pool() -> list[dict]:
    path = REAL_DATA if os.path.exists(REAL_DATA) else os.path.join(REPO, "example_movie_review_data.json")
    users = json.load(open(path, encoding="utf-8"))
    return [r for u in users for c in u["task"]["task_behavior_collections"] for r in c["data"]
            if r["continuation"].strip()]


def synthetic_user(pool: list[dict], n: int) -> dict:
    records = []
    for i in range(n):
        r = dict(pool[i % len(pool)])
        r["timestamp"] = f"{2000 + i // 336}-{1 + (i // 28) % 12:02d}-{1 + i % 28:02d}"
        records.append(r)
    return {"user": {"profile": {"name": "bench"}},
            "task": {"description": "基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式",
                     "task_behavior_collections": [{"type": "movie_review", "data": records}]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000], help="reviews per user")
    parser.add_argument("--naive_max", type=int, default=1000, help="largest size to time the O(n^2) way")
    parser.add_argument("--max_length", type=int, default=4096, help="token budget for the budgeted timing")
    args = parser.parse_args()

    tokenizer = load_qwen_tokenizer()
    pool = review_pool()
    print(f"{'reviews':>8} {'pieces, full history':>21} {'re-tokenize prompts':>20} {'speed-up':>9} "
          f"{'pieces, budget ' + str(args.max_length):>22} {'prompt tokens':>14}")
    for n in args.sizes:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
            json.dump([synthetic_user(pool, n)], f, ensure_ascii=False)
        data = dl.load_review_file(f.name)
        os.unlink(f.name)
        samples = [s for ss in dl.split_chronologically(data).values() for s in ss]

        t0 = time.perf_counter()
        fast = dl.SampleTokenizer(tokenizer, None).encode_split(samples)
        t_fast = time.perf_counter() - t0
        total_tokens = sum(e.prompt_length for e in fast)

        t_naive = None
        if n <= args.naive_max:
            builder = dl.PromptBuilder()
            t0 = time.perf_counter()
            naive = [tokenizer(builder.render(s), add_special_tokens=False)["input_ids"] for s in samples]
            t_naive = time.perf_counter() - t0
            assert naive == [e.input_ids[: e.prompt_length] for e in fast], "assembled ids differ"

        t0 = time.perf_counter()
        dl.SampleTokenizer(tokenizer, args.max_length).encode_split(samples)
        t_budget = time.perf_counter() - t0
        naive_txt = f"{t_naive:.2f} s" if t_naive is not None else "skipped"
        speed = f"{t_naive / t_fast:.0f}x" if t_naive is not None else "-"
        print(f"{n:>8} {t_fast:>19.2f} s {naive_txt:>20} {speed:>9} {t_budget:>20.2f} s {total_tokens:>14,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
