"""Benchmarks for the data path, with the real Qwen vocabulary and real Douban review texts.

Two modes:

* ``--sizes``: one user with a growing history. Building a user's samples from cached token pieces vs
  re-tokenizing every rendered prompt (a user's n-th sample repeats all n-1 earlier reviews, so the latter costs
  O(n^2) tokenizer work); checks that both give identical ids.
* ``--users N --reviews M``: many users. A synthetic file of N users x M reviews (the real review texts of
  ../shared/data/douban_dmr cycled, or the example file's) is generated into a temporary folder (never kept),
  then each of these runs in a fresh process, so time and peak RSS are its own:
    - new path: JSON -> training-ready dataset (``review_dataset.build_datasets``: compact pieces, lazy samples);
    - old path: the same with the eager ``SampleTokenizer`` and a list of feature dicts (the code before
      issue 9); skipped above ``--old_max_reviews`` or stopped by ``--old_memory_gb`` (it needs ~35 KB/sample);
    - the loader CLI report, new and old (the old module is taken from git, commit ``--old_ref``).

    python tools/bench_loader.py                 # sizes 250 500 1000 2000
    python tools/bench_loader.py --sizes 100 400 --naive_max 400
    flock /tmp/heavy.lock python tools/bench_loader.py --users 10000 --reviews 100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import data_loader_movie_review as dl  # noqa: E402
from review_lm.testing.synthetic import REPO, review_pool, synthetic_user  # noqa: E402

OLD_REF = "22f8345"  # the last commit before issue 9 (eager samples, one input file)


# ------------------------------------------------------------------------------------------------------------
# Mode 1: one growing user
# ------------------------------------------------------------------------------------------------------------
def bench_sizes(args) -> int:
    from review_lm.testing.tiny_model import load_qwen_tokenizer

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


# ------------------------------------------------------------------------------------------------------------
# Mode 2: many users, each measurement in its own process
# ------------------------------------------------------------------------------------------------------------
def write_synthetic_file(path: str, users: int, reviews: int, distinct: bool) -> None:
    pool = review_pool(all_files=True)
    with open(path, "w", encoding="utf-8") as f:  # streamed, one user at a time
        f.write("[")
        for u in range(users):
            user = synthetic_user(pool, reviews, f"user{u:05d}", start=u * 7, distinct=distinct)
            f.write(("," if u else "") + json.dumps(user, ensure_ascii=False))
        f.write("]")


def child_build(path: str, max_length: int, old_loader: str | None) -> dict:
    """Runs in a fresh process: JSON file -> training-ready dataset, new or old path."""
    t0 = time.perf_counter()
    from review_lm.testing.tiny_model import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer()
    t_tok = time.perf_counter()
    if old_loader:  # the pre-issue-9 module: eager ids, a list of feature dicts per split
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_loader", old_loader)
        old = sys.modules["old_loader"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(old)
        data = old.load_review_file(path)
        splits = old.split_chronologically(data)
        t_load = time.perf_counter()
        encoder = old.SampleTokenizer(tokenizer, max_length, old.PromptBuilder())
        ready = {name: [e.as_features() for e in encoder.encode_split(ss)] for name, ss in splits.items()}
        samples = sum(len(v) for v in ready.values())
        t_end, peak, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cpu_seconds()
        extra = {"prompt_tokens": sum(len(f["input_ids"]) for v in ready.values() for f in v)}
    else:
        from review_lm.data import datasets as rd

        data = dl.load_review_data(path)
        splits = dl.split_chronologically(data)
        t_load = time.perf_counter()
        ready = rd.build_datasets(splits, tokenizer, max_length, dl.PromptBuilder())
        t_end, peak, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cpu_seconds()
        samples = sum(len(v) for v in ready.values())
        tokens = next(iter(ready.values())).tokens
        distinct_texts = {r.text for u in data.users for r in u.reviews}
        review_tokens = int(sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                for t in list(distinct_texts)[:20000]))
        if len(distinct_texts) > 20000:  # estimate from a sample for huge distinct sets
            review_tokens = review_tokens * len(distinct_texts) // 20000
        held, distinct = current_rss_gb(), len(distinct_texts)
        del data, splits, distinct_texts
        for v in ready.values():
            v.release_texts()  # what ranks other than 0 keep: only the arrays
        gc.collect()
        index = tokens.index_nbytes + sum(v.nbytes for v in ready.values())
        extra = {"pieces": len(tokens.store.offsets) - 1, "piece_tokens": len(tokens.store.tokens),
                 "distinct_review_texts": distinct, "distinct_review_tokens": review_tokens,
                 "dataset_bytes": index + tokens.store.nbytes, "pieces_bytes": tokens.store.nbytes,
                 "index_bytes_per_sample": index / samples,
                 "prompt_tokens": int(sum(int(v.lengths.sum()) for v in ready.values())),
                 "rss_held_gb": held, "rss_arrays_only_gb": current_rss_gb()}
    return {"samples": samples, "tokenizer_s": t_tok - t0, "load_split_s": t_load - t_tok,
            "tokens_s": t_end - t_load, "total_s": t_end - t0, "cpu_s": cpu, "peak_rss_gb": peak / 2**20, **extra}


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def cpu_seconds() -> float:
    """User + system CPU time of this process: what a contended machine distorts least."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(argv: list[str], memory_gb: float | None = None, stdout=subprocess.PIPE) -> tuple[dict | None, str]:
    """Run ``argv`` (a Python command) in a fresh process; return (its JSON result or None, why not)."""
    def limit() -> None:  # an address-space cap turns "would swap the machine to death" into a MemoryError
        if memory_gb:
            cap = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=limit, env=dict(os.environ, TOKENIZERS_PARALLELISM="true", HF_HUB_OFFLINE="1"))
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # max over children so far: reported per child below
    if proc.returncode != 0:
        why = "out of memory" if "MemoryError" in (err or "") else f"exit {proc.returncode}: {(err or '')[-300:]}"
        return None, why
    result = json.loads(out.strip().splitlines()[-1]) if out and out.strip() else {}
    result.setdefault("total_s", wall)
    result["wall_s"] = wall
    result.setdefault("peak_rss_gb", usage.ru_maxrss / 2**20)
    return result, ""


CLI_PROBE = (
    "import json, resource, runpy, sys, time\n"
    "module, path = sys.argv[1], sys.argv[2]\n"
    "sys.argv = [module, path]\n"
    "t0 = time.perf_counter()\n"
    "try:\n"
    "    runpy.run_path(module, run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    assert exc.code in (0, None), exc.code\n"
    "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
    "sys.stdout = sys.__stdout__\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(json.dumps({'total_s': time.perf_counter() - t0, 'imports_torch': bool(heavy),\n"
    "                  'cpu_s': usage.ru_utime + usage.ru_stime,\n"
    "                  'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))\n"
)


def bench_users(args) -> int:
    reviews = args.users * args.reviews
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        path = os.path.join(tmp, f"users{args.users}x{args.reviews}.json")
        t0 = time.perf_counter()
        write_synthetic_file(path, args.users, args.reviews, args.distinct)
        print(f"synthetic file: {args.users:,} users x {args.reviews} reviews = {reviews:,} reviews, "
              f"{os.path.getsize(path) / 2**20:.0f} MiB ({'distinct' if args.distinct else 'cycled real'} texts; "
              f"written in {time.perf_counter() - t0:.1f} s); --max_length {args.max_length}")
        old_loader = os.path.join(tmp, "old_loader.py")
        with open(old_loader, "wb") as f:
            f.write(subprocess.run(["git", "show", f"{args.old_ref}:data_loader_movie_review.py"], cwd=REPO,
                                   check=True, capture_output=True).stdout)
        me = [sys.executable, os.path.abspath(__file__)]

        rows = []
        new, why = run_child([*me, "--child", path, "--max_length", str(args.max_length)])
        rows.append(("new: JSON -> dataset", new, why))
        if reviews <= args.old_max_reviews:
            old, why = run_child([*me, "--child", path, "--max_length", str(args.max_length), "--child_old",
                                  old_loader], memory_gb=args.old_memory_gb)
        else:
            old, why = None, f"skipped (> --old_max_reviews {args.old_max_reviews:,})"
        rows.append(("old: JSON -> feature lists", old, why))
        module = os.path.join(REPO, "data_loader_movie_review.py")
        cli, why = run_child([sys.executable, "-c", CLI_PROBE, module, path], stdout=subprocess.PIPE)
        rows.append(("new: loader CLI report", cli, why))
        if reviews <= args.old_cli_max_reviews:
            old_cli, why = run_child([sys.executable, "-c", CLI_PROBE, old_loader, path])
        else:
            old_cli, why = None, f"skipped (> --old_cli_max_reviews {args.old_cli_max_reviews:,})"
        rows.append(("old: loader CLI report", old_cli, why))

    print(f"{'run':<28} {'wall':>8} {'CPU':>8} {'peak RSS':>9}  details")
    for name, result, why in rows:
        if result is None:
            print(f"{name:<28} {'-':>8} {'-':>8} {'-':>9}  {why}")
            continue
        details = []
        if "load_split_s" in result:
            details.append(f"tokenizer load {result['tokenizer_s']:.1f} s, JSON+split {result['load_split_s']:.1f} s,"
                           f" tokens {result['tokens_s']:.1f} s; {result['samples']:,} samples,"
                           f" {result['prompt_tokens']:,} sample tokens")
        if "dataset_bytes" in result:
            per_token = result["pieces_bytes"] / max(1, result["distinct_review_tokens"])
            details.append(f"dataset {result['dataset_bytes'] / 2**20:.1f} MiB = index "
                           f"{result['index_bytes_per_sample']:.0f} B/sample + pieces "
                           f"{result['pieces_bytes'] / 2**20:.2f} MiB ({result['pieces']:,} pieces, "
                           f"{result['piece_tokens']:,} tokens = {per_token:.1f} B per distinct review token; "
                           f"{result['distinct_review_texts']:,} distinct texts, "
                           f"{result['distinct_review_tokens']:,} tokens)")
        if "rss_held_gb" in result:
            details.append(f"RSS after: {result['rss_held_gb']:.2f} GB with the texts, "
                           f"{result['rss_arrays_only_gb']:.2f} GB with the arrays only (ranks > 0)")
        if "imports_torch" in result:
            details.append("imports torch" if result["imports_torch"] else "no torch import")
        print(f"{name:<28} {result['total_s']:>6.1f} s {result.get('cpu_s', 0):>6.1f} s "
              f"{result['peak_rss_gb']:>6.2f} GB  " + "; ".join(details))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000], help="reviews per user")
    parser.add_argument("--naive_max", type=int, default=1000, help="largest size to time the O(n^2) way")
    parser.add_argument("--max_length", type=int, default=4096, help="token budget per sample")
    parser.add_argument("--users", type=int, help="many-users mode: number of users")
    parser.add_argument("--reviews", type=int, default=100, help="many-users mode: reviews per user")
    parser.add_argument("--distinct", action="store_true", help="make every review text unique (no sharing)")
    parser.add_argument("--old_max_reviews", type=int, default=200_000, help="largest input for the old path")
    parser.add_argument("--old_memory_gb", type=float, default=12.0, help="address-space cap for the old path")
    parser.add_argument("--old_cli_max_reviews", type=int, default=200_000,
                        help="largest input for the old (users x samples) CLI report")
    parser.add_argument("--old_ref", default=OLD_REF, help="git commit of the old loader")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_old", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_build(args.child, args.max_length, args.child_old)))
        return 0
    return bench_users(args) if args.users else bench_sizes(args)


if __name__ == "__main__":
    sys.exit(main())
