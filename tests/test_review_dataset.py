"""Tests for review_dataset: lazy samples == the eager SampleTokenizer, lengths without assembling, storage that
grows with the data, Trainer's length grouping fed from dataset.lengths, and a DDP run on two input files."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import data_loader_movie_review as dl
from review_lm.data import datasets as rd
from review_lm.data.spec_dataset import ReviewDataset
from review_lm.runs import test_set
from review_lm.training import samplers
from tests.eager_encoder import SampleTokenizer
from tests.helpers import EXAMPLE, one_line_error, read_config, run_train
from tools.bench_loader import review_pool, synthetic_user

ABLATIONS = [(True, True), (True, False), (False, True), (False, False)]
BUDGETS = (None, 300, 100)


def eager_and_lazy(splits, tokenizer, max_length, builder):
    eager = SampleTokenizer(tokenizer, max_length, builder)
    lazy = rd.build_datasets(splits, tokenizer, max_length, builder)
    return {name: eager.encode_split(samples) for name, samples in splits.items()}, lazy


def assert_same(eager: dict, lazy: dict) -> None:
    for name, encs in eager.items():
        ds = lazy[name]
        assert len(ds) == len(encs)
        assert list(ds.encoded_samples()) == encs, name  # every field: ids, labels, prompt length, history, ...
        assert [ds[i] for i in range(len(ds))] == \
            [{"input_ids": e.input_ids, "labels": e.labels} for e in encs]
        assert ds.lengths.tolist() == [len(e.input_ids) for e in encs]
        assert ds.truncated_targets == sum(e.target_truncated for e in encs)


@pytest.fixture(scope="module")
def real_dir_splits(douban_dmr_dir):
    """All real files as one data set (6 users from 3 files)."""
    return dl.split_chronologically(dl.load_review_data([str(douban_dmr_dir)]))


# --------------------------------------------------------------------------------------------------------------
# Lazy == eager
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("use_profile", "use_history"), ABLATIONS)
def test_lazy_ids_equal_eager_ids_on_the_example(qwen_tokenizer, bpe_tokenizer, example_data_file, use_profile,
                                                  use_history):
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    builder = dl.PromptBuilder(use_profile, use_history)
    for tokenizer in (qwen_tokenizer, bpe_tokenizer):
        for max_length in (*BUDGETS, 160, 250):
            assert_same(*eager_and_lazy(splits, tokenizer, max_length, builder))


@pytest.mark.parametrize(("use_profile", "use_history"), ABLATIONS)
def test_lazy_ids_equal_eager_ids_on_all_real_files(qwen_tokenizer, real_dir_splits, use_profile, use_history):
    builder = dl.PromptBuilder(use_profile, use_history)
    truncated = 0
    for max_length in BUDGETS:
        eager, lazy = eager_and_lazy(real_dir_splits, qwen_tokenizer, max_length, builder)
        assert_same(eager, lazy)
        truncated += sum(ds.truncated_targets for ds in lazy.values())
    assert truncated > 0  # budget 100 truncates some real targets: that path is compared too


def test_too_small_budget_is_the_eager_one_line_error(qwen_tokenizer, example_data_file):
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    with pytest.raises(dl.ReviewDataError) as eager:
        SampleTokenizer(qwen_tokenizer, 8).encode_split(splits["train"])
    with pytest.raises(dl.ReviewDataError) as lazy:
        rd.build_datasets(splits, qwen_tokenizer, 8)
    assert str(lazy.value) == str(eager.value)


def test_items_feed_transformers_collators_like_eager_features(bpe_tokenizer, example_data_file):
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    eager, lazy = eager_and_lazy(splits, bpe_tokenizer, 300, dl.PromptBuilder())
    collate = DataCollatorForSeq2Seq(bpe_tokenizer, padding="longest", label_pad_token_id=dl.IGNORE_INDEX)
    ours = collate([lazy["train"][i] for i in range(4)])
    reference = collate([e.as_features() for e in eager["train"][:4]])
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    flat = DataCollatorWithFlattening()([lazy["train"][i] for i in range(4)])
    assert flat["input_ids"].shape[1] == int(lazy["train"].lengths[:4].sum())


def test_encoded_view_slices_and_indexes_like_a_list(bpe_tokenizer, example_data_file):
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    eager, lazy = eager_and_lazy(splits, bpe_tokenizer, None, dl.PromptBuilder())
    view = lazy["train"].encoded_samples()
    assert view[:3] == eager["train"][:3] and view[-1] == eager["train"][-1] and bool(view)
    assert lazy["train"][-1] == lazy["train"][len(view) - 1]
    with pytest.raises(IndexError):
        lazy["train"][len(view)]


# --------------------------------------------------------------------------------------------------------------
# Lengths and length grouping without assembling
# --------------------------------------------------------------------------------------------------------------
def test_lengths_come_without_assembling_any_sample(bpe_tokenizer, example_data_file, monkeypatch):
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    eager = SampleTokenizer(bpe_tokenizer, 250).encode_split(splits["train"])

    def refuse(self, i):
        raise AssertionError("a sample was assembled")

    monkeypatch.setattr(ReviewDataset, "input_ids", refuse)
    lazy = rd.build_datasets(splits, bpe_tokenizer, 250)
    assert lazy["train"].lengths.tolist() == [len(e.input_ids) for e in eager]


def test_trainer_length_grouping_reads_dataset_lengths(tiny_model, bpe_tokenizer, example_data_file, tmp_path,
                                                       monkeypatch):
    """The mixin's sampler yields exactly the indices of Trainer's own sampler (which measures each sample by
    assembling it), for train and eval, and it assembles nothing."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    datasets = rd.build_datasets(splits, bpe_tokenizer, 250)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             per_device_eval_batch_size=2, train_sampling_strategy="group_by_length", use_cpu=True,
                             report_to="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def indices(trainer_cls, assemble: bool) -> tuple[list[int], list[int]]:
        trainer = trainer_cls(model=model, args=args, train_dataset=datasets["train"],
                              eval_dataset=datasets["val"], processing_class=bpe_tokenizer)
        with monkeypatch.context() as m:
            if not assemble:
                m.setattr(ReviewDataset, "input_ids", lambda self, i: pytest.fail("assembled a sample"))
            train_sampler = trainer._get_train_sampler()
            eval_sampler = trainer._get_eval_sampler(datasets["val"])
            torch.manual_seed(0)
            return list(train_sampler), list(eval_sampler)

    reference = indices(Trainer, assemble=True)
    ours = indices(samplers.with_dataset_lengths(Trainer), assemble=False)
    assert ours == reference
    assert sorted(ours[0]) == list(range(len(datasets["train"])))
    lengths = datasets["train"].lengths
    batch = 2 * 2
    first_megabatch = ours[0][:batch]
    assert lengths[first_megabatch[0]] == lengths.max()  # Trainer's rule: the longest sample comes first


# --------------------------------------------------------------------------------------------------------------
# Storage grows with the data, not with reviews x history
# --------------------------------------------------------------------------------------------------------------
def synthetic_data(tmp_path: Path, users: int, reviews: int, distinct: bool):
    pool = review_pool(all_files=True)  # the real Douban texts, cycled
    path = tmp_path / "many.json"
    path.write_text(json.dumps([synthetic_user(pool, reviews, f"u{u}", start=u * 7, distinct=distinct)
                                for u in range(users)], ensure_ascii=False), encoding="utf-8")
    data = dl.load_review_data([str(path)])
    return data, dl.split_chronologically(data)


def stored_bytes(datasets: dict) -> int:
    return next(iter(datasets.values())).tokens.nbytes + sum(ds.nbytes for ds in datasets.values())


def distinct_review_tokens(tokenizer, data) -> int:
    texts = sorted({r.text for u in data.users for r in u.reviews})
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_thousands_of_users_load_without_materialising_samples(bpe_tokenizer, tmp_path, monkeypatch):
    users, reviews = 3000, 40
    data, splits = synthetic_data(tmp_path, users, reviews, distinct=False)
    samples = sum(len(s) for s in splits.values())
    assert (len(data.users), samples) == (users, users * reviews)

    monkeypatch.setattr(ReviewDataset, "input_ids", lambda self, i: pytest.fail("assembled a sample"))
    tracemalloc.start()
    datasets = rd.build_datasets(splits, bpe_tokenizer, None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    monkeypatch.undo()

    stored = stored_bytes(datasets)
    sample_tokens = sum(int(ds.lengths.sum()) for ds in datasets.values())
    # The eager lists would hold two list slots (8 bytes each) per sample token, at least (~3 GB here).
    materialised = 2 * 8 * sample_tokens
    assert stored < materialised / 100, (stored, materialised)
    assert peak < materialised / 100, (peak, materialised)  # nothing near that size existed while building
    # The goal: <= 16 bytes per distinct review token plus a small fixed cost per sample.
    assert stored <= 16 * distinct_review_tokens(bpe_tokenizer, data) + 160 * samples
    tokens = datasets["train"].tokens.store.tokens
    assert isinstance(tokens, np.ndarray) and tokens.dtype == np.int32
    # Samples of the last users equal the eager reference.
    last = [s for s in splits["test"] if s.user.index >= users - 3]
    start = len(splits["test"]) - len(last)
    assert [datasets["test"].encoded(start + i) for i in range(len(last))] == \
        SampleTokenizer(bpe_tokenizer, None).encode_split(last)


@pytest.mark.slow
def test_storage_is_16_bytes_per_distinct_review_token_plus_a_fixed_cost_per_sample(bpe_tokenizer, tmp_path):
    data, splits = synthetic_data(tmp_path, 300, 10, distinct=True)  # every review text different
    datasets = rd.build_datasets(splits, bpe_tokenizer, None)
    samples = sum(len(ds) for ds in datasets.values())
    review_tokens = distinct_review_tokens(bpe_tokenizer, data)
    # Each review is kept as three pieces (history line, last history line, target) of int32 ids: 12 bytes per
    # review token, plus its history-line prefix, the request and the per-sample index (~66 bytes).
    assert stored_bytes(datasets) <= 16 * review_tokens + 160 * samples


# --------------------------------------------------------------------------------------------------------------
# The training script's data section
# --------------------------------------------------------------------------------------------------------------
def test_test_samples_from_prompt_records_equal_the_oracles_records(qwen_tokenizer, real_dir_splits, tmp_path):
    """The file written from the dataset's prompt records (no ids assembled) == the eager oracle's records."""
    encs = SampleTokenizer(qwen_tokenizer, 300).encode_split(real_dir_splits["test"])
    records = [dl.sample_record(e) for e in encs]
    test = rd.build_datasets({"test": real_dir_splits["test"]}, qwen_tokenizer, 300)["test"]
    for name, items in (("some", test.prompt_records()), ("none", [])):
        path = tmp_path / f"{name}.json"
        test_set.write_test_samples(str(path), items)
        text = path.read_text(encoding="utf-8")
        assert json.loads(text) == (records if name == "some" else [])
        assert len(text.splitlines()) == (len(records) + 2 if name == "some" else 1)  # one sample per line


def _renamed_copy(src: str, dst: Path, name: str) -> str:
    obj = json.loads(Path(src).read_text(encoding="utf-8"))
    obj[0]["user"]["profile"]["name"] = name
    dst.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return str(dst)


@pytest.mark.slow
def test_torchrun_two_processes_train_in_step_on_two_files(tmp_path, tiny_model):
    second = _renamed_copy(EXAMPLE, tmp_path / "z.json", "Z")
    out = tmp_path / "ddp"
    proc = run_train("--data_file", EXAMPLE, second, "--output_dir", str(out), "--model_path", tiny_model,
                     "--max_epochs", "2", "--warmup_steps", "0", "--learning_rate", "1e-3", "--max_length", "256",
                     "--report_to", "none", torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_config(out)
    assert config["resolved"]["world_size"] == 2
    data = config["data"]
    assert data["files"] == [EXAMPLE, str(second)] and data["users"] == 2 and data["reviews"] == 56
    assert data["splits"]["train"]["samples"] == 38
    # 38 samples over 2 ranks: 10 micro-batches of 2 each -> 2 optimizer steps per epoch, both ranks in lockstep.
    assert config["resolved"]["optimizer_steps_per_epoch"] == 2
    assert config["result"]["global_steps"] == 4
    assert sorted(config["result"]["eval_loss_per_epoch"]) == ["1", "2"]
    assert "2 user(s), 56 reviews" in proc.stderr
    saved = json.loads((out / "test_samples.json").read_text(encoding="utf-8"))
    assert [(s["user"], s["user_index"]) for s in saved] == [("Y", 0)] * 5 + [("Z", 1)] * 5


@pytest.mark.slow
def test_bad_file_among_several_is_named_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"user": {"profile": {"name": "B"}}}]', encoding="utf-8")
    out = tmp_path / "run"
    line = one_line_error(run_train("--data_file", EXAMPLE, str(bad), "--output_dir", str(out),
                                    "--model_path", str(tmp_path / "no-model")))
    assert str(bad) in line and "user #0 (B)" in line and "'task'" in line
    assert not out.exists()


def test_released_dataset_still_serves_items_but_not_texts(bpe_tokenizer, example_data_file):
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    ds = rd.build_datasets(splits, bpe_tokenizer, 250)["train"]
    before = [ds[i] for i in range(len(ds))]
    ds.release_texts()
    assert [ds[i] for i in range(len(ds))] == before and len(ds) == len(before)
    with pytest.raises(RuntimeError, match="release_texts"):
        ds.encoded(0)
