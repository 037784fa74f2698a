"""Tests for evaluation at scale: the batch plan and partial files (review_lm.inference.resumable), data-parallel
generation under torchrun (2 CPU processes, gloo) against one process, and a SIGKILL'ed evaluation that resumes.

The kill is deterministic: a sitecustomize.py put on PYTHONPATH wraps PartialWriter.write_batch and SIGKILLs the
process right after its N-th batch is on disk (no timing race, no hook in the code under test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from review_lm.inference import resumable
from review_lm.utils import UsageError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "evaluate_movie_review.py")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import clean_env, one_line_error  # noqa: E402

KILL_HOOK = """
import os, signal
_after = int(os.environ.get("EVAL_KILL_AFTER_BATCHES", "0"))
if _after:
    from review_lm.inference import resumable
    _write, _count = resumable.PartialWriter.write_batch, [0]
    def _write_then_die(self, batch, rows):
        _write(self, batch, rows)
        _count[0] += 1
        if _count[0] >= _after:
            os.kill(os.getpid(), signal.SIGKILL)
    resumable.PartialWriter.write_batch = _write_then_die
"""


# --------------------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------------------
def test_plan_is_longest_first_and_ties_keep_test_order():
    assert resumable.plan_batches([3, 9, 3, 5, 9], 2) == [[1, 4], [3, 0], [2]]
    assert resumable.plan_batches([1, 2, 3], 1) == [[2], [1], [0]]


@pytest.mark.parametrize("batches,processes", [(7, 2), (8, 3), (2, 4), (10, 1)])
def test_interleaved_batches_cut_contiguously_are_round_robin(batches, processes):
    # split_between_processes cuts contiguously, the first (len % processes) pieces one longer.
    order = resumable.interleave(list(range(batches)), processes)
    q, r = divmod(batches, processes)
    start, got = 0, []
    for p in range(processes):
        size = q + (1 if p < r else 0)
        got.append(order[start:start + size])
        start += size
    assert got == [list(range(p, batches, processes)) for p in range(processes)]


def test_partial_file_keeps_complete_batches_and_cuts_a_torn_line(tmp_path):
    header = {"format": 1, "model": "m", "test_file": "t", "settings": {"batch_size": 2}}
    path = resumable.partial_path(str(tmp_path), 0)
    writer = resumable.PartialWriter(path, header)
    writer.write_batch(0, [{"index": 1, "text": "好", "tokens": 1, "hit": False}])
    writer.write_batch(2, [{"index": 0, "text": "", "tokens": 0, "hit": True}])
    writer.close()
    with open(path, "ab") as f:
        f.write(b'{"batch": 1, "rows": [{"ind')  # a kill in the middle of a write
    assert resumable.read_partial(path) == (header, {0: [{"index": 1, "text": "好", "tokens": 1, "hit": False}],
                                                     2: [{"index": 0, "text": "", "tokens": 0, "hit": True}]})
    writer = resumable.PartialWriter(path, header)  # reopening drops the torn line before appending
    writer.write_batch(1, [{"index": 2, "text": "x", "tokens": 1, "hit": True}])
    writer.close()
    assert sorted(resumable.read_done(str(tmp_path), header)) == [0, 1, 2]
    assert b"ind{" not in Path(path).read_bytes()


def test_partial_of_other_settings_is_refused_in_one_line_and_kept(tmp_path):
    header = {"format": 1, "model": "m", "test_file": "t", "settings": {"batch_size": 2, "seed": 1}}
    path = resumable.partial_path(str(tmp_path), 1)
    writer = resumable.PartialWriter(path, header)
    writer.write_batch(0, [])
    writer.close()
    before = Path(path).read_bytes()
    for other, words in (({**header, "settings": {"batch_size": 4, "seed": 1}}, "batch_size 2 -> 4"),
                         ({**header, "model": "n", "model_dir": "/x"}, "model (None)"),
                         ({**header, "test_file": "u"}, "test file")):
        with pytest.raises(UsageError) as err:
            resumable.read_done(str(tmp_path), other)
        message = str(err.value)
        assert "\n" not in message and words in message and message.startswith(path), message
    assert Path(path).read_bytes() == before


def test_fingerprint_follows_the_model_weights_and_the_test_file(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"a" * 10)
    test = tmp_path / "test_samples.json"
    test.write_text("[]")
    first = resumable.fingerprint(str(model), str(test), {"seed": 1})
    (model / "eval").mkdir()  # evaluation output is not the model
    assert resumable.fingerprint(str(model), str(test), {"seed": 1}) == first
    (model / "model.safetensors").write_bytes(b"b" * 10)
    assert resumable.differences(first, resumable.fingerprint(str(model), str(test), {"seed": 1})) == [
        f"model ({model})"]


# --------------------------------------------------------------------------------------------------------------
# End to end with the tiny model
# --------------------------------------------------------------------------------------------------------------
def _users(example: Path) -> list[dict]:
    """Three users, 14 reviews each, from the example file's texts: 2-3 test samples each."""
    records = json.loads(example.read_text(encoding="utf-8"))[0]["task"]["task_behavior_collections"][0]["data"]
    users = []
    for u, name in enumerate(("甲", "乙", "丙")):
        data = [{**records[(u * 7 + i) % len(records)], "timestamp": f"2020-{1 + u:02d}-{1 + i:02d}"}
                for i in range(14)]
        users.append({"user": {"profile": {"name": name}},
                      "task": {"description": "豆瓣影评",
                               "task_behavior_collections": [{"type": "movie_review", "data": data}]}})
    return users


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory, example_data_file) -> Path:
    from transformers import AutoTokenizer

    import data_loader_movie_review as dl
    from review_lm.data import datasets as rd
    from review_lm.runs import run_folder as rf
    from review_lm.runs import test_set
    from review_lm.testing.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("scale_run")
    data = out.parent / f"{out.name}_reviews.json"
    data.write_text(json.dumps(_users(example_data_file), ensure_ascii=False), encoding="utf-8")
    make_tiny_model(str(out), tokenizer_kind="bpe", corpus=[str(data)], vocab_size=500)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    splits = dl.split_chronologically(dl.load_review_file(str(data)))
    test = rd.build_datasets({"test": splits["test"]}, tokenizer, 512, dl.PromptBuilder())["test"]
    test_set.write_test_samples(str(out / rf.TEST_SAMPLES), test.encoded_samples())
    test_set.write_test_histories(str(out / rf.TEST_HISTORIES), splits["test"])
    return out


def _evaluate(run: Path, out: Path, *extra: str, torchrun: int = 0, env: dict[str, str] | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    args = [SCRIPT, "--model_dir", str(run), "--output_dir", str(out), "--no_progress", "--bootstrap", "200", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
           if torchrun else [sys.executable, *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or clean_env(),
                          cwd=str(REPO), stdin=subprocess.DEVNULL)


def _scores(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {"model": metrics["model"], "baselines": metrics["baselines"], "intervals": metrics["intervals"]}


@pytest.mark.slow
def test_two_processes_write_exactly_what_one_process_writes(scale_run, tmp_path):
    common = ("--batch_size", "1", "--max_new_tokens", "8")
    one = _evaluate(scale_run, tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _evaluate(scale_run, tmp_path / "two", *common, torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = (tmp_path / "one" / "predictions.jsonl").read_text(encoding="utf-8")
    assert len(rows.splitlines()) >= 6
    assert (tmp_path / "two" / "predictions.jsonl").read_text(encoding="utf-8") == rows
    assert _scores(tmp_path / "two") == _scores(tmp_path / "one")
    generation = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))["generation"]
    assert generation["processes"] == 2 and generation["backend"] == "hf" and generation["samples_per_s"] > 0
    # Only the main process wrote results; the ranks' partial files are gone once metrics.json is written.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "metrics.json", "predictions.jsonl", "sample_scores.npz", "style.png"]
    assert two.stdout.count("written:") == 1


@pytest.mark.slow
def test_sampled_predictions_do_not_depend_on_the_number_of_processes(scale_run, tmp_path):
    common = ("--batch_size", "2", "--max_new_tokens", "6", "--do_sample", "--temperature", "1.3", "--seed", "3")
    assert _evaluate(scale_run, tmp_path / "one", *common).returncode == 0
    two = _evaluate(scale_run, tmp_path / "two", *common, torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = (tmp_path / "one" / "predictions.jsonl").read_bytes()
    assert (tmp_path / "two" / "predictions.jsonl").read_bytes() == one


@pytest.mark.slow
def test_killed_evaluation_resumes_and_ends_identical(scale_run, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK, encoding="utf-8")
    common = ("--batch_size", "1", "--max_new_tokens", "8")
    full = _evaluate(scale_run, tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = (tmp_path / "full" / "predictions.jsonl").read_bytes()
    total = len(expected.splitlines())

    out = tmp_path / "killed"
    env = clean_env(PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), EVAL_KILL_AFTER_BATCHES="2")
    killed = _evaluate(scale_run, out, *common, env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["predictions.partial.rank0.jsonl"]  # no metrics, no predictions
    partial = out / "predictions.partial.rank0.jsonl"

    # Other settings: refused in one line, the partial file untouched, nothing else written.
    before = partial.read_bytes()
    other = _evaluate(scale_run, out, "--batch_size", "1", "--max_new_tokens", "5")
    assert "partial predictions of another generation (max_new_tokens 8 -> 5)" in one_line_error(other)
    assert partial.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [partial.name]

    resumed = _evaluate(scale_run, out, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = f"resuming generation: 2 of {total} predictions already written (2 of {total} batches in {out})"
    assert resumed.stdout.splitlines().count(line) == 1, resumed.stdout
    assert (out / "predictions.jsonl").read_bytes() == expected
    generation = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["generation"]
    # Less work than a full run: only the batches not on disk were generated (wall time on a tiny model is
    # mostly loading, so the count is the honest measure here; tools/bench_generate.py times real runs).
    assert (generation["resumed_predictions"], generation["generated_predictions"]) == (2, total - 2)
    assert not partial.exists()


@pytest.mark.slow
def test_a_run_killed_with_two_processes_resumes_with_one(scale_run, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK, encoding="utf-8")
    common = ("--batch_size", "2", "--max_new_tokens", "8")
    assert _evaluate(scale_run, tmp_path / "full", *common).returncode == 0
    out = tmp_path / "killed"
    env = clean_env(PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), EVAL_KILL_AFTER_BATCHES="1")
    killed = _evaluate(scale_run, out, *common, torchrun=2, env=env)
    assert killed.returncode != 0
    assert not (out / "metrics.json").exists()
    resumed = _evaluate(scale_run, out, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming generation: " in resumed.stdout
    assert (out / "predictions.jsonl").read_bytes() == (tmp_path / "full" / "predictions.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------------------------
# --num_samples K
# --------------------------------------------------------------------------------------------------------------
def test_rows_keep_every_sample_and_the_first_is_the_prediction():
    from review_lm.inference.parallel_generation import batch_rows

    tokens = [[5, 6, 0, 9], [7, 7, 7, 7], [0], [8, 0]]  # 2 prompts x 2 samples, 0 = EOS
    rows = batch_rows([4, 1], tokens, 2, 0, lambda ids: "".join(map(str, ids)))
    assert rows == [{"index": 4, "text": "56", "tokens": 2, "hit": False, "samples": ["56", "7777"]},
                    {"index": 1, "text": "", "tokens": 0, "hit": False, "samples": ["", "8"]}]
    assert batch_rows([3], [[1, 2]], 1, 0, lambda ids: "x") == [{"index": 3, "text": "x", "tokens": 2, "hit": True}]


def test_scores_over_samples_are_the_mean_with_the_spread():
    from review_lm.evaluation.bootstrap import mean_over_draws

    mean, section = mean_over_draws([{"bleu": 1.0, "attribution": None, "n": 2}, {"bleu": 3.0, "attribution": 50.0,
                                                                                 "n": 4}])
    assert mean == {"bleu": 2.0, "attribution": None, "n": 3.0}
    assert section["samples"] == 2 and section["spread"]["bleu"] == {"std": 1.0, "min": 1.0, "max": 3.0}
    assert section["per_sample"][1]["attribution"] == 50.0


@pytest.mark.slow
def test_several_samples_per_prompt_are_kept_and_averaged(scale_run, tmp_path):
    common = ("--batch_size", "2", "--max_new_tokens", "6", "--do_sample", "--temperature", "1.3", "--num_samples",
              "3")
    proc = _evaluate(scale_run, tmp_path / "k3", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "k3" / "predictions.jsonl").open(encoding="utf-8")]
    assert all(len(r["predictions"]) == 3 and r["prediction"] == r["predictions"][0] for r in rows)
    assert any(len(set(r["predictions"])) > 1 for r in rows)  # really three samples, not one three times
    metrics = json.loads((tmp_path / "k3" / "metrics.json").read_text(encoding="utf-8"))
    draws = metrics["samples_per_prompt"]
    assert draws["samples"] == 3 and len(draws["per_sample"]) == 3
    for key in ("bleu", "rougeL", "distinct_1", "copy_rate"):
        assert metrics["model"][key] == pytest.approx(sum(d[key] for d in draws["per_sample"]) / 3)
        low, high = metrics["intervals"]["model"][key]
        assert low <= metrics["model"][key] <= high
    assert "mean over 3 samples per prompt" in proc.stdout
    two = _evaluate(scale_run, tmp_path / "k3_two", *common, torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "k3_two" / "predictions.jsonl").read_bytes() == (
        tmp_path / "k3" / "predictions.jsonl").read_bytes()
