"""One sequence per user: a review history as a chat conversation, its layout and token pieces.

The conversation format trains every review of a user's history in ONE sequence instead of one sample per
review that repeats the whole earlier history (O(N^2) tokens per user)::

    [system]  profile + task                  (once; may be absent)
    [user]    请为电影《A》写一条影评：           (request 1)
    [asst]    review of A <end-of-turn>       (labelled)
    [user]    请为电影《B》写一条影评：           (request 2)
    [asst]    review of B <end-of-turn>       (labelled)
    ...

Causal attention makes review k see exactly the system turn and reviews 1..k-1, which is what generation feeds
the model before it writes review k. The texts (system text, request texts, review texts) come from the loader
as plain strings; this module turns them into token ids and labels. Nothing here imports torch.

Pieces
------
A conversation is the concatenation of text pieces, each tokenized on its own (a lazy dataset tokenizes each
piece once and assembles windows from them)::

    system_piece(system)
    request_piece(r_1) + answer_piece(v_1)
    separator + request_piece(r_2) + answer_piece(v_2)
    ...

* ``system_piece``: everything before the first user turn, e.g. ``<|im_start|>system\\n{system}<|im_end|>\\n``
  (empty for Qwen3's template and the built-in layout when there is no system text; Qwen2.5's template puts
  its default system message there).
* ``request_piece``: the user turn and the assistant header = the generation prompt,
  ``<|im_start|>user\\n{request}<|im_end|>\\n<|im_start|>assistant\\n``.
* ``answer_piece``: the review + the end-of-turn token, ``{review}<|im_end|>``. These ids (and only these) are
  labelled: the review's content ids plus the end-of-turn id, never the separator, a header or a request.
* ``separator``: the text between an end-of-turn and the next user turn (``\\n`` in ChatML).

A window of turns [start, end) is ``system_piece + turn_start + (separator + turn_i)...``: the conversation
with earlier turns dropped, which is also what generation with a token budget feeds.

Templates (``chat_template=``)
------------------------------
* ``"auto"``: the tokenizer's own chat template when it has one (``tokenizer.chat_template``), rendered with
  ``tokenizer.apply_chat_template(..., tokenize=False)``; otherwise the built-in layout.
* ``"none"``: always the built-in layout.

A template's pieces are derived from its renderings of sentinel conversations, generation side: with
``P_k = render(system, turns 1..k-1 complete, user k, add_generation_prompt=True)`` (what generation feeds
before review k), every ``P_{k+1}`` must start with ``P_k + review_k + end-of-turn``; the text between is the
separator and the next request piece. A template that is not prefix-consistent this way raises
:class:`ChatFormatError` naming it. Qwen3's template is prefix-consistent on the generation side, but its
rendering of a *whole* conversation is not what generation sees (it gives the last assistant turn an empty
``<think>\\n\\n</think>\\n\\n`` block, earlier ones none), so the conversation is never rendered in one call;
with ``enable_thinking=False`` (``template_kwargs``) its generation prompt carries that block, the history does
not, and it is rejected. Qwen2.5's template is plain ChatML: a whole-conversation rendering equals our
conversation text plus the final separator.

The end-of-turn token
---------------------
The end-of-turn is the single token the template closes an assistant turn with (``<|im_end|>`` for ChatML).
The built-in layout is ChatML: Qwen's *base* tokenizers (Qwen2.5-3B included) already have ``<|im_start|>``
and ``<|im_end|>`` as special tokens, so the markers cost one token each and cannot collide with review text.
``<|im_end|>`` rather than EOS (``<|endoftext|>`` for Qwen base) ends a review: a base model has read EOS as
"a new, unrelated document starts here", so EOS between reviews would teach it to forget the context at every
turn, while ``<|im_end|>`` is a token it may emit to stop (generation stops on ``stop_token_ids``: the
end-of-turn and EOS). A tokenizer without these two tokens (e.g. a small test BPE) keeps the same ChatML
layout with the markers as plain text, and its assistant turns end with the EOS token instead (the only
single token such a tokenizer is sure to have; the plain-text ``<|im_end|>`` would be several tokens and no
stop id). :func:`add_chatml_tokens` adds the two tokens to such a tokenizer (the model's embeddings must then
be resized).

How a conversation becomes training windows (ids and labels) is ``review_lm.data.windows``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from review_lm.data.text_tokens import TextEncoder

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TEMPLATE_MODES = ("auto", "none")
# What a run records as "chat_template" (the template actually used) and downstream scripts read back; the one
# list of these names (the plan decides, the run record and the datasets read them):
TEMPLATE_TOKENIZER = "tokenizer"  # the tokenizer's own chat template (an Instruct model's)
TEMPLATE_BUILTIN = "built-in ChatML"  # this module's ChatML layout (base models)
TEMPLATE_NONE = "none"  # the spec's plain prompt, no chat framing
RECORDED_TEMPLATES = (TEMPLATE_TOKENIZER, TEMPLATE_BUILTIN, TEMPLATE_NONE)

Turn = tuple[str, str]  # (request text, review text)

# Sentinels for deriving a template's layout: no whitespace (templates may strip), no markup characters.
_SYS = "SYSTEMx7c1eSENTINEL"
_USER = ("USERx7c1eONE", "USERx7c1eTWO", "USERx7c1eTHREE")
_ASSISTANT = ("ASSISTANTx7c1eONE", "ASSISTANTx7c1eTWO")


class ChatFormatError(ValueError):
    """A template that cannot be used, a budget that cannot hold a turn, or pieces whose ids disagree."""


# ------------------------------------------------------------------------------------------------------------
# Layout: the text pieces
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatLayout:
    """The text pieces of a conversation (see the module docstring). Pure strings, no tokenizer."""

    source: str  # TEMPLATE_BUILTIN or the template's name, for messages
    system_prefix: str  # system piece = system_prefix + system + system_suffix when a system text is given
    system_suffix: str
    no_system: str  # system piece without a system text ("" or the template's default system turn)
    user_prefix: str  # request piece = user_prefix + request + user_suffix (user_suffix ends with the
    user_suffix: str  # assistant header: the generation prompt)
    end_of_turn: str  # the token text closing an assistant turn
    separator: str  # between an end-of-turn and the next request piece

    def system_piece(self, system: str | None) -> str:
        """Everything before the first user turn. ``None`` or ``""``: no system turn."""
        return "".join(self.system_segments(system))

    def request_piece(self, request: str) -> str:
        """The user turn with ``request`` and the assistant header (ends where the review starts)."""
        return "".join(self.request_segments(request))

    def system_segments(self, system: str | None) -> tuple[str, ...]:
        """:meth:`system_piece` as ``text_tokens.Segments``: the system text is text, the rest layout."""
        return (self.system_prefix, system, self.system_suffix) if system else (self.no_system,)

    def request_segments(self, request: str) -> tuple[str, ...]:
        return self.user_prefix, request, self.user_suffix

    def answer_piece(self, review: str) -> str:
        """The review and the end-of-turn: the labelled text."""
        return review + self.end_of_turn

    def conversation_text(self, system: str | None, turns: Sequence[Turn]) -> str:
        """The whole conversation, ending with the last review's end-of-turn (no trailing separator)."""
        parts = [self.system_piece(system)]
        for i, (request, review) in enumerate(turns):
            if i:
                parts.append(self.separator)
            parts += [self.request_piece(request), self.answer_piece(review)]
        return "".join(parts)

    def generation_text(self, system: str | None, earlier: Sequence[Turn], request: str) -> str:
        """What generation feeds before writing the review for ``request`` after the ``earlier`` turns."""
        text = self.conversation_text(system, earlier)
        return text + (self.separator if earlier else "") + self.request_piece(request)


def builtin_layout(tokenizer) -> ChatLayout:
    """Plain ChatML; the end-of-turn is ``<|im_end|>`` if the tokenizer has both ChatML tokens, else its EOS."""
    eot = IM_END if has_chatml_tokens(tokenizer) else _eos_text(tokenizer)
    source = TEMPLATE_BUILTIN + ("" if eot == IM_END else f" (plain-text markers, end of turn {eot})")
    return ChatLayout(
        source=source,
        system_prefix=f"{IM_START}system\n", system_suffix=f"{IM_END}\n", no_system="",
        user_prefix=f"{IM_START}user\n", user_suffix=f"{IM_END}\n{IM_START}assistant\n",
        end_of_turn=eot, separator="\n",
    )


def has_chatml_tokens(tokenizer) -> bool:
    """Whether ``<|im_start|>`` and ``<|im_end|>`` are single (added) tokens of ``tokenizer``."""
    added = tokenizer.get_added_vocab()
    return IM_START in added and IM_END in added


def add_chatml_tokens(tokenizer) -> int:
    """Add ``<|im_start|>`` / ``<|im_end|>`` as special tokens; the number added. Resize the model's
    embeddings (``model.resize_token_embeddings(len(tokenizer))``) when it is not 0."""
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_added_vocab()]
    return tokenizer.add_tokens(missing, special_tokens=True) if missing else 0


def _eos_text(tokenizer) -> str:
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ChatFormatError("the tokenizer has neither the ChatML tokens nor an EOS token to end a turn with")
    return tokenizer.eos_token


def template_name(tokenizer) -> str:
    """``chat template of NAME (sha1 ...)``: how errors name a tokenizer's template."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else repr(tokenizer.chat_template)
    digest = hashlib.sha1(template.encode("utf-8")).hexdigest()[:10]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"chat template of {name} (sha1 {digest})"


def _messages(system: str | None, turns: Sequence[Turn], request: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for req, review in turns:
        messages += [{"role": "user", "content": req}, {"role": "assistant", "content": review}]
    if request is not None:
        messages.append({"role": "user", "content": request})
    return messages


def render_generation_prompt(tokenizer, system: str | None, earlier: Sequence[Turn], request: str,
                             template_kwargs: dict[str, Any] | None = None) -> str:
    """The tokenizer's own template: ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``."""
    return tokenizer.apply_chat_template(_messages(system, earlier, request), tokenize=False,
                                         add_generation_prompt=True, **(template_kwargs or {}))


def template_layout(tokenizer, template_kwargs: dict[str, Any] | None = None) -> ChatLayout:
    """Derive the pieces of the tokenizer's chat template from sentinel renderings (generation side).

    Raises :class:`ChatFormatError` naming the template if it is not prefix-consistent (``P_{k+1}`` does not
    start with ``P_k + review_k + end-of-turn``), does not end an assistant turn with a single added token,
    or frames the second and third turns differently.
    """
    name = template_name(tokenizer)
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)

    def fail(problem: str) -> ChatFormatError:
        return ChatFormatError(f"{name}: {problem}; use chat_template='none' (the built-in ChatML layout)")

    def derive(system: str | None) -> tuple[str, str, str, str, str, str]:
        turns = list(zip(_USER[:2], _ASSISTANT, strict=True))
        try:
            p = [render_generation_prompt(tokenizer, system, turns[:k], _USER[k], template_kwargs) for k in range(3)]
        except Exception as err:  # jinja errors, a template that rejects roles, ...
            raise fail(f"rendering a sentinel conversation failed ({type(err).__name__}: {err})") from None
        for k in (1, 2):
            if not p[k].startswith(p[k - 1] + _ASSISTANT[k - 1]):
                raise fail(f"not prefix-consistent: the generation prompt for turn {k + 1} does not start with "
                           f"the prompt for turn {k} + its answer (prompt {k}: {p[k - 1]!r}; prompt {k + 1}: "
                           f"{p[k]!r})")
        deltas = [p[k][len(p[k - 1]) + len(_ASSISTANT[k - 1]):] for k in (1, 2)]
        eot = next((tok for tok in added if deltas[0].startswith(tok)), None)
        if eot is None:
            raise fail(f"an assistant turn is not closed by a single added token (after the answer: {deltas[0]!r})")
        rest = deltas[0][len(eot):]
        if rest.count(_USER[1]) != 1 or deltas[1] != eot + rest.replace(_USER[1], _USER[2]):
            raise fail(f"turns 2 and 3 are framed differently ({deltas[0]!r} vs {deltas[1]!r})")
        framing, user_suffix = rest.split(_USER[1])
        # The separator is the plain text before the next added token (ChatML: "\n" before <|im_start|>).
        cut = min((i for i in (framing.find(tok) for tok in added) if i >= 0), default=0)
        separator, user_prefix = framing[:cut], framing[cut:]
        first = user_prefix + _USER[0] + user_suffix
        if not p[0].endswith(first):
            raise fail(f"the first turn is framed differently from later ones ({p[0]!r})")
        head = p[0][: len(p[0]) - len(first)]
        return head, user_prefix, user_suffix, eot, separator, first

    no_system, *common = derive(None)
    head, *with_system = derive(_SYS)
    if common != with_system:
        raise fail("a system message changes how the turns are framed")
    if head.count(_SYS) != 1:
        raise fail(f"the system message is not rendered verbatim ({head!r})")
    system_prefix, system_suffix = head.split(_SYS)
    user_prefix, user_suffix, eot, separator, _ = common
    return ChatLayout(name, system_prefix, system_suffix, no_system, user_prefix, user_suffix, eot, separator)


# ------------------------------------------------------------------------------------------------------------
# Token ids
# ------------------------------------------------------------------------------------------------------------
@dataclass
class GenerationPrompt:
    """What generation feeds the model: ``text`` and its ``input_ids``; stop on any of ``stop_token_ids``."""

    text: str
    input_ids: list[int]
    stop_token_ids: list[int]
    first_turn: int = 0  # index (into the earlier turns) of the oldest turn kept under the budget
    turns_kept: int = 0


@dataclass
class ConversationTokens:
    """One user's conversation as token pieces: ``system``, ``separator``, per turn ``requests[i]`` and
    ``answers[i]`` (review ids + end-of-turn id). The whole conversation is
    ``system + requests[0] + answers[0] + separator + requests[1] + answers[1] + ...``."""

    system: list[int]
    separator: list[int]
    requests: list[list[int]]
    answers: list[list[int]]
    end_of_turn_id: int

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def turn_lengths(self) -> list[int]:
        """Tokens of each turn, request + answer (the separator before it not included): for plan_windows."""
        return [len(r) + len(a) for r, a in zip(self.requests, self.answers, strict=True)]

    @property
    def min_turn_lengths(self) -> list[int]:
        """The fewest tokens each turn can be cut to: its request, one review token, the end-of-turn."""
        return [len(r) + min(2, len(a)) for r, a in zip(self.requests, self.answers, strict=True)]

    def input_ids(self) -> list[int]:
        """The whole conversation's ids (windows and their labels: ``review_lm.data.windows.encode_window``)."""
        ids = list(self.system)
        for i, (request, answer) in enumerate(zip(self.requests, self.answers, strict=True)):
            ids += (self.separator if i else []) + request + answer
        return ids


@dataclass
class EncodedWindow:
    """One window's ids and labels. ``answer_spans[i]`` = ``(start, end)`` of turn ``turns[i]``'s answer
    (review + end-of-turn) in ``input_ids``; ``prompt_ends[i]`` = where its generation prompt ends (= the
    span's start). ``labelled`` are the turns whose spans carry labels."""

    input_ids: list[int]
    labels: list[int]
    turns: list[int]
    answer_spans: list[tuple[int, int]]
    labelled: tuple[int, ...]
    truncated: bool = False

    @property
    def prompt_ends(self) -> list[int]:
        return [s for s, _ in self.answer_spans]

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


class ChatFormat:
    """A tokenizer + a layout: text pieces, their token ids, generation prompts.

    ``chat_template``: ``"auto"`` (the tokenizer's template if it has one, else built-in ChatML) or ``"none"``
    (built-in ChatML). ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``).
    """

    def __init__(self, tokenizer, chat_template: str = "auto", template_kwargs: dict[str, Any] | None = None):
        if chat_template not in TEMPLATE_MODES:
            raise ChatFormatError(f"chat_template must be one of {TEMPLATE_MODES}, got {chat_template!r}")
        self.tokenizer, self.text = tokenizer, TextEncoder(tokenizer)
        self.template_kwargs = dict(template_kwargs or {})
        self.uses_template = chat_template == "auto" and bool(tokenizer.chat_template)
        self.layout = template_layout(tokenizer, self.template_kwargs) if self.uses_template \
            else builtin_layout(tokenizer)
        eot_ids = self._ids(self.layout.end_of_turn)
        if len(eot_ids) != 1:
            raise ChatFormatError(f"{self.layout.source}: end of turn {self.layout.end_of_turn!r} is "
                                  f"{len(eot_ids)} tokens, not one")
        self.end_of_turn_id = eot_ids[0]
        self.separator_ids = self._ids(self.layout.separator)
        stops = [self.end_of_turn_id, tokenizer.eos_token_id]
        self.stop_token_ids = [t for i, t in enumerate(stops) if t is not None and t not in stops[:i]]

    def _ids(self, text: str) -> list[int]:  # the layout's own text only (markers are real tokens)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- pieces: texts from the data never yield a special token (text_tokens) ---------------------------------
    def system_ids(self, system: str | None) -> list[int]:
        return self.text.encode_one(self.layout.system_segments(system))

    def request_ids(self, request: str) -> list[int]:
        return self.text.encode_one(self.layout.request_segments(request))

    def answer_ids(self, review: str) -> list[int]:
        """The review's ids + the end-of-turn id (the review is tokenized alone, then the id appended)."""
        return self.text.encode_one(review) + [self.end_of_turn_id]

    def encode_conversation(self, system: str | None, turns: Sequence[Turn]) -> ConversationTokens:
        """All pieces of one conversation, each tokenized on its own (batched)."""
        requests = self.text.encode([self.layout.request_segments(r) for r, _ in turns])
        reviews = self.text.encode([v for _, v in turns])
        return ConversationTokens(self.system_ids(system), list(self.separator_ids), requests,
                                  [ids + [self.end_of_turn_id] for ids in reviews], self.end_of_turn_id)

    def conversation_text(self, system: str | None, turns: Sequence[Turn]) -> str:
        return self.layout.conversation_text(system, turns)

    # -- generation --------------------------------------------------------------------------------------------
    def generation_prompt(self, system: str | None, earlier: Sequence[Turn], request: str,
                          max_length: int | None = None, max_new_tokens: int = 0) -> GenerationPrompt:
        """The prompt for a new review of ``request`` after the ``earlier`` turns (oldest first).

        Budget: prompt + ``max_new_tokens`` <= ``max_length``; the most recent earlier turns that fit are kept
        (a window of the conversation, as in training). ``max_length=None``: all of them. The ids are the
        pieces' ids, i.e. exactly what the model saw before that review in training.
        """
        system_ids, request_ids = self.system_ids(system), self.request_ids(request)
        tokens = self.encode_conversation(system, earlier)
        first = 0
        if max_length is not None:
            room = max_length - max_new_tokens - len(system_ids) - len(request_ids)
            if room < 0:
                raise ChatFormatError(f"max_length {max_length} leaves no room for the prompt for {request!r} "
                                      f"({len(system_ids) + len(request_ids)} tokens without earlier turns) plus "
                                      f"max_new_tokens {max_new_tokens}")
            sep, used, first = len(self.separator_ids), 0, len(earlier)
            for i in range(len(earlier) - 1, -1, -1):
                cost = tokens.turn_lengths[i] + sep
                if used + cost > room:
                    break
                used, first = used + cost, i
        ids = list(system_ids)
        for i in range(first, len(earlier)):
            if i > first:
                ids += self.separator_ids
            ids += tokens.requests[i] + tokens.answers[i]
        if first < len(earlier):
            ids += self.separator_ids
        ids += request_ids
        text = self.layout.generation_text(system, earlier[first:], request)
        return GenerationPrompt(text, ids, list(self.stop_token_ids), first, len(earlier) - first)

    # -- spec format with a template ---------------------------------------------------------------------------
    def spec_framing(self) -> tuple[list[int], list[int]]:
        """``(prefix_ids, suffix_ids)`` around a spec prompt: ``prefix + ids(prompt) + suffix`` is the prompt as
        ONE user turn (no system turn) + the generation prompt; the target follows, then the end-of-turn."""
        return self.system_ids(None) + self._ids(self.layout.user_prefix), self._ids(self.layout.user_suffix)

    def spec_prompt(self, prompt: str) -> GenerationPrompt:
        """The spec prompt text (``PromptBuilder.render``, trailing newline kept as given) as one user turn.
        Train on ``input_ids + target_ids + [end_of_turn_id]`` labelling the target and the end-of-turn."""
        prefix, suffix = self.spec_framing()
        text = self.layout.system_piece(None) + self.layout.request_piece(prompt)
        return GenerationPrompt(text, prefix + self.text.encode_one(prompt) + suffix, list(self.stop_token_ids))

    # -- checks -----------------------------------------------------------------------------------------------
    def check_against_template(self, system: str | None, turns: Sequence[Turn]) -> None:
        """With a template: the pieces' text must equal the template's own generation-side rendering of these
        (real) texts (one render of all turns + a final dummy request). Raises :class:`ChatFormatError`."""
        if not self.uses_template:
            return
        probe = "x"
        expected = render_generation_prompt(self.tokenizer, system, turns, probe, self.template_kwargs)
        got = self.layout.generation_text(system, turns, probe)
        if expected != got:
            at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                      min(len(expected), len(got)))
            raise ChatFormatError(f"{self.layout.source}: the pieces differ from the template's rendering at "
                                  f"character {at}: template {expected[at - 20:at + 40]!r}, pieces "
                                  f"{got[at - 20:at + 40]!r}")


__all__ = [
    "RECORDED_TEMPLATES", "TEMPLATE_BUILTIN", "TEMPLATE_NONE", "TEMPLATE_TOKENIZER",
    "IM_END", "IM_START", "TEMPLATE_MODES", "ChatFormat", "ChatFormatError", "ChatLayout",
    "ConversationTokens", "EncodedWindow", "GenerationPrompt", "Turn", "add_chatml_tokens", "builtin_layout",
    "has_chatml_tokens", "render_generation_prompt", "template_layout", "template_name",
]
