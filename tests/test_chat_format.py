"""Tests for review_lm.data.chat_layout: conversation pieces, prefix consistency with the tokenizer's own chat
template (Qwen3 files, Qwen2.5's ChatML template, no template), labels, windows, and the loss of each review in
one forward pass of the whole conversation == its loss in a sequence cut right after it."""

from __future__ import annotations

import copy
import random

import pytest

import data_loader_movie_review as dl
from review_lm.data import chat_layout as cf
from review_lm.data import windows as wn
from review_lm.data.prompts import IGNORE_INDEX
from tests.helpers import QWEN25_TEMPLATE

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


# --------------------------------------------------------------------------------------------------------------
# Fixtures: tokenizers and real conversations
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen25_tokenizer(qwen_tokenizer):
    """The real Qwen vocabulary with Qwen2.5's chat template (a copy)."""
    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = QWEN25_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bpe_chatml(bpe_tokenizer):
    """The tiny BPE (no template) with <|im_start|> / <|im_end|> added as special tokens (a copy)."""
    tok = copy.deepcopy(bpe_tokenizer)
    assert cf.add_chatml_tokens(tok) == 2
    assert cf.add_chatml_tokens(tok) == 0
    return tok


@pytest.fixture(scope="module")
def formats(qwen_tokenizer, qwen25_tokenizer, bpe_tokenizer, bpe_chatml):
    """Every layout under test, by name."""
    return {
        "qwen3-template": cf.ChatFormat(qwen_tokenizer, "auto"),
        "qwen25-template": cf.ChatFormat(qwen25_tokenizer, "auto"),
        "qwen-builtin": cf.ChatFormat(qwen_tokenizer, "none"),
        "bpe-builtin-eos": cf.ChatFormat(bpe_tokenizer, "auto"),  # no template, no ChatML tokens
        "bpe-builtin-chatml": cf.ChatFormat(bpe_chatml, "auto"),
    }


FORMAT_NAMES = ["qwen3-template", "qwen25-template", "qwen-builtin", "bpe-builtin-eos", "bpe-builtin-chatml"]


def system_text(user: dl.UserHistory, use_profile: bool = True) -> str:
    """What the loader will pass as the system text: the spec's header lines (profile optional, task always)."""
    return dl.PromptBuilder(use_profile=use_profile).header(user).rstrip("\n")


def request_text(review: dl.Review) -> str:
    return dl.PromptBuilder.request(review.movie).rstrip("\n")


def user_turns(user: dl.UserHistory) -> list[cf.Turn]:
    return [(request_text(r), r.text) for r in user.reviews]


@pytest.fixture(scope="module")
def real_data(douban_dmr_dir):
    return dl.load_review_data([str(douban_dmr_dir)])


@pytest.fixture(scope="module")
def real_users(real_data):
    return real_data.users


@pytest.fixture(scope="module")
def example_user(example_data_file):
    return dl.load_review_file(str(example_data_file)).users[0]


# --------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------
def test_layouts_of_the_templates(formats, qwen_tokenizer, bpe_tokenizer):
    chatml = dict(system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
                  user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n<|im_start|>assistant\n",
                  end_of_turn="<|im_end|>", separator="\n")
    for name, no_system in (("qwen3-template", ""), ("qwen-builtin", ""), ("bpe-builtin-chatml", ""),
                            ("qwen25-template", f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n")):
        layout = formats[name].layout
        assert {k: getattr(layout, k) for k in chatml} == chatml, name
        assert layout.no_system == no_system, name
    assert formats["qwen3-template"].uses_template and formats["qwen25-template"].uses_template
    assert not formats["qwen-builtin"].uses_template and not formats["bpe-builtin-eos"].uses_template
    assert "chat template of" in formats["qwen3-template"].layout.source

    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for name in ("qwen3-template", "qwen25-template", "qwen-builtin"):
        fmt = formats[name]
        assert fmt.end_of_turn_id == im_end
        assert fmt.stop_token_ids == [im_end, qwen_tokenizer.eos_token_id]  # <|im_end|>, <|endoftext|>
        assert fmt.end_of_turn_id != qwen_tokenizer.eos_token_id

    # No ChatML tokens: the markers are plain text and the assistant turn ends with EOS (one token, a stop id).
    eos = formats["bpe-builtin-eos"]
    assert not cf.has_chatml_tokens(bpe_tokenizer)
    assert eos.layout.end_of_turn == bpe_tokenizer.eos_token == "<|endoftext|>"
    assert eos.layout.user_prefix == "<|im_start|>user\n" and eos.layout.system_suffix == "<|im_end|>\n"
    assert eos.end_of_turn_id == bpe_tokenizer.eos_token_id and eos.stop_token_ids == [bpe_tokenizer.eos_token_id]
    assert len(eos.request_ids("x")) > 6  # the plain-text markers cost several tokens each

    with pytest.raises(cf.ChatFormatError, match="chat_template must be one of"):
        cf.ChatFormat(qwen_tokenizer, "Auto")


def test_two_turn_rendering(formats):
    """The example in the report: what each layout renders for a 2-turn conversation."""
    turns = [("请为电影《A》写一条影评：", "好看。"), ("请为电影《B》写一条影评：", "一般")]
    body = ("<|im_start|>user\n请为电影《A》写一条影评：<|im_end|>\n<|im_start|>assistant\n好看。<|im_end|>\n"
            "<|im_start|>user\n请为电影《B》写一条影评：<|im_end|>\n<|im_start|>assistant\n一般<|im_end|>")
    with_system = "<|im_start|>system\n用户: Y\n任务: T<|im_end|>\n" + body
    assert formats["qwen3-template"].conversation_text("用户: Y\n任务: T", turns) == with_system
    assert formats["qwen25-template"].conversation_text("用户: Y\n任务: T", turns) == with_system
    assert formats["qwen3-template"].conversation_text(None, turns) == body
    assert formats["qwen25-template"].conversation_text("", turns) == \
        f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n" + body


def test_whole_conversation_rendering_vs_pieces(qwen_tokenizer, qwen25_tokenizer, formats, example_user):
    """Qwen2.5: one whole-conversation rendering == the pieces + the final separator. Qwen3: it is NOT what
    generation sees (an empty think block on the last assistant turn only), hence the generation-side pieces."""
    system, turns = system_text(example_user), user_turns(example_user)[:4]
    messages = [{"role": "system", "content": system}]
    for request, review in turns:
        messages += [{"role": "user", "content": request}, {"role": "assistant", "content": review}]
    qwen25_whole = qwen25_tokenizer.apply_chat_template(messages, tokenize=False)
    assert qwen25_whole == formats["qwen25-template"].conversation_text(system, turns) + "\n"
    qwen3_whole = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    ours = formats["qwen3-template"].conversation_text(system, turns)
    assert qwen3_whole.count("<think>\n\n</think>\n\n") == 1 and "<think>" not in ours
    assert qwen3_whole == ours[: ours.rindex(turns[-1][1])] + "<think>\n\n</think>\n\n" + turns[-1][1] \
        + "<|im_end|>\n"


# --------------------------------------------------------------------------------------------------------------
# Prefix consistency: what generation feeds before review k is a prefix of the whole conversation
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("use_profile", [True, False])
def test_generation_prompts_are_prefixes_of_the_conversation(formats, real_users, name, use_profile):
    fmt = formats[name]
    tok = fmt.tokenizer
    for user in real_users[:3]:
        system, turns = system_text(user, use_profile), user_turns(user)
        tokens = fmt.encode_conversation(system, turns)
        whole = tokens.input_ids()
        text = fmt.conversation_text(system, turns)
        window = wn.encode_window(tokens, wn.Window(0, len(turns), tuple(range(len(turns)))))
        for k in range(len(turns)):
            prompt = fmt.generation_prompt(system, turns[:k], turns[k][0])
            assert whole[: len(prompt.input_ids)] == prompt.input_ids
            assert text.startswith(prompt.text)
            assert window.prompt_ends[k] == len(prompt.input_ids)
            # + review k + end-of-turn is again a prefix, ending exactly at review k's labelled span
            cut = prompt.input_ids + fmt.answer_ids(turns[k][1])
            assert whole[: len(cut)] == cut and window.answer_spans[k][1] == len(cut)
            if k % 7 == 0 or k == len(turns) - 1:
                assert tok(prompt.text, add_special_tokens=False)["input_ids"] == prompt.input_ids
                if fmt.uses_template:  # the tokenizer's own template, turn by turn
                    assert prompt.text == cf.render_generation_prompt(tok, system, turns[:k], turns[k][0])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_pieces_ids_equal_the_whole_texts_ids_on_all_real_users(formats, real_users, example_user, name):
    """check_conversation_ids on every real user (all files), with and without the profile line; for the
    templates also the text == the template's own rendering of the real texts."""
    fmt = formats[name]
    for user in [*real_users, example_user]:
        for use_profile in (True, False):
            tokens = wn.check_conversation_ids(fmt, system_text(user, use_profile), user_turns(user))
            assert len(tokens) == len(user.reviews)
        wn.check_conversation_ids(fmt, None, user_turns(user)[:5])


def test_check_functions_catch_differences(formats):
    fmt = formats["qwen3-template"]
    # a review that starts with whitespace merges with the header's newline in the whole text
    with pytest.raises(cf.ChatFormatError, match="differ from the whole text's ids"):
        wn.check_conversation_ids(fmt, "S", [("请为电影《A》写一条影评：", "\n\n好")])
    # Qwen3's template rewrites an assistant message containing </think>: the pieces no longer match it
    with pytest.raises(cf.ChatFormatError, match="differ from the template's rendering"):
        fmt.check_against_template("S", [("r", "a</think>b"), ("r2", "c")])


def test_templates_that_are_not_prefix_consistent_are_rejected(qwen_tokenizer):
    # Qwen3 with enable_thinking=False: the generation prompt carries an empty think block, the history does not.
    with pytest.raises(cf.ChatFormatError, match=r"chat template of .*sha1 .*not prefix-consistent"):
        cf.ChatFormat(qwen_tokenizer, "auto", template_kwargs={"enable_thinking": False})
    odd = copy.deepcopy(qwen_tokenizer)
    odd.chat_template = ("{% for m in messages %}{{ '### ' + m.role + ': ' + m.content + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")
    with pytest.raises(cf.ChatFormatError, match="not closed by a single added token"):
        cf.ChatFormat(odd, "auto")
    assert not cf.ChatFormat(odd, "none").uses_template  # the built-in layout still works
    numbered = copy.deepcopy(qwen_tokenizer)
    numbered.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + loop.index|string + '\\n' "
                              "+ m.content + '<|im_end|>\\n' }}{% endfor %}"
                              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(cf.ChatFormatError, match="framed differently|not prefix-consistent"):
        cf.ChatFormat(numbered, "auto")


def test_generation_prompt_under_a_budget(formats, real_users):
    fmt = formats["qwen25-template"]
    user = real_users[0]
    system, turns = system_text(user), user_turns(user)
    request = "请为电影《新片》写一条影评："
    full = fmt.generation_prompt(system, turns, request)
    assert full.turns_kept == len(turns) and full.first_turn == 0
    sep = len(fmt.separator_ids)
    lengths = fmt.encode_conversation(system, turns).turn_lengths
    for max_length, max_new in ((len(full.input_ids) + 10, 10), (600, 100), (300, 50)):
        p = fmt.generation_prompt(system, turns, request, max_length, max_new)
        assert len(p.input_ids) + max_new <= max_length
        assert p.first_turn + p.turns_kept == len(turns)
        assert p.input_ids == fmt.tokenizer(p.text, add_special_tokens=False)["input_ids"]
        if p.first_turn:  # one more earlier turn would not fit
            assert len(p.input_ids) + lengths[p.first_turn - 1] + sep + max_new > max_length
        # the same ids as the conversation of the kept turns, i.e. a window of the conversation
        assert p.input_ids == fmt.generation_prompt(system, turns[p.first_turn:], request).input_ids
    with pytest.raises(cf.ChatFormatError, match="leaves no room for the prompt"):
        fmt.generation_prompt(system, turns, request, 60, 50)


# --------------------------------------------------------------------------------------------------------------
# Spec format with a template
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen3-template", "qwen25-template", "qwen-builtin", "bpe-builtin-eos"])
def test_spec_prompt_as_one_user_turn(formats, example_data_file, name):
    fmt = formats[name]
    tok = fmt.tokenizer
    splits = dl.split_chronologically(dl.load_review_file(str(example_data_file)))
    builder = dl.PromptBuilder()
    prefix, suffix = fmt.spec_framing()
    for sample in (splits["train"][0], splits["val"][0], splits["test"][-1]):
        prompt = builder.render(sample)
        spec = fmt.spec_prompt(prompt)
        assert spec.text.endswith(prompt + fmt.layout.user_suffix)
        assert spec.input_ids == tok(spec.text, add_special_tokens=False)["input_ids"]
        assert spec.input_ids == prefix + tok(prompt, add_special_tokens=False)["input_ids"] + suffix
        assert spec.stop_token_ids == fmt.stop_token_ids
        if fmt.uses_template:
            assert spec.text == tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        # the training sequence: prompt + target + end-of-turn, the target span labelled
        answer = fmt.answer_ids(sample.target.text)
        assert answer[-1] == fmt.end_of_turn_id
    if name == "qwen25-template":
        assert QWEN25_DEFAULT_SYSTEM in fmt.spec_prompt("x").text


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
