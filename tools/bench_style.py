"""Do the metrics tell a user's own words from a stranger's? And how fast are the style metrics?

Two parts:

* **Real users** (every file of ../shared/data/douban_dmr, or ``--data``): the chronological test split is
  written as a test set (``review_lm.testing.synthetic.write_test_set``, no model), then real reviews are given to
  ``evaluate_movie_review.py --predictions`` as if a model had written them, one kind per run:
    - ``own_last_train``: the user's last review before the test split (a copy of a training text);
    - ``own_random_train``: a random review of the same user from before the test split;
    - ``other_user_random``: a random review from before the test split of another user;
    - ``real_test``: the real test review itself (attribution = the ceiling).
  ``--compare`` then prints them side by side with the baselines and chance, and draws the chart.
* **Scale** (``--scale_users N --scale_reviews M``, 0 users to skip): N synthetic users x M reviews (real texts
  cycled, ``review_lm.testing.synthetic.synthetic_user``); the style metrics of three systems (the two baselines and the
  real test reviews) on the resulting test split, timed, next to the overlap metrics of one system.

    python tools/bench_style.py                        # real users + 100 and 1,000 users x 100 reviews
    flock /tmp/heavy.lock python tools/bench_style.py --scale_users 30 3000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import data_loader_movie_review as dl  # noqa: E402
import evaluate_movie_review as ev  # noqa: E402
from review_lm.runs.run_folder import load_test_samples  # noqa: E402
from review_lm.runs.test_set import SampleSet
from review_lm.testing.synthetic import REAL_DIR, REPO, review_pool, synthetic_user, write_test_set  # noqa: E402

KINDS = ("own_last_train", "own_random_train", "other_user_random", "real_test")


def fake_predictions(test: SampleSet, kind: str, seed: int) -> list[str]:
    """One real review per test sample, chosen by ``kind`` (see the module doc)."""
    rng = random.Random(seed)
    before = test.reviews_before_test()
    users = test.user_keys()
    if kind == "own_last_train":
        return [before[u][-1] if before[u] else "" for u in users]
    if kind == "own_random_train":
        return [rng.choice(before[u]) if before[u] else "" for u in users]
    if kind == "other_user_random":
        return [rng.choice([t for k, texts in before.items() if k != u for t in texts]) for u in users]
    if kind == "real_test":
        return test.references
    raise ValueError(kind)


def write_jsonl(path: str, test: SampleSet, predictions: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (s, p) in enumerate(zip(test.samples, predictions, strict=True)):
            f.write(json.dumps({"index": i, "user_index": s["user_index"], "record_index": s["record_index"],
                                "prediction": p}, ensure_ascii=False) + "\n")


def real_users(data: list[str], out: str, seed: int) -> None:
    splits = dl.split_chronologically(dl.load_review_data(data))
    test_file = write_test_set(splits["test"], os.path.join(out, "test_set"))
    test = load_test_samples(test_file)
    print(f"{len(test.samples)} test samples of {len({s['user_index'] for s in test.samples})} users from "
          f"{', '.join(data)}\n")
    runs = []
    for kind in KINDS:
        predictions = os.path.join(out, "predictions", f"{kind}.jsonl")
        os.makedirs(os.path.dirname(predictions), exist_ok=True)
        write_jsonl(predictions, test, fake_predictions(test, kind, seed))
        runs.append(os.path.join(out, kind))
        started = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = ev.main(["--test_file", test_file, "--predictions", predictions, "--output_dir", runs[-1],
                          "--overwrite", "--seed", str(seed)])
        if rc:
            sys.exit(rc)
        print(f"evaluated {kind}: {time.time() - started:.1f} s (whole evaluation)")
    print()
    ev.main(["--compare", *runs, "--compare_out", os.path.join(out, "bench_style.png")])


def scale(users: int, reviews: int, seed: int) -> None:
    from review_lm.evaluation.metrics import compute_baselines, compute_metrics, sample_rouge
    from review_lm.evaluation.style_report import style_metrics

    pool = review_pool(all_files=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_file = os.path.join(tmp, "users.json")
        with open(data_file, "w", encoding="utf-8") as f:
            json.dump([synthetic_user(pool, reviews, name=f"u{k}", start=k * 7) for k in range(users)], f,
                      ensure_ascii=False)
        splits = dl.split_chronologically(dl.load_review_data(data_file))
        test = load_test_samples(write_test_set(splits["test"], os.path.join(tmp, "test_set")))
        n = len(test.samples)
        print(f"\nscale: {users} synthetic users x {reviews} reviews -> {n} test samples, "
              f"{sum(len(v) for v in test.reviews_before_test().values())} training texts for attribution")
        systems = compute_baselines(test.all_earlier_reviews(), seed)
        systems["real"] = test.references
        started = time.time()
        result = style_metrics(test, systems, None, "model", None, seed, {}, "style.png")
        style_s = time.time() - started
        started = time.time()
        result.write_figure(os.path.join(tmp, "style.png"))
        figure_s = time.time() - started
        started = time.time()
        compute_metrics(systems["last"], test.references, sample_rouge(systems["last"], test.references))
        overlap_s = time.time() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    method = result.section["attribution_model"]["method"]
    print(f"style metrics of 3 systems: {style_s:.1f} s ({method}; fit + ceiling + 3 x (attribution, copying, "
          f"features, per-user rows)); figure {figure_s:.1f} s; overlap metrics of ONE system {overlap_s:.1f} s; "
          f"peak RSS {peak_gb:.2f} GB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=[REAL_DIR], help="review files/folders (default: all real users)")
    p.add_argument("--out", default=os.path.join(REPO, "outputs", "bench_style"), help="where runs are written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale_users", type=int, nargs="+", default=[100, 1000],
                   help="synthetic users for the timing, one run each (0: skip)")
    p.add_argument("--scale_reviews", type=int, default=100)
    args = p.parse_args(argv)
    real_users(args.data, args.out, args.seed)
    for users in args.scale_users:
        if users:
            scale(users, args.scale_reviews, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
