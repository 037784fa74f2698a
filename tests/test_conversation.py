"""Tests for --prompt_format conversation: the lazy conversation datasets
(review_lm.data.conversation_dataset) against review_lm.data.chat_layout's direct encoding, labels and windows on
real users, the loss CompletionTrainer computes on packed / padded windows == each review's loss in a sequence cut
right after it, generation prompts == the training layout, and the spec format with a chat template. Real CPU
runs: test_conversation_runs.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import data_loader_movie_review as dl
from review_lm.data import chat_layout as cf
from review_lm.data import datasets as rd
from review_lm.data import windows as wn
from review_lm.data.conversation_dataset import ConversationDataset, new_review_prompt
from review_lm.data.prompts import IGNORE_INDEX
from review_lm.inference.generation import split_at_eos, stop_token_ids
from review_lm.runs import run_folder as rf
from review_lm.training import plan as rp
from review_lm.utils import UsageError
from tests.helpers import EXAMPLE, QWEN25_TEMPLATE

TEMPLATES = {"qwen3": "tokenizer", "qwen25": "tokenizer", "builtin": "built-in ChatML"}


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(qwen_tokenizer, bpe_tokenizer):
    """The real Qwen vocabulary with Qwen3's template (as shipped), Qwen2.5's template, and no template
    (built-in ChatML with <|im_end|>); the tiny BPE without ChatML tokens (built-in, EOS ends a turn)."""
    qwen25 = copy.deepcopy(qwen_tokenizer)
    qwen25.chat_template = QWEN25_TEMPLATE
    plain = copy.deepcopy(qwen_tokenizer)
    plain.chat_template = None
    return {"qwen3": qwen_tokenizer, "qwen25": qwen25, "builtin": plain, "bpe": bpe_tokenizer}


@pytest.fixture(scope="module")
def real_splits(douban_dmr_dir):
    return dl.split_chronologically(dl.load_review_data([str(douban_dmr_dir)]))


def conversation(splits, tokenizer, template: str, max_length: int | None, builder=None):
    fmt = rd.chat_format_for(tokenizer, template)
    return fmt, rd.build_datasets(splits, tokenizer, max_length, builder or dl.PromptBuilder(), fmt, "conversation")


def system_and_turns(user: dl.UserHistory, builder: dl.PromptBuilder | None = None):
    builder = builder or dl.PromptBuilder()
    return builder.system_text(user), builder.turns(user.reviews)


# --------------------------------------------------------------------------------------------------------------
# The loader's texts and the decisions
# --------------------------------------------------------------------------------------------------------------
def test_loader_builds_the_turn_texts(example_data_file):
    user = dl.load_review_file(str(example_data_file)).users[0]
    assert dl.PromptBuilder().system_text(user) == f"用户: Y\n任务: {user.description}"
    assert dl.PromptBuilder(use_profile=False).system_text(user) == f"任务: {user.description}"
    assert dl.PromptBuilder.request_text("美人鱼") == "请为电影《美人鱼》写一条影评："
    assert dl.PromptBuilder().turns(user.reviews[:2]) == [
        ("请为电影《钢铁侠1》写一条影评：", "boring"), (f"请为电影《{user.reviews[1].movie}》写一条影评：",
                                                   user.reviews[1].text)]


@pytest.mark.parametrize("fmt,flag,has_template,expected", [
    ("spec", None, True, "none"), ("spec", "none", True, "none"), ("spec", "auto", True, "tokenizer"),
    ("spec", "auto", False, "none"), ("conversation", None, True, "tokenizer"),
    ("conversation", None, False, "built-in ChatML"), ("conversation", "none", True, "built-in ChatML"),
])
def test_chat_template_resolution_each_branch(fmt, flag, has_template, expected):
    assert rp.resolve_chat_template(fmt, flag, has_template) == expected


def test_bad_format_values_are_one_line_usage_errors():
    import train_distributed_MovieReview as tr

    args = tr.parse_args(["--data_file", "d", "--output_dir", "o"])
    assert (args.prompt_format, args.chat_template) == ("spec", None)
    rp.validate_arguments(args)
    args.prompt_format = "chat"
    with pytest.raises(UsageError, match="--prompt_format must be one of"):
        rp.validate_arguments(args)
    args.prompt_format, args.chat_template = "conversation", "jinja"
    with pytest.raises(UsageError, match="--chat_template must be one of"):
        rp.validate_arguments(args)


def test_run_record_reads_format_and_template_old_records_default_to_spec(tmp_path):
    def record(arguments, resolved):
        (tmp_path / rf.RUN_RECORD).write_text(json.dumps({"arguments": arguments, "resolved": resolved}))
        return rf.read_run_record(str(tmp_path))

    old = record({"data_file": "x.json"}, {})
    assert (old.prompt_format, old.chat_template) == ("spec", "none")
    new = record({"prompt_format": "conversation"}, {"chat_template": "built-in ChatML"})
    assert (new.prompt_format, new.chat_template) == ("conversation", "built-in ChatML")
    with pytest.raises(UsageError, match="resolved.chat_template"):
        record({"prompt_format": "conversation"}, {"chat_template": "jinja"})


def test_stop_tokens_follow_the_recorded_template(tokenizers):
    qwen = tokenizers["qwen3"]
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(qwen, "none") == [qwen.eos_token_id]
    assert stop_token_ids(qwen, "tokenizer") == [im_end, qwen.eos_token_id]
    assert stop_token_ids(tokenizers["builtin"], "built-in ChatML") == [im_end, qwen.eos_token_id]
    assert stop_token_ids(tokenizers["bpe"], "built-in ChatML") == [tokenizers["bpe"].eos_token_id]
    with pytest.raises(UsageError, match="has none"):
        stop_token_ids(tokenizers["bpe"], "tokenizer")
    assert split_at_eos([5, 6, im_end, 7, 0], [im_end, 0]) == ([5, 6], False)
    assert split_at_eos([5, 6, 0, im_end], [im_end, 0]) == ([5, 6], False)
    assert split_at_eos([5, 6], [im_end, 0]) == ([5, 6], True)
    assert split_at_eos([5, 0, 6], 0) == ([5], False)


# --------------------------------------------------------------------------------------------------------------
# Datasets: pieces, labels, windows (real users)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen3", "qwen25", "builtin"])
def test_lazy_pieces_equal_chat_format_encoding_and_the_whole_text(tokenizers, real_splits, name):
    tok = tokenizers[name]
    fmt, datasets = conversation(real_splits, tok, TEMPLATES[name], None)
    pieces = datasets["train"].pieces
    for row, user in enumerate(pieces.users):
        system, turns = system_and_turns(user)
        direct = wn.check_conversation_ids(fmt, system, turns)  # == tokenizer(whole text), == the template's
        lazy = pieces.tokens(row, 0, len(turns))
        assert (lazy.system, lazy.separator, lazy.requests, lazy.answers) == (
            direct.system, direct.separator, direct.requests, direct.answers)


def labelled_spans(enc: cf.EncodedWindow) -> list[tuple[int, int]]:
    return [enc.answer_spans[enc.turns.index(j)] for j in enc.labelled]


@pytest.mark.parametrize("max_length", [None, 700, 200])
def test_every_review_of_a_split_is_labelled_exactly_once_and_nothing_else(tokenizers, real_splits, max_length):
    fmt, datasets = conversation(real_splits, tokenizers["qwen25"], "tokenizer", max_length)
    for split, ds in datasets.items():
        seen: list[tuple[int, int]] = []
        tokens = 0
        for i in range(len(ds)):
            w, item, enc = ds.window(i), ds[i], ds.encode(i)
            assert item["input_ids"] == enc.input_ids and len(item["input_ids"]) == ds.lengths[i]
            if max_length is not None:
                assert len(item["input_ids"]) <= max_length
            expected = [IGNORE_INDEX] * len(enc.input_ids)
            for start, end in labelled_spans(enc):
                expected[start:end] = enc.input_ids[start:end]
                assert enc.input_ids[end - 1] == fmt.end_of_turn_id  # each review's end-of-turn is labelled
            assert item["labels"] == expected
            tokens += sum(label != IGNORE_INDEX for label in item["labels"])
            seen += [(int(ds.row[i]), j) for j in w.labelled]
        wanted = [(ds.pieces.row_of[s.user.index], s.position) for s in real_splits[split]]
        assert sorted(seen) == sorted(wanted) and len(set(seen)) == len(seen), split
        assert ds.labelled_tokens() == tokens and ds.num_reviews == len(wanted)


def test_window_contexts_obey_the_rule_brute_force(tokenizers, real_splits):
    """Measured on the assembled ids of every split's windows (real users, a small budget): a labelled review's
    context (tokens between the system piece and its request) is every earlier review of the user (the window
    starts at turn 0) or at least min(R // 2, R - its turn), unless the turn before its window cannot share
    a window with it; every window fits and the cost stays within the stated worst case."""
    max_length = 300
    fmt, datasets = conversation(real_splits, tokenizers["qwen3"], "tokenizer", max_length)
    sep = len(fmt.separator_ids)
    checked = 0
    for ds in datasets.values():
        p = ds.pieces
        for i in range(len(ds)):
            w, enc, row = ds.window(i), ds.encode(i), int(ds.row[i])
            lengths, system = p.turn_lengths(row).tolist(), p.system_length(row)
            budget = max_length - system
            assert len(enc.input_ids) <= max_length
            if w.truncated:
                assert lengths[w.start] > budget and len(enc.input_ids) == max_length
                continue
            g0 = int(p.review_start[row])
            for j in w.labelled:
                request = int(p.lengths[p.request[g0 + j]])
                context = enc.answer_spans[j - w.start][0] - request - system
                assert context == sum(lengths[w.start:j]) + sep * (j - w.start)
                want = min(budget // 2, budget - lengths[j])
                cut_off = context + lengths[w.start - 1] + sep + lengths[j] > budget if w.start else False
                assert w.start == 0 or context >= want or cut_off, (row, j, context, want)
                checked += 1
    assert checked > 100


def test_validation_and_test_reviews_see_every_earlier_review(tokenizers, real_splits):
    _, datasets = conversation(real_splits, tokenizers["qwen3"], "tokenizer", None)
    for split in ("val", "test"):
        ds = datasets[split]
        for k, s in enumerate(real_splits[split]):
            rec = ds.encoded(k)
            assert rec.history_count == s.position  # every earlier review, train (and val) included
            assert rec.sample is s and rec.input_ids[rec.prompt_length:-1] == ds.pieces.tokenizer(
                s.target.text, add_special_tokens=False)["input_ids"]


def test_no_history_is_each_review_alone(tokenizers, real_splits):
    builder = dl.PromptBuilder(use_history=False)
    fmt, datasets = conversation(real_splits, tokenizers["qwen3"], "tokenizer", 4096, builder)
    ds = datasets["train"]
    assert len(ds) == len(real_splits["train"])
    for k, s in enumerate(real_splits["train"][:40]):
        rec = ds.encoded(k)
        gp = fmt.generation_prompt(builder.system_text(s.user), [], builder.request_text(s.target.movie))
        assert rec.prompt == gp.text and rec.input_ids[:rec.prompt_length] == gp.input_ids
        assert rec.history_count == 0


def test_generation_prompts_are_the_training_layout(tokenizers, real_splits):
    """A new review after the first k reviews gets exactly the ids the k-th review's training window shows
    before it; every test prompt's text tokenizes to its ids (evaluation feeds the text)."""
    tok = tokenizers["qwen25"]
    fmt, datasets = conversation(real_splits, tok, "tokenizer", None)
    train = datasets["train"]
    for k, s in enumerate(real_splits["train"]):
        if s.position % 5:
            continue
        rec = train.encoded(k)
        history = dl.UserHistory(s.user.index, s.user.name, s.user.description, s.user.reviews[:s.position])
        new = new_review_prompt(fmt, history, s.target.movie, dl.PromptBuilder(), None, 0)
        assert new.input_ids == rec.input_ids[:rec.prompt_length] and new.prompt == rec.prompt
        via_dataset = rd.encode_new_review(tok, history, s.target.movie, dl.PromptBuilder(), None, 0,
                                           "conversation", "tokenizer")
        assert via_dataset.input_ids == new.input_ids
    for rec in datasets["test"].encoded_samples():
        assert tok(rec.prompt, add_special_tokens=False)["input_ids"] == rec.input_ids[:rec.prompt_length]
        assert rec.prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("max_length", [None, 300, 90])
def test_prompt_records_from_piece_lengths_equal_the_assembled_windows(tokenizers, real_splits, max_length):
    """test_samples.json's records are summed from piece lengths; the plain computation assembles each window."""
    _, datasets = conversation(real_splits, tokenizers["qwen25"], "tokenizer", max_length)
    for name in ("val", "test"):
        ds = datasets[name]
        records = list(ds.prompt_records())
        assert len(records) == ds.num_reviews
        for k, rec in enumerate(records):
            enc = ds.encoded(k)
            assert (rec.sample, rec.prompt, rec.prompt_length, rec.history_count, rec.target_truncated) == \
                (enc.sample, enc.prompt, enc.prompt_length, enc.history_count, enc.target_truncated)
    if max_length == 90:  # a budget this small cuts some reviews: the truncated case is covered too
        assert any(r.target_truncated for r in datasets["test"].prompt_records())


def test_spec_with_a_chat_template_is_the_prompt_as_one_user_turn(tokenizers, example_data_file):
    tok = tokenizers["qwen3"]
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    plain = rd.build_datasets(splits, tok, 4096)
    fmt = rd.chat_format_for(tok, "tokenizer")
    framed = rd.build_datasets(splits, tok, 4096, dl.PromptBuilder(), fmt)
    prefix, suffix = fmt.spec_framing()
    for i in range(len(plain["train"])):
        a, b = plain["train"].encoded(i), framed["train"].encoded(i)
        core = a.input_ids[:a.prompt_length]
        assert b.input_ids == prefix + core + suffix + a.input_ids[a.prompt_length:-1] + [fmt.end_of_turn_id]
        assert b.labels[:b.prompt_length] == [IGNORE_INDEX] * b.prompt_length
        assert b.labels[b.prompt_length:] == b.input_ids[b.prompt_length:]
        assert b.prompt == fmt.spec_prompt(a.prompt).text
        assert tok(b.prompt, add_special_tokens=False)["input_ids"] == b.input_ids[:b.prompt_length]
    assert rp.resolve_chat_template("spec", None, True) == "none"  # spec's default stays the plain prompt


# --------------------------------------------------------------------------------------------------------------
# The loss the trainer computes == each review's loss in its own cut sequence
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loss_tokenizers(bpe_tokenizer, qwen_tokenizer):
    """Tiny-BPE copies with ChatML tokens and the real templates (Qwen3's, Qwen2.5's), and the EOS fallback."""
    chatml = copy.deepcopy(bpe_tokenizer)
    cf.add_chatml_tokens(chatml)
    qwen3, qwen25 = copy.deepcopy(chatml), copy.deepcopy(chatml)
    qwen3.chat_template, qwen25.chat_template = qwen_tokenizer.chat_template, QWEN25_TEMPLATE
    return {"qwen3": (qwen3, "tokenizer"), "qwen25": (qwen25, "tokenizer"),
            "builtin-eos": (bpe_tokenizer, "built-in ChatML")}


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("name", ["qwen3", "qwen25", "builtin-eos"])
def test_trainer_loss_on_windows_equals_the_reviews_cut_sequences(tmp_path, loss_tokenizers, real_splits, name,
                                                                 packing):
    import torch
    from transformers import TrainingArguments

    from review_lm.testing.tiny_model import build_tiny_model
    from review_lm.training import completion_training as ct

    tok, template = loss_tokenizers[name]
    splits = {k: [s for s in v if s.user.index < 3] for k, v in real_splits.items()}  # 3 users
    fmt, datasets = conversation(splits, tok, template, 400)
    ds = datasets["train"]
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, max_positions=4096, seed=0).eval()
    trainer = ct.CompletionTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False))
    collate = ct.make_data_collator(tok, packing)
    rows = list(range(0, len(ds), max(1, len(ds) // 4)))[:4]  # windows of several users in one batch
    assert len({int(ds.row[i]) for i in rows}) > 1
    batch = collate([ds[i] for i in rows])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
    # The plain computation: every labelled review alone, cut right after it, after the same earlier turns.
    total, count = 0.0, 0
    for i in rows:
        w, row = ds.window(i), int(ds.row[i])
        user = ds.pieces.users[row]
        system, turns = system_and_turns(user)
        for j in w.labelled:
            prompt = fmt.generation_prompt(system, turns[w.start:j], turns[j][0]).input_ids
            answer = fmt.answer_ids(turns[j][1])
            if w.truncated:
                answer = answer[:-1][:400 - len(prompt) - 1] + [fmt.end_of_turn_id]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0].double()
            target = ids[0, len(prompt):]
            total += torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], target, reduction="sum").item()
            count += len(answer)
    assert loss == pytest.approx(total / count, rel=1e-4)


# --------------------------------------------------------------------------------------------------------------
# ConversationDataset as a torch dataset
# --------------------------------------------------------------------------------------------------------------
def test_conversation_dataset_is_a_torch_dataset_with_lengths(tokenizers, example_data_file):
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    _, datasets = conversation(splits, tokenizers["bpe"], "built-in ChatML", 300)
    ds = datasets["train"]
    assert isinstance(ds, ConversationDataset) and len(ds) > 1
    assert [len(ds[i]["input_ids"]) for i in range(len(ds))] == ds.lengths.tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-1] == ds[len(ds) - 1]
    ds.release_texts()
    assert ds[0]["input_ids"]
    with pytest.raises(RuntimeError):
        ds.encoded(0)
    assert Path(EXAMPLE).name == example_data_file.name
