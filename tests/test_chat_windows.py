"""Tests for labels and windows of a conversation (review_lm.data.chat_layout, review_lm.data.windows):
labels only on the labelled reviews, window plans checked brute force, truncation, and the loss of each review
in one forward pass of the whole conversation == its loss in a sequence cut right after it."""

from __future__ import annotations

import copy
import random

import pytest

import data_loader_movie_review as dl
from review_lm.data import chat_layout as cf
from review_lm.data import windows as wn
from review_lm.data.prompts import IGNORE_INDEX
from tests.helpers import FORMAT_NAMES, QWEN25_TEMPLATE, system_text, user_turns


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------
def assert_labels_are_the_answer_spans(fmt: cf.ChatFormat, tokens: cf.ConversationTokens, enc: cf.EncodedWindow,
                                       turns: list[cf.Turn]) -> None:
    assert len(enc.labels) == len(enc.input_ids)
    inside = set()
    for i, (start, end) in zip(enc.turns, enc.answer_spans, strict=True):
        if i in enc.labelled:
            expected = fmt.answer_ids(turns[i][1])
            if enc.truncated:
                expected = expected[:-1][: end - start - 1] + [fmt.end_of_turn_id]
            assert enc.labels[start:end] == enc.input_ids[start:end] == expected
            assert enc.labels[end - 1] == fmt.end_of_turn_id
            inside.update(range(start, end))
    for pos, label in enumerate(enc.labels):
        if pos not in inside:
            assert label == IGNORE_INDEX, pos


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_labels_only_on_labelled_reviews(formats, real_users, name):
    fmt = formats[name]
    for user in real_users:
        turns = user_turns(user)
        n_train, n_val, _ = dl.split_sizes(len(turns), *dl.DEFAULT_RATIOS[:2])
        tokens = fmt.encode_conversation(system_text(user), turns)
        for labelled in (range(n_train), range(n_train, n_train + n_val), range(len(turns))):
            enc = wn.encode_window(tokens, wn.Window(0, len(turns), tuple(labelled)))
            assert enc.input_ids == tokens.input_ids()
            assert_labels_are_the_answer_spans(fmt, tokens, enc, turns)
            labelled_count = sum(label != IGNORE_INDEX for label in enc.labels)
            assert labelled_count == sum(len(tokens.answers[i]) for i in labelled)
            # no label on the separator after an end-of-turn, nor on any header / request / system token
            for _start, end in enc.answer_spans[:-1]:
                assert enc.labels[end] == IGNORE_INDEX and enc.input_ids[end - 1] == fmt.end_of_turn_id


# --------------------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------------------
def check_plan(windows, turn_lengths, system_length, labelled, max_length, sep):
    """Every documented property of plan_windows, brute force."""
    budget = max_length - system_length
    t = [x + sep for x in turn_lengths]
    labelled = sorted(set(labelled))
    seen = [i for w in windows for i in w.labelled]
    assert sorted(seen) == labelled and len(seen) == len(set(seen))  # each labelled review exactly once
    for w in windows:
        assert 0 <= w.start < w.end <= len(turn_lengths)
        assert w.labelled and all(w.start <= i < w.end for i in w.labelled)
        assert w.labelled[-1] == w.end - 1  # ends at its last labelled turn
        assert w.length <= max_length
        if w.truncated:
            assert (w.start, w.end, w.labelled, w.length) == (w.labelled[0], w.labelled[0] + 1, w.labelled,
                                                              max_length)
            assert turn_lengths[w.start] > budget
            continue
        assert w.length == system_length + sum(t[w.start:w.end]) - sep
        for j in w.labelled:  # the context rule
            context = sum(t[w.start:j])
            want = min(budget // 2, budget - turn_lengths[j])
            assert (w.start == 0 or context >= want
                    or context + t[w.start - 1] + turn_lengths[j] > budget), (w, j, context, want)
    # cost bound
    if windows:
        total, once = wn.windows_cost(windows, turn_lengths, system_length, sep)
        start, end = min(w.start for w in windows), max(w.end for w in windows)
        covered = sum(min(x, budget + sep) for x in t[start:end])
        m = max(t[start:end])
        assert total <= len(windows) * (system_length + budget // 2 + m) + covered
        if budget / 2 > 2 * m:
            assert (len(windows) - 1) * (budget / 2 - 2 * m) < sum(t[start:end])
        assert once == system_length + sum(t[start:end]) - sep
        return total / once
    return 1.0


def test_windows_on_real_users_with_small_budgets(formats, real_users):
    """Train reviews, val reviews (context: every earlier review) and test reviews of every real user, Qwen
    tokenizer, several small budgets: the plan's properties hold and the assembled windows match it."""
    fmt = formats["qwen25-template"]
    for user in real_users:
        turns = user_turns(user)
        sizes = dl.split_sizes(len(turns), *dl.DEFAULT_RATIOS[:2])
        bounds = [0, sizes[0], sizes[0] + sizes[1], len(turns)]
        tokens = fmt.encode_conversation(system_text(user), turns)
        lengths, system_length, sep = tokens.turn_lengths, len(tokens.system), len(tokens.separator)
        smallest = system_length + max(tokens.min_turn_lengths) + 3  # every request fits, long reviews are cut
        for max_length in (smallest, 160, 256, 400, 700, 1500, 4096):
            if max_length < smallest:
                continue
            for split in range(3):
                labelled = list(range(bounds[split], bounds[split + 1]))
                windows = wn.plan_windows(lengths, system_length, labelled, max_length, sep,
                                          tokens.min_turn_lengths)
                factor = check_plan(windows, lengths, system_length, labelled, max_length, sep)
                if max_length == 4096:  # these histories (<= 3.5k tokens) fit in one window: no overhead
                    assert len(windows) <= 1 and factor == 1.0
                for w in windows:
                    enc = wn.encode_window(tokens, w, max_length)
                    assert len(enc.input_ids) == w.length <= max_length
                    assert_labels_are_the_answer_spans(fmt, tokens, enc, turns)
                    if not w.truncated:  # a window is the conversation of its turns
                        assert enc.input_ids == fmt.encode_conversation(system_text(user),
                                                                        turns[w.start:w.end]).input_ids()


def test_windows_brute_force_on_random_lengths():
    rng = random.Random(7)
    for _ in range(4000):
        max_length = rng.choice([12, 16, 20, 33, 64])
        system_length = rng.randint(0, max_length // 3)
        sep = rng.choice([0, 1])
        n = rng.randint(1, 16)
        budget = max_length - system_length
        lengths = [rng.choice([1, 2, 3, budget // 4 + 1, budget // 2, budget // 2 + 1, budget - 1, budget + 3])
                   for _ in range(n)]
        lengths = [max(1, x) for x in lengths]
        labelled = [i for i in range(n) if rng.random() < 0.6]
        windows = wn.plan_windows(lengths, system_length, labelled, max_length, sep)
        check_plan(windows, lengths, system_length, labelled, max_length, sep)


def test_windows_one_window_when_the_history_fits(formats, example_user):
    fmt = formats["qwen3-template"]
    tokens = fmt.encode_conversation(system_text(example_user), user_turns(example_user))
    total = len(tokens.input_ids())
    windows = wn.plan_windows(tokens.turn_lengths, len(tokens.system), range(19), total,
                              len(tokens.separator))
    assert windows == [wn.Window(0, 19, tuple(range(19)), total - sum(tokens.turn_lengths[19:])
                                 - len(tokens.separator) * 9)]
    assert wn.windows_cost(windows, tokens.turn_lengths, len(tokens.system), len(tokens.separator)) == \
        (windows[0].length, windows[0].length)
    assert wn.plan_windows(tokens.turn_lengths, len(tokens.system), [], 10) == []


def test_windows_truncation_and_errors(formats):
    fmt = formats["qwen-builtin"]
    long_review = "很长的影评。" * 200
    turns = [("请为电影《A》写一条影评：", "好"), ("请为电影《B》写一条影评：", long_review),
             ("请为电影《C》写一条影评：", "还行")]
    tokens = fmt.encode_conversation("任务: T", turns)
    system_length, sep = len(tokens.system), len(tokens.separator)
    max_length = 120
    windows = wn.plan_windows(tokens.turn_lengths, system_length, [0, 1, 2], max_length, sep,
                              tokens.min_turn_lengths)
    assert [(w.start, w.end, w.labelled, w.truncated) for w in windows] == \
        [(0, 1, (0,), False), (1, 2, (1,), True), (2, 3, (2,), False)]  # nothing shares a window with B
    enc = wn.encode_window(tokens, windows[1], max_length)
    assert len(enc.input_ids) == max_length and enc.truncated
    assert enc.labels[-1] == fmt.end_of_turn_id and enc.input_ids[-1] == fmt.end_of_turn_id
    assert_labels_are_the_answer_spans(fmt, tokens, enc, turns)
    assert fmt.tokenizer.decode(enc.input_ids).startswith(fmt.conversation_text("任务: T", turns[1:2])[:60])
    with pytest.raises(cf.ChatFormatError, match="needs the max_length"):
        wn.encode_window(tokens, windows[1])

    # the request alone does not fit next to the system piece
    tight = system_length + tokens.min_turn_lengths[1] - 1
    with pytest.raises(cf.ChatFormatError, match="too small for turn 1"):
        wn.plan_windows(tokens.turn_lengths, system_length, [1], tight, sep, tokens.min_turn_lengths)
    with pytest.raises(cf.ChatFormatError, match="leaves no review token"):
        wn.encode_window(tokens, wn.plan_windows(tokens.turn_lengths, system_length, [1], tight, sep)[0], tight)
    # the system piece alone fills the budget
    with pytest.raises(cf.ChatFormatError, match="the system piece alone needs"):
        wn.plan_windows(tokens.turn_lengths, system_length, [0], system_length, sep)
    with pytest.raises(cf.ChatFormatError, match="labelled turns must be in"):
        wn.plan_windows(tokens.turn_lengths, system_length, [3], 500, sep)


def test_conversation_features(formats, example_user):
    fmt = formats["qwen3-template"]
    system, turns = system_text(example_user), user_turns(example_user)
    [whole] = wn.conversation_features(fmt, system, turns)
    assert whole["input_ids"] == fmt.tokenizer(fmt.conversation_text(system, turns),
                                               add_special_tokens=False)["input_ids"]
    windows = wn.conversation_features(fmt, system, turns, range(19), max_length=300)
    assert len(windows) > 1 and all(len(f["input_ids"]) <= 300 for f in windows)
    labelled = sum(sum(label != IGNORE_INDEX for label in f["labels"]) for f in windows)
    assert labelled == sum(len(fmt.answer_ids(review)) for _, review in turns[:19])


# --------------------------------------------------------------------------------------------------------------
# Loss equivalence: one forward pass of the conversation == one pass per review cut right after it
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loss_formats(bpe_chatml, bpe_tokenizer, qwen_tokenizer):
    """Tiny-BPE copies with the ChatML tokens and the real templates (Qwen3's, Qwen2.5's), plus the EOS fallback:
    the template path end to end, with a small vocabulary so the model runs in milliseconds."""
    qwen3 = copy.deepcopy(bpe_chatml)
    qwen3.chat_template = qwen_tokenizer.chat_template
    qwen25 = copy.deepcopy(bpe_chatml)
    qwen25.chat_template = QWEN25_TEMPLATE
    return {"qwen3": cf.ChatFormat(qwen3), "qwen25": cf.ChatFormat(qwen25),
            "builtin-eos": cf.ChatFormat(bpe_tokenizer)}


def review_losses(model, ids: list[int], spans: list[tuple[int, int]]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    target = torch.tensor(ids)
    out = []
    for start, end in spans:  # position p predicts token p + 1
        out.append(torch.nn.functional.cross_entropy(logits[start - 1:end - 1], target[start:end]).item())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "qwen25", "builtin-eos"])
def test_loss_of_each_review_in_one_pass_equals_its_cut_sequence(loss_formats, real_users, name):
    from review_lm.testing.tiny_model import build_tiny_model

    fmt = loss_formats[name]
    model = build_tiny_model(fmt.tokenizer, hidden_size=32, num_layers=2, num_heads=4, max_positions=4096,
                             seed=0).eval()
    user = real_users[1]
    system, turns = system_text(user), user_turns(user)[:8]
    fmt.check_against_template(system, turns)
    tokens = fmt.encode_conversation(system, turns)
    enc = wn.encode_window(tokens, wn.Window(0, len(turns), tuple(range(len(turns)))))
    one_pass = review_losses(model, enc.input_ids, enc.answer_spans)
    # the same losses from the labels, as a Trainer would compute them (mean over labelled tokens)
    import torch

    with torch.no_grad():
        mean = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]),
                     use_cache=False).loss.item()
    counts = [e - s for s, e in enc.answer_spans]
    assert mean == pytest.approx(sum(c * x for c, x in zip(counts, one_pass, strict=True)) / sum(counts),
                                 rel=1e-5)
    for k in range(len(turns)):
        prompt = fmt.generation_prompt(system, turns[:k], turns[k][0])
        cut = prompt.input_ids + fmt.answer_ids(turns[k][1])
        [alone] = review_losses(model, cut, [(len(prompt.input_ids), len(cut))])
        assert alone == pytest.approx(one_pass[k], abs=1e-5), k
    # a window that starts mid-history: its reviews' losses == their cut sequences after the same turns
    start = 3
    window = wn.encode_window(tokens, wn.Window(start, len(turns), tuple(range(start + 2, len(turns)))))
    in_window = review_losses(model, window.input_ids, window.answer_spans)
    for offset, k in enumerate(range(start, len(turns))):
        prompt = fmt.generation_prompt(system, turns[start:k], turns[k][0])
        cut = prompt.input_ids + fmt.answer_ids(turns[k][1])
        [alone] = review_losses(model, cut, [(len(prompt.input_ids), len(cut))])
        assert alone == pytest.approx(in_window[offset], abs=1e-5), k
