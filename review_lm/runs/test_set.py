"""The test set a run writes and evaluation reads: test_samples.json (one record per test review: prompt,
reference, position) and test_histories.json (each test user's earlier reviews, stored once), and
:class:`SampleSet`, the typed reader of either layout. File names live in ``review_lm.runs.run_folder``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from review_lm.data import prompts
from review_lm.data.reviews import Sample, json_path
from review_lm.runs.run_folder import TEST_HISTORIES, TEST_SAMPLES, path, read_json
from review_lm.utils import UsageError, write_atomic, write_json_atomic

RUN_DIGEST_KEY = "run_digest"  # in every test sample and in test_histories.json: the two files are one run's


def write_test_samples(file: str, records: Iterable, run_digest: str | None = None) -> None:
    """test_samples.json: a JSON list of ``prompts.sample_record`` objects (what the spec's Q2 loads), one sample per
    line, written record by record without holding every test prompt in memory at once. One line per sample
    rather than an indented tree: json's C encoder writes it (``indent`` switches to the pure-Python one).
    ``run_digest`` (the run fingerprint's digest) goes into every sample, and into test_histories.json."""
    extra = {RUN_DIGEST_KEY: run_digest} if run_digest else {}

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            first = True
            for record in records:
                f.write(("[\n" if first else ",\n")
                        + json.dumps({**prompts.sample_record(record), **extra}, ensure_ascii=False))
                first = False
            f.write("[]\n" if first else "\n]\n")

    write_atomic(file, write)


def write_test_histories(file: str, test_samples: list[Sample], run_digest: str | None = None) -> None:
    histories = prompts.test_histories(test_samples)
    write_json_atomic(file, {**histories, RUN_DIGEST_KEY: run_digest} if run_digest else histories)


def _sample_location(samples: Any, where: list[str | int]) -> str:
    """``sample #3 (user 0 Y), field 'reference'``: where a bad string sits in test_samples.json."""
    if not (where and isinstance(where[0], int) and isinstance(samples, list) and isinstance(samples[where[0]], dict)):
        return json_path(where)
    sample = samples[where[0]]
    user = " ".join(str(sample[k]) for k in ("user_index", "user") if isinstance(sample.get(k), (int, str)))
    return f"sample #{where[0]}" + (f" (user {user})" if user else "") + f", field '{json_path(where[1:])}'"


def _history_location(histories: Any, where: list[str | int]) -> str:
    """``user entry #0 (user 0), reviews[5]``: where a bad string sits in test_histories.json."""
    if len(where) > 2 and where[0] == "users" and isinstance(where[1], int):
        entry = histories["users"][where[1]]
        user = entry.get("user_index") if isinstance(entry, dict) else None
        return f"user entry #{where[1]}" + (f" (user {user})" if user is not None else "") + \
            f", field '{json_path(where[2:])}'"
    return json_path(where)


def histories_before_test(users: Sequence[Any], earlier_reviews: Sequence[Sequence[str]]) -> dict[Any, list[str]]:
    """Per user, the reviews written before the test split: the shortest of the user's test samples' earlier
    reviews (the earliest test sample's history = all train + val reviews). Users in first-sample order."""
    out: dict[Any, list[str]] = {}
    for user, earlier in zip(users, earlier_reviews, strict=True):
        if user not in out or len(earlier) < len(out[user]):
            out[user] = list(earlier)
    return out


@dataclass
class SampleSet:
    """The test samples of a run, and (when known) each sample's earlier reviews.

    Two layouts are read: the current one (each sample's ``position`` + the user's reviews once, in
    test_histories.json beside test_samples.json) and the earlier one (each sample carrying its own
    ``earlier_reviews`` list).
    """

    path: str
    samples: list[dict[str, Any]]
    histories: dict[int, dict[str, Any]] | None = None  # user_index -> test_histories.json entry (current layout)

    @property
    def references(self) -> list[str]:
        return [s["reference"] for s in self.samples]

    @staticmethod
    def user_key(sample: dict[str, Any]) -> Any:
        """Who wrote a test sample: its user index (its name in files written before indices were recorded)."""
        return sample.get("user_index", sample.get("user"))

    def user_keys(self) -> list[Any]:
        return [self.user_key(s) for s in self.samples]

    @property
    def has_history(self) -> bool:
        """Every sample's earlier reviews are known, so the baselines (and style metrics) can be computed."""
        return self.histories is not None or all("earlier_reviews" in s for s in self.samples)

    def earlier_reviews(self, i: int) -> list[str]:
        """The review texts the user of sample ``i`` wrote before it, oldest first."""
        sample = self.samples[i]
        if self.histories is None:
            return sample["earlier_reviews"]
        return self.histories[sample["user_index"]]["reviews"][:sample["position"]]

    def all_earlier_reviews(self) -> list[list[str]]:
        return [self.earlier_reviews(i) for i in range(len(self.samples))]

    def reviews_before_test(self) -> dict[int, list[str]]:
        """Per user, the reviews written before the test split (train + validation): never a test review."""
        if self.histories is not None:
            return {u: h["reviews"][:h["test_start"]] for u, h in self.histories.items()}
        return histories_before_test(self.user_keys(), self.all_earlier_reviews())


def load_test_samples(file: str) -> SampleSet:
    """Read and check ``test_samples.json``: a non-empty list of objects with string prompt and reference."""
    data = read_json(file, _sample_location)
    expected = f"expected {TEST_SAMPLES} as written by train_distributed_MovieReview.py"
    if not isinstance(data, list):
        raise UsageError(f"{file}: not a list of test samples ({expected})")
    if not data:
        raise UsageError(f"{file}: the test set is empty (no samples to evaluate)")
    for i, sample in enumerate(data):
        if not isinstance(sample, dict):
            raise UsageError(f"{file}: sample #{i} is not an object ({expected})")
        for key in ("prompt", "reference"):
            if not isinstance(sample.get(key), str):
                raise UsageError(f"{file}: sample #{i} has no '{key}' string ({expected})")
        earlier = sample.get("earlier_reviews")
        if earlier is not None and not (isinstance(earlier, list) and all(isinstance(r, str) for r in earlier)):
            raise UsageError(f"{file}: sample #{i}: 'earlier_reviews' must be a list of strings")
    digests = {s.get(RUN_DIGEST_KEY) for s in data} - {None}
    if len(digests) > 1:
        raise UsageError(f"{file}: its samples come from {len(digests)} different runs ({RUN_DIGEST_KEY} "
                         f"{', '.join(sorted(map(str, digests)))}); use one run's {TEST_SAMPLES}")
    histories_file = path(os.path.dirname(os.path.abspath(file)), TEST_HISTORIES)
    if all("earlier_reviews" in s for s in data) or not os.path.isfile(histories_file):
        return SampleSet(file, data)
    return SampleSet(file, data, load_test_histories(histories_file, file, data))


def load_test_histories(file: str, samples_file: str, samples: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """test_histories.json, checked against the samples it serves (one-line errors naming the file)."""
    data = read_json(file, _history_location)
    if not (isinstance(data, dict) and data.get("format") == prompts.TEST_HISTORIES_FORMAT
            and isinstance(data.get("users"), list)):
        raise UsageError(f"{file}: not a {TEST_HISTORIES} written by train_distributed_MovieReview.py")
    ours, theirs = data.get(RUN_DIGEST_KEY), next((s.get(RUN_DIGEST_KEY) for s in samples), None)
    if ours and theirs and ours != theirs:  # files written before the digest existed carry none: not compared
        raise UsageError(f"{samples_file} and {file} come from different runs ({RUN_DIGEST_KEY} {theirs} vs "
                         f"{ours}); keep each run's two files together")
    histories: dict[int, dict[str, Any]] = {}
    for k, entry in enumerate(data["users"]):
        reviews = entry.get("reviews") if isinstance(entry, dict) else None
        if not (isinstance(reviews, list) and all(isinstance(r, str) for r in reviews)
                and isinstance(entry.get("user_index"), int) and isinstance(entry.get("test_start"), int)):
            raise UsageError(f"{file}: user entry #{k} needs user_index, test_start and a list of review strings")
        histories[entry["user_index"]] = entry
    for i, s in enumerate(samples):
        entry = histories.get(s.get("user_index"))
        position = s.get("position")
        if entry is None or not isinstance(position, int) or not 0 <= position <= len(entry["reviews"]):
            raise UsageError(f"{samples_file}: sample #{i} (user {s.get('user_index')!r}, position {position!r}) has "
                             f"no earlier reviews in {file}: the two files are not from the same run")
    return histories


def prompt_format_of(sample: dict[str, Any]) -> str:
    """Which ``--prompt_format`` wrote a test_samples.json record: its ``prompt_format`` when recorded, else
    recognised from the prompt. Pure. A spec prompt (with or without chat framing) holds its request line with
    the newline (``PromptBuilder.request``: "请为电影《X》写一条影评：\\n"); a conversation prompt ends the same
    request text with the chat layout's end of the user turn instead (``<|im_end|>`` in ChatML)."""
    recorded = sample.get("prompt_format")
    if recorded in prompts.PROMPT_FORMATS:
        return recorded
    prompt, movie = sample.get("prompt"), sample.get("movie")
    if not isinstance(prompt, str) or not isinstance(movie, str):
        return "spec"
    return "spec" if prompts.PromptBuilder.request(movie) in prompt else "conversation"


def check_test_format(samples: Sequence[dict[str, Any]], run_format: str, test_file: str, model_dir: str) -> None:
    """Refuse (one line) test prompts of another ``--prompt_format`` than the model's run: the model would be
    fed prompts in a layout it never saw, and metrics.json would record its own format beside them."""
    found = {prompt_format_of(s) for s in samples}
    other = sorted(found - {run_format})
    if other:
        raise UsageError(f"{test_file}: its prompts are in the {'/'.join(other)} format but {model_dir} was trained "
                         f"with --prompt_format {run_format}; use that run's own {TEST_SAMPLES}")
