"""Tests for token ids of the loader's samples (tests/eager_encoder.py's SampleTokenizer): labels, the
token budget (most recent history that fits, targets truncated), and assembled ids == plain tokenization
with the real Qwen vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

import data_loader_movie_review as dl
from tests.eager_encoder import SampleTokenizer
from tests.helpers import REAL_FILES, all_samples, expected_history_lines, history_lines_in, ids

ABLATIONS = [(True, True), (True, False), (False, True), (False, False)]


# --------------------------------------------------------------------------------------------------------------
# Fixtures local to this file
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(params=["qwen", "bpe"])
def any_tokenizer(request):
    """Both tiny offline tokenizers (pad id == eos id for each)."""
    return request.getfixturevalue(f"{request.param}_tokenizer")


# --------------------------------------------------------------------------------------------------------------
# Token ids and labels
# --------------------------------------------------------------------------------------------------------------
def test_labels_mask_exactly_the_prompt_and_keep_eos(any_tokenizer, example_splits):
    tok = any_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    eos = tok.eos_token_id
    encs = SampleTokenizer(tok, None).encode_split(all_samples(example_splits))
    assert len(encs) == 28
    for enc in encs:
        n = enc.prompt_length
        assert 0 < n < len(enc.input_ids)
        assert len(enc.labels) == len(enc.input_ids)
        assert enc.labels[:n] == [dl.IGNORE_INDEX] * n
        assert enc.labels[n:] == enc.input_ids[n:]
        assert dl.IGNORE_INDEX not in enc.labels[n:]
        assert enc.input_ids[n:] == ids(tok, enc.sample.target.text) + [eos]
        assert enc.labels[-1] == eos and enc.input_ids[-1] == eos
        features = enc.as_features()
        assert features["attention_mask"] == [1] * len(enc.input_ids)
        assert features["input_ids"] == enc.input_ids and features["labels"] == enc.labels


def test_prompt_length_equals_tokenized_prompt(any_tokenizer, example_splits):
    """sample_record promises tokenizer(prompt) == input_ids[:prompt_length]; evaluation relies on it."""
    tok = any_tokenizer
    mismatches = []
    for enc in SampleTokenizer(tok, None).encode_split(all_samples(example_splits)):
        prompt_ids = ids(tok, enc.prompt)
        if enc.prompt_length != len(prompt_ids) or enc.input_ids[:enc.prompt_length] != prompt_ids:
            mismatches.append((enc.sample.target.movie, enc.prompt_length, len(prompt_ids)))
    assert not mismatches, f"{len(mismatches)} of 28 samples (movie, prompt_length, len(tokenizer(prompt))): " \
                           f"{mismatches[:3]}"


@pytest.fixture(scope="module")
def gpt2_style_bpe_tokenizer(example_data_file):
    """A byte-level BPE with GPT-2's pre-tokenisation, which merges "\n" with the indentation after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([example_data_file.read_text(encoding="utf-8")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_count_text_mismatches_flags_tokenizers_that_merge_across_newlines(
        qwen_tokenizer, bpe_tokenizer, gpt2_style_bpe_tokenizer, example_splits):
    samples = all_samples(example_splits)
    for tok in (qwen_tokenizer, bpe_tokenizer):
        st = SampleTokenizer(tok, None)
        assert st.count_text_mismatches(st.encode_split(samples), limit=28) == 0
    tok = gpt2_style_bpe_tokenizer
    st = SampleTokenizer(tok, None)
    encs = st.encode_split(samples)
    manual = sum(ids(tok, e.prompt) != e.input_ids[:e.prompt_length] for e in encs)
    assert manual > 0  # "\n" + "  电影《" is one GPT-2 pre-token, split across two pieces by the assembler
    assert st.count_text_mismatches(encs, limit=28) == manual
    assert st.count_text_mismatches(encs, limit=1) == 0  # the first sample has no history block


def test_sample_tokenizer_needs_an_eos_token(qwen_tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="EOS"):
        SampleTokenizer(NoEos(), None)
    assert SampleTokenizer(qwen_tokenizer, None).truncated_targets == 0


# --------------------------------------------------------------------------------------------------------------
# Token budget
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_length", [None, 160, 250, 400, 700])
def test_budget_keeps_the_most_recent_history_that_fits(qwen_tokenizer, example_splits, example_records, max_length):
    tok, eos = qwen_tokenizer, qwen_tokenizer.eos_token_id
    builder = dl.PromptBuilder()
    st = SampleTokenizer(tok, max_length)
    encs = st.encode_split(all_samples(example_splits))
    truncated = 0
    for enc in encs:
        s, k = enc.sample, enc.history_count
        target_ids = ids(tok, s.target.text)
        needs_cut = max_length is not None and len(ids(tok, builder.render(s, 0))) + len(target_ids) + 1 > max_length
        assert enc.target_truncated == needs_cut
        truncated += needs_cut
        if max_length is None:
            assert k == s.position
        else:
            assert len(enc.input_ids) <= max_length
        assert 0 <= k <= s.position
        # the kept items are the last k earlier reviews, and the prompt says how many
        assert enc.prompt == builder.render(s, k)
        assert history_lines_in(enc.prompt) == (expected_history_lines(example_records[s.position - k:s.position])
                                                if k else [])
        assert (f"历史影评记录 ({k}条):\n" in enc.prompt) == (k > 0)
        assert ("历史影评记录" in enc.prompt) == (k > 0)
        # the ids are exactly those of the rendered prompt plus the (possibly cut) target and EOS
        assert enc.input_ids[:enc.prompt_length] == ids(tok, enc.prompt)
        assert enc.input_ids[enc.prompt_length:-1] == target_ids[:len(enc.input_ids) - enc.prompt_length - 1]
        assert enc.input_ids[-1] == eos and len(enc.input_ids) > enc.prompt_length + 1  # target never dropped
        if needs_cut:
            assert len(enc.input_ids) == max_length
        elif k < s.position:  # one more history item would not fit
            assert len(ids(tok, builder.render(s, k + 1))) + len(target_ids) + 1 > max_length
    assert st.truncated_targets == truncated
    if max_length == 250:
        assert 0 < sum(e.history_count < e.sample.position for e in encs) and truncated == 0


def test_budget_one_below_full_length_drops_exactly_one_item(qwen_tokenizer, example_splits):
    samples = all_samples(example_splits)
    full = SampleTokenizer(qwen_tokenizer, None).encode_split(samples)
    longest = max(full, key=lambda e: len(e.input_ids))
    budget = len(longest.input_ids) - 1
    for enc, unlimited in zip(SampleTokenizer(qwen_tokenizer, budget).encode_split(samples), full, strict=True):
        if enc.sample is longest.sample:
            assert enc.history_count == enc.sample.position - 1
            assert f"({enc.sample.position - 1}条)" in enc.prompt
        elif len(unlimited.input_ids) <= budget:
            assert enc.input_ids == unlimited.input_ids and enc.history_count == enc.sample.position


def test_target_longer_than_budget_is_truncated_not_dropped(qwen_tokenizer, example_splits):
    tok, eos = qwen_tokenizer, qwen_tokenizer.eos_token_id
    samples = all_samples(example_splits)
    longest = max(samples, key=lambda s: len(ids(tok, s.target.text)))
    short = next(s for s in samples if s.target.text == "燃爆")
    base = len(ids(tok, dl.PromptBuilder().render(longest, 0)))
    budget = base + 11  # room for 10 target tokens + EOS
    assert len(ids(tok, dl.PromptBuilder().render(short, 0))) + len(ids(tok, "燃爆")) + 1 <= budget
    st = SampleTokenizer(tok, budget)
    enc_short, enc_long = st.encode_split([short, longest])
    assert enc_long.target_truncated and not enc_short.target_truncated
    assert st.truncated_targets == 1
    assert len(enc_long.input_ids) == budget and enc_long.history_count == 0
    assert enc_long.input_ids[-1] == eos and enc_long.labels[-1] == eos
    assert enc_long.input_ids[base:] == ids(tok, longest.target.text)[:10] + [eos]
    assert enc_long.labels == [dl.IGNORE_INDEX] * base + enc_long.input_ids[base:]
    assert len(enc_short.input_ids) <= budget and enc_short.input_ids[-1] == eos
    st.encode(longest)
    assert st.truncated_targets == 2


def test_budget_too_small_for_any_target_is_a_one_line_error(qwen_tokenizer, example_splits):
    with pytest.raises(dl.ReviewDataError) as info:
        SampleTokenizer(qwen_tokenizer, 8).encode(example_splits["val"][0])
    assert "\n" not in str(info.value) and "max_length" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Assembled ids == plain tokenization, real Qwen vocabulary
# --------------------------------------------------------------------------------------------------------------
def assert_ids_equal_plain_tokenization(tok, encs, max_length) -> None:
    eos = tok.eos_token_id
    prompts = tok([e.prompt for e in encs], add_special_tokens=False).input_ids
    fulls = tok([e.prompt + e.sample.target.text for e in encs], add_special_tokens=False).input_ids
    bad = []
    for e, prompt_ids, full_ids in zip(encs, prompts, fulls, strict=True):
        ok = e.prompt_length == len(prompt_ids) and e.input_ids[:e.prompt_length] == prompt_ids
        if e.target_truncated:
            ok = ok and len(e.input_ids) == max_length and e.input_ids[-1] == eos \
                and e.input_ids[:-1] == full_ids[:len(e.input_ids) - 1]
        else:
            ok = ok and e.input_ids == full_ids + [eos]
        if not ok:
            bad.append((e.sample.user.name, e.sample.target.record_index))
    assert not bad, f"{len(bad)} of {len(encs)} samples differ, e.g. (user, record): {bad[:5]}"


def _data_file(name: str, example_data_file: Path, douban_dmr_dir_getter) -> Path:
    return example_data_file if name == "example" else douban_dmr_dir_getter() / name


@pytest.mark.parametrize("name", ["example", *REAL_FILES])
@pytest.mark.parametrize(("use_profile", "use_history"), ABLATIONS)
def test_assembled_ids_equal_plain_qwen_tokenization(request, qwen_tokenizer, example_data_file, name,
                                                     use_profile, use_history):
    path = _data_file(name, example_data_file, lambda: request.getfixturevalue("douban_dmr_dir"))
    samples = all_samples(dl.split_chronologically(dl.load_review_file(str(path))))
    builder = dl.PromptBuilder(use_profile, use_history)
    for max_length in (None, 300, 100):
        st = SampleTokenizer(qwen_tokenizer, max_length, builder)
        encs = st.encode_split(samples)
        assert all(e.sample is s for e, s in zip(encs, samples, strict=True))
        if max_length is not None:
            assert max(len(e.input_ids) for e in encs) <= max_length
        assert_ids_equal_plain_tokenization(qwen_tokenizer, encs, max_length)
        assert all(("历史影评记录" in e.prompt) == (use_history and e.history_count > 0) for e in encs)
        assert all(e.prompt.startswith("用户: ") == use_profile for e in encs)
