"""Tests for review_lm/runs/run_folder.py: the test-sample layouts evaluation reads, and the typed run record."""

from __future__ import annotations

import json

import pytest

import data_loader_movie_review as dl
from review_lm.runs import run_folder as rf
from review_lm.runs import test_set
from review_lm.utils import UsageError


class _Encoded:
    """What write_test_samples reads from an encoded sample (the prompt fields do not matter here)."""

    def __init__(self, sample):
        self.sample, self.prompt, self.history_count, self.prompt_length, self.target_truncated = \
            sample, "p", 0, 1, False


@pytest.fixture
def example_test(example_data_file):
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    return splits["test"]


def test_current_layout_gives_each_sample_its_earlier_reviews(tmp_path, example_test):
    test_set.write_test_samples(str(tmp_path / rf.TEST_SAMPLES), [_Encoded(s) for s in example_test])
    test_set.write_test_histories(str(tmp_path / rf.TEST_HISTORIES), example_test)
    test = test_set.load_test_samples(str(tmp_path / rf.TEST_SAMPLES))
    assert test.has_history
    for i, s in enumerate(example_test):
        assert test.earlier_reviews(i) == [r.text for r in s.history]
    before = test.reviews_before_test()
    assert before == {0: [r.text for r in example_test[0].history]}  # train + val, no test review
    assert not set(before[0]) & {s.target.text for s in example_test}
    # Every earlier review is in the file once, not once per test sample.
    samples_text = (tmp_path / rf.TEST_SAMPLES).read_text(encoding="utf-8")
    assert example_test[0].history[0].text not in samples_text


def test_earlier_layout_with_earlier_reviews_per_sample_still_reads(tmp_path, example_test):
    old = [{"prompt": "p", "reference": s.target.text, "user_index": 0, "earlier_reviews": [r.text for r in s.history]}
           for s in example_test]
    (tmp_path / rf.TEST_SAMPLES).write_text(json.dumps(old, ensure_ascii=False), encoding="utf-8")
    test = test_set.load_test_samples(str(tmp_path / rf.TEST_SAMPLES))
    assert test.has_history and test.histories is None
    assert test.all_earlier_reviews() == [r["earlier_reviews"] for r in old]
    assert test.reviews_before_test() == {0: old[0]["earlier_reviews"]}


def test_without_histories_there_are_none(tmp_path, example_test):
    test_set.write_test_samples(str(tmp_path / rf.TEST_SAMPLES), [_Encoded(s) for s in example_test])
    assert not test_set.load_test_samples(str(tmp_path / rf.TEST_SAMPLES)).has_history


def test_histories_of_another_run_are_refused_in_one_line(tmp_path, example_test):
    test_set.write_test_samples(str(tmp_path / rf.TEST_SAMPLES), [_Encoded(s) for s in example_test])
    test_set.write_test_histories(str(tmp_path / rf.TEST_HISTORIES), example_test[:1])  # positions beyond its reviews
    with pytest.raises(UsageError, match=r"sample #1 .*the two files are not from the same run$"):
        test_set.load_test_samples(str(tmp_path / rf.TEST_SAMPLES))
    (tmp_path / rf.TEST_HISTORIES).write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(UsageError, match="not a test_histories.json written by"):
        test_set.load_test_samples(str(tmp_path / rf.TEST_SAMPLES))


@pytest.mark.parametrize(("files", "kind"), [
    (("config.json", "model.safetensors"), rf.KIND_FULL),
    (("adapter_config.json", "adapter_model.safetensors"), rf.KIND_ADAPTER),
    (("adapter_config.json", "config.json", "model.safetensors"), rf.KIND_FULL),  # a merged model beside its adapter
    (("pytorch_model_fsdp_0",), rf.KIND_FULL),  # FSDP's sharded checkpoint state
    (("trainer_state.json",), None),
])
def test_one_classifier_for_model_folders_and_checkpoints(tmp_path, files, kind):
    for name in files:
        (tmp_path / name).write_text("{}", encoding="utf-8")
    assert rf.model_kind(str(tmp_path)) == kind


def test_run_record_reads_what_the_prompt_depends_on(tmp_path):
    record = {"arguments": {"use_profile": False, "use_history": True, "max_length": 512, "data_file": ["a.json"]},
              "data": {"files": ["/abs/a.json"]}}
    rf.write_run_record(str(tmp_path), record)
    run = rf.read_run_record(str(tmp_path))
    assert (run.use_profile, run.use_history, run.max_length, run.data_files, run.recorded_abs_files) == \
        (False, True, 512, ["a.json"], ["/abs/a.json"])
    assert run.builder == dl.PromptBuilder(False, True)
    assert rf.recorded_arguments(str(tmp_path))["max_length"] == 512
    assert rf.recorded_arguments(str(tmp_path / "nope")) is None
