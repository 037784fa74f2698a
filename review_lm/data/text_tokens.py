"""Text is text: strings from the data or the command line never become special or control tokens.

A review, title, user name or task description may contain ``<|im_end|>``, ``<|im_start|>`` or
``<|endoftext|>`` (scraped text does). Tokenized like the layout's own markers they would become the control ids:
a review could open a fake user turn inside its labelled span, a title a fake assistant header, and an EOS inside
a spec target would teach the model to stop mid-review. Chat-serving stacks encode user text with special-token
splitting for this reason; so does every piece here.

A piece is given either as a plain ``str`` (all of it is text from the data: the spec format's header, history
lines, request, target) or as :data:`Segments`, a tuple alternating *layout* and *text*
(``(layout, text, layout, text, ..., layout)``; even indexes are layout) - e.g. a conversation request piece is
``(user_prefix, request, user_suffix)``. :class:`TextEncoder` then

* cuts the piece only at the added tokens found in its *layout* segments (ChatML markers, end-of-turn): the
  tokenizer itself cuts a text at every added token before its BPE runs, so for text without such strings the
  chunks and hence the ids are exactly ``tokenizer(piece)``'s (the spec preview and test_samples.json of clean
  data are byte-identical);
* tokenizes every chunk with ``split_special_tokens=True`` (transformers' documented call argument: special
  tokens inside it are plain text, e.g. ``<|im_end|>`` -> ``<``, ``|``, ``im``, ``_end``, ``|>``);
* additionally cuts the *text* segments just after the first character of any added token that is not special
  (Qwen's ``<think>``, ``<tool_call>``, ``<|fim_prefix|>`` ...): ``split_special_tokens`` leaves those whole and
  the tokenizer has no documented switch for them, so the string is tokenized in two chunks (``<`` and
  ``think>``) - ordinary ids that decode to the same text.

The layout's markers are thus the only added-token ids a piece can contain (checked by
``tests/test_data_integrity.py`` for every special token of the Qwen tokenizer in every field, both formats).
Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Segments = tuple[str, ...]  # (layout, text, layout, text, ..., layout): even indexes layout, odd ones text


def _pattern(strings) -> re.Pattern | None:
    # Longest first: at one position the tokenizer's added-token matcher prefers the longest token.
    ordered = sorted({s for s in strings if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


class TextEncoder:
    """Token ids of pieces whose text segments can never produce an added (special or control) token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = tokenizer.get_added_vocab()  # every added token, special or not: str -> id
        special = set(tokenizer.all_special_tokens)
        self.added_ids = frozenset(added.values())
        self._added_id = added
        self._markers = _pattern(added)  # what the tokenizer would cut a layout segment at
        # Escaped by cutting: the added tokens split_special_tokens leaves whole - the non-special ones, and all
        # of them for a tokenizer that ignores the argument (checked once: is EOS-as-text still the EOS id?).
        splits = text_is_text(tokenizer)
        self._not_special = _pattern(t for t in added if not (splits and t in special))

    # -- chunking ------------------------------------------------------------------------------------------------
    def _text_chunks(self, text: str) -> list[str]:
        """``text`` cut just after the first character of every non-special added token in it (see the module
        docstring); one chunk when there is none (the fast path: clean data)."""
        if self._not_special is None or self._not_special.search(text) is None:
            return [text]
        chunks, start = [], 0
        for m in self._not_special.finditer(text):
            chunks.append(text[start:m.start() + 1])
            start = m.start() + 1
        chunks.append(text[start:])
        return chunks

    def _plan(self, piece: str | Segments) -> list[str | int]:
        """The piece as chunks of text (str, tokenized with special-token splitting) and marker ids (int)."""
        segments = ("", piece) if isinstance(piece, str) else piece
        plan: list[str | int] = []
        current = ""
        for k, segment in enumerate(segments):
            if k % 2:  # text from the data: never cut at a marker, only escaped
                first, *rest = self._text_chunks(segment)
                current += first
                for chunk in rest:
                    plan.append(current)
                    current = chunk
                continue
            start = 0
            for m in self._markers.finditer(segment) if self._markers is not None else ():
                current += segment[start:m.start()]
                plan += [current, self._added_id[m.group()]]
                current, start = "", m.end()
            current += segment[start:]
        plan.append(current)
        return [p for p in plan if p != ""]

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode(self, pieces: Sequence[str | Segments]) -> list[list[int]]:
        """The ids of each piece (no special tokens added), all text chunks in one batched tokenizer call."""
        plans = [self._plan(p) for p in pieces]
        # Each distinct chunk once: the layout's own chunks ("\n", "assistant\n") recur in every piece.
        texts = list(dict.fromkeys(c for plan in plans for c in plan if isinstance(c, str)))
        ids = dict(zip(texts, self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                                             return_attention_mask=False)["input_ids"], strict=True)) if texts else {}
        out = []
        for plan in plans:
            if len(plan) == 1 and isinstance(plan[0], str):  # a plain text piece (the spec format's)
                out.append(list(ids[plan[0]]))  # a copy: equal pieces must not share one list
                continue
            piece: list[int] = []
            for c in plan:
                if isinstance(c, str):
                    piece += ids[c]
                else:
                    piece.append(c)
            out.append(piece)
        return out

    def encode_one(self, piece: str | Segments) -> list[int]:
        return self.encode([piece])[0]


# Cutting a review before it is tokenised whole (a 10 MB review took 30 s and 3.8 GB to tokenise, then all but
# its first max_length tokens were dropped). Safe bound: no token of Qwen's vocabulary spans more than 128
# characters (its longest is a run of 128 spaces), so a text cut to 128 * (max_length + 64) characters still has
# at least max_length + 64 tokens; the first max_length - all any sample, window or generation prompt can hold
# of one review - are the whole text's, because a cut changes BPE only around its last pre-token, and the 64
# spare tokens keep that change out of reach.
CUT_CHARS_PER_TOKEN = 128
CUT_MARGIN_TOKENS = 64


def cut_bound(max_length: int | None) -> int | None:
    """The most characters of one review worth tokenising under ``max_length`` (None: no budget, no cut)."""
    return None if max_length is None else CUT_CHARS_PER_TOKEN * (max(max_length, 1) + CUT_MARGIN_TOKENS)


def cut_text(text: str, max_length: int | None) -> str:
    """``text`` cut to :func:`cut_bound` characters (unchanged when shorter: every ordinary review)."""
    bound = cut_bound(max_length)
    return text if bound is None or len(text) <= bound else text[:bound]


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: str) -> list[list[int]]:
    """The ids evaluation feeds for test_samples.json's prompt texts (no special tokens added).

    A run without a chat template (``chat_template`` "none": the spec's plain prompt) has no layout in its prompt:
    all of it is text from the data, encoded as text (a planted ``<|im_end|>`` stays plain characters, as in
    training; for clean text the ids are exactly ``tokenizer(prompt)``'s). A templated prompt's markers are
    layout that only the text form carries here, so it is tokenized as a whole, as the template renders it."""
    if chat_template == "none":
        return TextEncoder(tokenizer).encode(list(prompts))
    return tokenizer(list(prompts), add_special_tokens=False, return_attention_mask=False)["input_ids"]


def text_is_text(tokenizer) -> bool:
    """Whether ``tokenizer`` honours ``split_special_tokens=True`` (a special token in text is not its id)."""
    eos = tokenizer.eos_token
    if not eos:
        return True
    ids = tokenizer(eos, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids != [tokenizer.eos_token_id]


__all__ = ["CUT_CHARS_PER_TOKEN", "Segments", "TextEncoder", "cut_bound", "cut_text", "encode_prompts",
           "text_is_text"]
