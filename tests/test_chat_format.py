"""Tests for review_lm.data.chat_layout: conversation pieces and the layouts of the templates,
prefix consistency with the tokenizer's own chat template (Qwen3 files, Qwen2.5's ChatML template, no
template), and the spec format with a template. Labels, windows and the loss: test_chat_windows.py."""

from __future__ import annotations

import copy

import pytest

import data_loader_movie_review as dl
from review_lm.data import chat_layout as cf
from review_lm.data import windows as wn
from tests.helpers import FORMAT_NAMES, system_text, user_turns

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


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
