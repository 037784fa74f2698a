"""Training-ready samples for thousands of users: token pieces stored once, each sample assembled on demand.

The encoder of the project (training, evaluation's test prompts and generation's new-review prompt; the
conversation format's windows are in ``review_lm.data.conversation_dataset``, dispatched from here). A user's n-th
sample repeats all n-1 earlier reviews, so storing every sample's ``input_ids`` and ``labels`` as Python lists
(the eager encoder, kept as the tests' oracle in ``tests/eager_encoder.py``) grows with reviews x history:
100,000 samples at ``--max_length 4096`` hold 189 M prompt tokens (3.5 GB of Python ints). Here the data is kept
at the size of the data:

* :class:`~review_lm.data.pieces.PieceStore` - every distinct text piece of the prompt (a user's header, a history
  line, a history title, a request, a target review) is tokenized once, in batches through the tokenizer's batch
  call (the fast tokenizer encodes a batch in Rust threads), and kept in one flat ``int32`` array with ``int64``
  offsets.
* :class:`ReviewTokens` - per review, which pieces it contributes (as history line, as last history line, as
  request, as target) and a prefix sum of its history-line lengths over all reviews; per user, its header.
* :class:`ReviewDataset` - one split: per sample only a few integers (its review, how many history items fit,
  the target length, the prompt length, the total length). ``dataset[i]`` gathers the pieces into
  ``{"input_ids": [...], "labels": [...]}`` (plain lists of ints, what transformers' collators expect).

Budget: ``input_ids = prompt + target + [EOS]``; the most recent history items that fit in ``max_length`` are
kept ("(N条)" shows how many); the target is never dropped, only truncated if it alone does not fit. Labels are
-100 on the prompt and equal to the ids on the target and EOS; they come from spans, never from masking pad ids,
so EOS stays labelled when the pad id equals the EOS id (Qwen2.5 base). Piece boundaries sit just after a
newline (see ``PromptBuilder``), so the assembled ids equal ``tokenizer(prompt)`` for BPE tokenizers with
GPT-2/Qwen-style pre-tokenisation (:func:`prompt_text_mismatches` counts exceptions).

The ids are exactly the eager path's (same pieces, same budget rule: the most recent history items that fit,
found with the same binary search, run for all samples at once with numpy); ``tests/test_review_dataset.py``
compares every sample for all ablations and several budgets. Lengths (``dataset.lengths``) come from the
prefix sums without assembling anything.

Why a plain map-style dataset (``__len__`` / ``__getitem__``, what torch's DataLoader and Trainer need; no torch
import, so data errors answer before torch loads) and not HF ``datasets`` with an on-the-fly transform: the only
documented way to hand Trainer precomputed lengths is a ``datasets.Dataset`` length column (``length_column_name``),
but in datasets 5 a column of a dataset with a transform is read row by row *through the transform* (transformers'
``LengthGroupedSampler`` indexes it once per sample per epoch), which assembles every sample, ~13 us of overhead
each before any assembling. Arrow would add nothing to storage that is already a few numpy arrays. So the data is a
plain map-style dataset and ``review_lm.training.samplers.DatasetLengthsMixin`` passes ``dataset.lengths`` to the
same ``LengthGroupedSampler`` through its ``lengths=`` argument, overriding ``Trainer._get_train_sampler`` /
``_get_eval_sampler`` (the hook TRL's trainers override too).
Distributed runs: every rank builds the same datasets itself instead of rank 0 building and the others reading a
cache. Building is cheap (seconds for a million reviews, see the README's 性能 section), deterministic, needs no
shared file system, no barrier and no cache invalidation when the data, tokenizer or flags change; each rank
then holds only the compact arrays.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from review_lm.data import chat_layout as cf
from review_lm.data import prompts, reviews
from review_lm.data.pieces import EncodedView, PieceStore, PromptRecord
from review_lm.data.text_tokens import cut_bound, cut_text

PROMPT_CHECK_SAMPLES = 32  # training prompts re-tokenized as text to check they match the assembled ids


@dataclass
class EncodedSample:
    """One sample's ids and labels with what they came from (the form the preview and test_samples.json take)."""

    sample: reviews.Sample
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the target
    history_count: int  # history items kept in the prompt
    target_truncated: bool
    builder: prompts.PromptBuilder = field(default=prompts.PromptBuilder(), repr=False)  # the builder the ids came from
    framing: tuple[str, str] = ("", "")  # chat-template text around the spec prompt (--chat_template auto)

    @property
    def prompt(self) -> str:
        """The rendered prompt these ids came from (same history items), in its chat framing if any."""
        return self.framing[0] + self.builder.render(self.sample, self.history_count) + self.framing[1]

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


class ReviewTokens:
    """The pieces of every review of the given users, for one prompt builder, tokenized once.

    Reviews are numbered globally, user after user, each user's reviews in their (chronological) order: review
    ``g`` of a sample is ``review_start[row] + position``. Arrays per review: ``item`` (history line, not last),
    ``last`` (history line that ends the history block), ``request``, ``target`` piece ids; ``history_cumsum``
    (``[g]`` = tokens of the non-last history lines of reviews ``0..g-1``). Per user row: ``header`` piece id.
    ``titles[k]`` is the piece of "历史影评记录 (k条):".
    """

    def __init__(self, users: Sequence[reviews.UserHistory], tokenizer, builder: prompts.PromptBuilder,
                 max_length: int | None = None):
        self.builder = builder
        self.row_of = {u.index: row for row, u in enumerate(users)}
        store = self.store = PieceStore()
        header, item, last, request, target = (array("i") for _ in range(5))
        starts = array("q", [0])
        max_reviews = 0
        history = builder.use_history
        for user in users:
            text = builder.header(user)
            header.append(store.add_text("header", text))
            for r in user.reviews:
                # A review far longer than max_length is cut before it is tokenised (text_tokens.cut_bound: only
                # its first max_length tokens can ever be used, as target or history line).
                if len(r.text) > (cut_bound(max_length) or len(r.text)):
                    r = dataclasses.replace(r, text=cut_text(r.text, max_length))
                target.append(store.add_text("text", r.text))
                request.append(store.add(("request", r.movie), builder.request, r.movie))
                if history:
                    item.append(store.add(("item", r.movie, r.text), _history_line, r))
                    last.append(store.add(("last", r.movie, r.text), _last_history_line, r))
            starts.append(starts[-1] + len(user.reviews))
            max_reviews = max(max_reviews, len(user.reviews))
        titles = array("i", [-1])  # no title for an empty history
        if history:
            titles.extend(store.add(("title", k), builder.history_title, k) for k in range(1, max_reviews))
        store.tokenize(tokenizer)

        def as_np(values: array) -> np.ndarray:
            return np.frombuffer(values, dtype=np.int32) if len(values) else np.zeros(0, dtype=np.int32)

        self.header, self.item, self.last = as_np(header), as_np(item), as_np(last)
        self.request, self.target, self.titles = as_np(request), as_np(target), as_np(titles)
        self.review_start = np.frombuffer(starts, dtype=np.int64)
        lengths = store.lengths.astype(np.int32)
        self.piece_lengths = lengths
        self.history_cumsum = np.zeros(len(target) + 1, dtype=np.int64)
        if history:
            np.cumsum(lengths[self.item], out=self.history_cumsum[1:])

    @property
    def index_nbytes(self) -> int:
        """Bytes of the per-review / per-user / per-piece index arrays (everything but the token store)."""
        arrays = (self.header, self.item, self.last, self.request, self.target, self.titles, self.review_start,
                  self.piece_lengths, self.history_cumsum)
        return sum(a.nbytes for a in arrays)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + self.index_nbytes


def _history_line(review: reviews.Review) -> str:
    return prompts.PromptBuilder.history_item(review, last=False)


def _last_history_line(review: reviews.Review) -> str:
    return prompts.PromptBuilder.history_item(review, last=True)


class ReviewDataset:
    """One split's samples, each assembled when asked: ``{"input_ids": [...], "labels": [...]}``.

    ``lengths[i]`` is the token count of sample ``i`` (prompt + target + EOS), known without assembling it.
    :meth:`encoded` gives the eager path's :class:`~data_loader_movie_review.EncodedSample` for one sample.
    """

    def __init__(self, samples: list[reviews.Sample], tokens: ReviewTokens, eos_token_id: int,
                 max_length: int | None, fmt: cf.ChatFormat | None = None):
        self.samples: list[reviews.Sample] | None = samples  # None after release_texts()
        # fmt: the spec prompt as one user turn of a chat template, the target closed by its end-of-turn.
        self.tokens, self.max_length = tokens, max_length
        self.eos = fmt.end_of_turn_id if fmt is not None else eos_token_id
        self.prefix, self.suffix = fmt.spec_framing() if fmt is not None else ([], [])
        layout = fmt.layout if fmt is not None else None
        self.framing = (layout.system_piece(None) + layout.user_prefix, layout.user_suffix) if layout else ("", "")
        rows = np.fromiter((tokens.row_of[s.user.index] for s in samples), dtype=np.int64, count=len(samples))
        positions = np.fromiter((s.position for s in samples), dtype=np.int64, count=len(samples))
        self.row = rows.astype(np.int32)  # user row of each sample (its header piece)
        self.review = tokens.review_start[rows] + positions  # global review index of each target
        self._plan(samples, rows, positions)

    # -- planning: all samples at once ---------------------------------------------------------------------
    def _plan(self, samples: list[reviews.Sample], rows: np.ndarray, positions: np.ndarray) -> None:
        t, g, lens = self.tokens, self.review, self.tokens.piece_lengths
        base = lens[t.header[rows]].astype(np.int64) + lens[t.request[g]] + len(self.prefix) + len(self.suffix)
        target = lens[t.target[g]].astype(np.int64)
        if self.max_length is not None:
            over = base + target + 1 > self.max_length
            room = self.max_length - base - 1
            too_small = np.nonzero(over & (room < 1))[0]
            if len(too_small):
                s = samples[too_small[0]]
                raise reviews.ReviewDataError(
                    f"--max_length {self.max_length}", f"too small: the prompt without history already needs "
                    f"{base[too_small[0]]} tokens for {s.target.movie!r}", s.user.index, s.user.name,
                    s.target.record_index, s.target.collection)
            target = np.where(over, room, target)
        n = positions if t.builder.use_history else np.zeros_like(positions)
        count = n.copy()
        if self.max_length is not None:
            count = self._history_count(n, self.max_length - base - target - 1)
        has = count > 0
        prompt = base.copy()
        k, gh = count[has], g[has]
        prompt[has] += (lens[t.titles[k]] + lens[t.last[gh - 1]] + t.history_cumsum[gh - 1]
                        - t.history_cumsum[gh - k])
        self.history_count = count.astype(np.int32)
        self.target_length = target.astype(np.int32)
        self.prompt_length = prompt.astype(np.int32)
        self.lengths = (prompt + target + 1).astype(np.int32)

    def _history_count(self, n: np.ndarray, available: np.ndarray) -> np.ndarray:
        """How many of the most recent history items fit in ``available`` tokens, for every sample at once.

        The cost of k items (title included) grows with k, so a binary search per sample finds the largest k
        that fits, run elementwise with numpy."""
        t, g, lens = self.tokens, self.review, self.tokens.piece_lengths
        lo, hi = np.zeros_like(n), n.copy()
        active = np.nonzero(lo < hi)[0]
        while len(active):
            a_lo, a_hi, a_g = lo[active], hi[active], g[active]
            mid = (a_lo + a_hi + 1) // 2
            cost = (lens[t.titles[mid]] + lens[t.last[a_g - 1]] + t.history_cumsum[a_g - 1]
                    - t.history_cumsum[a_g - mid])
            fits = cost <= available[active]
            lo[active] = np.where(fits, mid, a_lo)
            hi[active] = np.where(fits, a_hi, mid - 1)
            active = active[lo[active] < hi[active]]
        return lo

    # -- assembling one sample -----------------------------------------------------------------------------
    def _pieces(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Piece ids of sample ``i`` in prompt order (target last) and their lengths (target truncated)."""
        t, g, k, row = self.tokens, int(self.review[i]), int(self.history_count[i]), int(self.row[i])
        if k:
            pieces = np.concatenate(([t.header[row], t.titles[k]], t.item[g - k:g - 1],
                                     [t.last[g - 1], t.request[g], t.target[g]]))
        else:
            pieces = np.array([t.header[row], t.request[g], t.target[g]], dtype=np.int32)
        lengths = t.piece_lengths[pieces].astype(np.int64)
        lengths[-1] = self.target_length[i]
        return pieces, lengths

    def input_ids(self, i: int) -> list[int]:
        pieces, lengths = self._pieces(i)
        store = self.tokens.store
        # All pieces in one gather: output position j reads tokens[start of its piece + j - piece's out start].
        ends = np.cumsum(lengths)
        index = np.arange(ends[-1]) + np.repeat(store.offsets[pieces] - (ends - lengths), lengths)
        ids = store.tokens[index].tolist()
        if self.prefix or self.suffix:  # chat framing: prefix + prompt + suffix + target
            core = int(self.prompt_length[i]) - len(self.prefix) - len(self.suffix)
            ids = self.prefix + ids[:core] + self.suffix + ids[core:]
        ids.append(self.eos)
        return ids

    def __len__(self) -> int:
        return len(self.review)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        i = i % len(self)
        ids = self.input_ids(i)
        prompt = int(self.prompt_length[i])
        return {"input_ids": ids, "labels": [prompts.IGNORE_INDEX] * prompt + ids[prompt:]}

    def encoded(self, i: int) -> EncodedSample:
        """Sample ``i`` with what it came from (equal in every field to the eager oracle's)."""
        if self.samples is None:
            raise RuntimeError("release_texts() dropped the samples: only input_ids / labels remain")
        item = self[i]
        i = i % len(self)
        return EncodedSample(self.samples[i], item["input_ids"], item["labels"], int(self.prompt_length[i]),
                             int(self.history_count[i]), bool(self.truncated[i]), self.tokens.builder, self.framing)

    def encoded_samples(self) -> EncodedView:
        return EncodedView(self)

    def prompt_records(self) -> Iterator[PromptRecord]:
        """Each sample's :class:`PromptRecord`, in order, without assembling any ids; every user's history lines
        are folded once for all of their prompts (a user's test samples share almost all of their history)."""
        if self.samples is None:
            raise RuntimeError("release_texts() dropped the samples: only input_ids / labels remain")
        builder, lines_of = self.tokens.builder, {}
        truncated = self.truncated
        for i, s in enumerate(self.samples):
            lines = lines_of.get(s.user.index)
            if lines is None and builder.use_history:
                lines_of.clear()  # samples come user by user: keep one user's lines at a time
                lines = lines_of[s.user.index] = builder.history_lines(s.user)
            count = int(self.history_count[i])
            prompt = self.framing[0] + builder.render(s, count, lines) + self.framing[1]
            yield PromptRecord(s, prompt, int(self.prompt_length[i]), count, bool(truncated[i]))

    def release_texts(self) -> None:
        """Forget the Sample objects (and through them the review texts): training needs only the arrays."""
        self.samples = None

    @property
    def num_reviews(self) -> int:
        return len(self)

    def labelled_tokens(self) -> int:
        """Labelled tokens of one epoch: every target (as cut to fit) + its EOS / end-of-turn."""
        return int(self.target_length.astype(np.int64).sum()) + len(self)

    def preview_text(self, count: int) -> str:
        return prompts.preview_text(self.encoded_samples()[:count], len(self))

    @property
    def truncated(self) -> np.ndarray:
        return self.target_length < self.tokens.piece_lengths[self.tokens.target[self.review]]

    @property
    def truncated_targets(self) -> int:
        return int(self.truncated.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of this split's own per-sample arrays (the shared :class:`ReviewTokens` not included)."""
        return sum(a.nbytes for a in (self.row, self.review, self.history_count, self.target_length,
                                      self.prompt_length, self.lengths))
