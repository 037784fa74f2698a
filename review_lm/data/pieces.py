"""Token pieces stored once, and the read-only views a split's samples are read through (both formats).

:class:`PieceStore` keeps every distinct text piece (a header, a history line, a request, a review) tokenized once
in one flat ``int32`` array; ``review_lm.data.spec_dataset`` (the spec's samples) and
``review_lm.data.conversation_dataset`` (one conversation per user) assemble their sequences from it.
:class:`EncodedView` and :class:`PromptRecord` are how evaluation-facing code (the prompt check, test_samples.json)
reads either kind of dataset.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from review_lm.data.reviews import Sample
from review_lm.data.text_tokens import Segments, TextEncoder
from review_lm.utils import interrupt_point

TOKENIZE_BATCH = 2048  # texts per tokenizer call: large enough for the Rust batch encoder to use its threads


class PieceStore:
    """Distinct text pieces -> token ids. Register with :meth:`add`, then :meth:`tokenize` once."""

    def __init__(self) -> None:
        self._index: dict[Hashable, int] = {}
        # What to render for each new piece, kept as (function, argument) rather than the rendered text, so a
        # million history lines are never all alive as strings at once: they are rendered batch by batch.
        self._pending: list[tuple[Callable[[Any], str], Any]] = []
        self.tokens = np.zeros(0, dtype=np.int32)
        self.offsets = np.zeros(1, dtype=np.int64)

    def add(self, key: Hashable, render: Callable[[Any], str | Segments], arg: Any) -> int:
        """The id of the piece ``render(arg)``; ``key`` must identify that text (equal keys, equal text).
        ``render`` returns a ``str`` (all text from the data) or layout/text ``Segments`` (``text_tokens``)."""
        piece = self._index.get(key)
        if piece is None:
            piece = self._index[key] = len(self._pending)
            self._pending.append((render, arg))
        return piece

    def add_text(self, kind: str, text: str | Segments) -> int:
        """The id of a piece that is already text (a header, a review) or segments: keyed by its kind and them."""
        return self.add((kind, text), _identity, text)

    def tokenize(self, tokenizer, batch_size: int = TOKENIZE_BATCH) -> None:
        """Tokenize every registered piece (without special tokens), in batches; then forget the texts.

        Text from the data never yields a special token (``text_tokens.TextEncoder``); batches are small, so a
        signal handler (Ctrl-C, SIGTERM) runs between them."""
        # One growing C array rather than chunks + np.concatenate: concatenating would briefly need the whole
        # store twice (a large realloc is a remap on Linux, not a copy).
        tokens, lengths = array("i"), array("q")
        pending, encoder = self._pending, TextEncoder(tokenizer)
        for start in tqdm(range(0, len(pending), batch_size), desc="tokenizing review pieces", unit="batch",
                          disable=None if len(pending) > 50 * batch_size else True):
            interrupt_point("tokenizing")  # a Ctrl-C whose exception a __del__ swallowed still stops here
            texts = [render(arg) for render, arg in pending[start:start + batch_size]]
            ids = encoder.encode(texts)
            lengths.extend(map(len, ids))
            tokens.frombytes(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32).view(np.uint8))
        self.tokens = np.frombuffer(tokens, dtype=np.int32) if len(tokens) else np.zeros(0, dtype=np.int32)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=self.offsets[1:])
        self._index, self._pending = {}, []

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids(self, piece: int) -> np.ndarray:
        return self.tokens[self.offsets[piece]:self.offsets[piece + 1]]

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.offsets.nbytes


def _identity(text: str | Segments) -> str | Segments:
    return text


@dataclass(frozen=True)
class PromptRecord:
    """What test_samples.json records of a sample (``sample_record``): its prompt and budget, no token ids."""

    sample: Sample
    prompt: str
    prompt_length: int
    history_count: int
    target_truncated: bool


class EncodedView(Sequence):
    """A split's reviews as a read-only sequence of encoded samples, each assembled when read (nothing is kept):
    ``dataset.encoded(k)`` of a :class:`ReviewDataset` or a ``conversation_dataset.ConversationDataset``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_reviews

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.dataset.encoded(j) for j in range(*i.indices(len(self)))]
        return self.dataset.encoded(i)

    def __iter__(self) -> Iterator:
        return (self.dataset.encoded(j) for j in range(len(self)))
