"""Synthetic review histories for benchmarks and scale tests: real Douban texts, cycled, one review a day.

The texts come from ``../shared/data/douban_dmr`` beside the repository (never shipped with it; the example file
when that folder is absent).
"""

from __future__ import annotations

import json
import os

from review_lm.data.prompts import TASK_DESCRIPTION
from review_lm.data.reviews import REVIEW_TYPE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # review_lm/testing/ -> repo
REAL_DIR = os.path.join(REPO, "..", "shared", "data", "douban_dmr")
REAL_DATA = os.path.join(REAL_DIR, "multi_user_4.json")


def review_pool(all_files: bool = False) -> list[dict]:
    """Non-empty real review records: multi_user_4.json (or every file of ../shared/data/douban_dmr)."""
    if all_files and os.path.isdir(REAL_DIR):
        paths = sorted(os.path.join(REAL_DIR, n) for n in os.listdir(REAL_DIR) if n.endswith(".json"))
    else:
        paths = [REAL_DATA if os.path.exists(REAL_DATA) else os.path.join(REPO, "example_movie_review_data.json")]
    pool = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            users = json.load(f)
        pool += [r for u in users for c in u["task"]["task_behavior_collections"] for r in c["data"]
                 if r["continuation"].strip()]
    return pool


def synthetic_user(pool: list[dict], n: int, name: str = "bench", start: int = 0, distinct: bool = False) -> dict:
    """``n`` reviews from ``pool`` (cycled from ``start``), one a day; ``distinct`` makes every text unique."""
    records = []
    for i in range(n):
        r = dict(pool[(start + i) % len(pool)])
        r["timestamp"] = f"{2000 + i // 336}-{1 + (i // 28) % 12:02d}-{1 + i % 28:02d}"
        if distinct:
            r["continuation"] = f"{r['continuation']} ({name}-{i})"
        records.append(r)
    collection = {"type": REVIEW_TYPE, "data": records}
    return {"user": {"profile": {"name": name}},
            "task": {"description": TASK_DESCRIPTION, "task_behavior_collections": [collection]}}


def write_test_set(test_samples: list, folder: str) -> str:
    """``test_samples.json`` + ``test_histories.json`` in ``folder`` for ``test_samples`` (``Sample`` objects
    of the test split), without a tokenizer: evaluation reads only texts, so benchmarks and tests of it need no
    model (prompts rendered by the default ``PromptBuilder``; no token counts). Returns the test file's path."""
    from review_lm.data import prompts
    from review_lm.runs import run_folder, test_set
    from review_lm.utils import write_json_atomic

    builder = prompts.PromptBuilder()
    records = [{"user": s.user.name, "user_index": s.user.index, "record_index": s.target.record_index,
                "movie": s.target.movie, "timestamp": s.target.timestamp, "split": s.split,
                "prompt": builder.render(s), "reference": s.target.text, "position": s.position}
               for s in test_samples]
    os.makedirs(folder, exist_ok=True)
    test_file = os.path.join(folder, run_folder.TEST_SAMPLES)
    write_json_atomic(test_file, records)
    test_set.write_test_histories(os.path.join(folder, run_folder.TEST_HISTORIES), test_samples)
    return test_file
