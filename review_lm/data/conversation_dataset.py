"""--prompt_format conversation: one sequence per user and split (windows of it when it is too long).

The spec's samples repeat a user's whole earlier history in every sample (O(N^2) tokens per user); here each
user's reviews are the turns of ONE conversation (``review_lm.data.chat_layout``: system turn = the loader's profile +
task text, per review a user turn = the loader's request text and the review as the assistant answer), and a
split's dataset item is a *window* of that conversation whose labels cover exactly that split's reviews (+ each
review's end-of-turn). Earlier reviews of any split are context, never labelled: a validation review sees the
user's train reviews before it, a test review the train and validation ones.

Storage is the size of the data, as for the spec format (``review_lm.data.spec_dataset``): every text piece (a
user's system piece, a film's request piece, a review text) is tokenized once into a
:class:`~review_lm.data.pieces.PieceStore`;
per window only a few integers are kept (user row, first / end turn, its labelled turns, its length).
``dataset[i]`` gathers the window's pieces and hands them to :func:`review_lm.data.windows.encode_window`, the one
place that assembles conversation ids and labels. Windows come from :func:`review_lm.data.windows.plan_windows`
(every labelled review labelled exactly once per epoch; context >= min(every earlier review, half the budget)).

``--no_history``: every review alone in its own sequence (system turn + its request + the review).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from review_lm.data import chat_layout as cf
from review_lm.data import windows as wn
from review_lm.data.pieces import EncodedView, PieceStore, PromptRecord
from review_lm.data.prompts import IGNORE_INDEX, PromptBuilder, conversation_preview_text
from review_lm.data.reviews import ReviewDataError, Sample, UserHistory
from review_lm.data.splitting import new_review_sample
from review_lm.data.text_tokens import cut_text


@dataclass
class ConversationSample:
    """One review as a sample record sees it (same fields as ``dataset.EncodedSample``): ``prompt`` is the
    generation prompt text (system + the window's earlier turns + request + assistant header), whose ids are
    ``input_ids[:prompt_length]``; ``input_ids`` continue with the review + end-of-turn."""

    sample: Sample
    input_ids: list[int]
    labels: list[int]
    prompt: str
    prompt_length: int
    history_count: int  # earlier turns in the prompt
    target_truncated: bool


@dataclass
class WindowPreview:
    """What the preview shows of one training window (see ``conversation_preview_text``)."""

    user: UserHistory
    turns: tuple[int, int]
    reviews: int
    length: int
    labelled_tokens: int
    truncated: bool
    segments: list[tuple[str, bool]] = field(default_factory=list)


class ConversationPieces:
    """Every user's conversation pieces for one builder and chat format, tokenized once.

    Reviews are numbered globally, user after user (chronological within a user): review ``g`` of user row
    ``r`` is ``review_start[r] + position``. ``system[r]``, ``request[g]``, ``answer[g]`` are piece ids.
    """

    def __init__(self, users: Sequence[UserHistory], tokenizer, builder: PromptBuilder, fmt: cf.ChatFormat,
                 max_length: int | None = None):
        self.builder, self.fmt, self.tokenizer = builder, fmt, tokenizer
        self.users = list(users)
        self.row_of = {u.index: row for row, u in enumerate(users)}
        layout = fmt.layout
        store = self.store = PieceStore()
        system, request, answer = array("i"), array("i"), array("i")
        starts = array("q", [0])
        for user in users:
            # Segments, not the joined text: the data's texts inside never become special tokens (text_tokens).
            text = layout.system_segments(builder.system_text(user))
            system.append(store.add_text("system", text))
            for r in user.reviews:
                piece = layout.request_segments(builder.request_text(r.movie))
                request.append(store.add_text("request", piece))
                # cut_text: a review far longer than max_length, cut before it is tokenised (text_tokens).
                answer.append(store.add_text("text", cut_text(r.text, max_length)))
            starts.append(starts[-1] + len(user.reviews))
        store.tokenize(tokenizer)
        self.system, self.request, self.answer = (np.frombuffer(a, dtype=np.int32) if len(a)
                                                  else np.zeros(0, dtype=np.int32) for a in (system, request, answer))
        self.review_start = np.frombuffer(starts, dtype=np.int64)
        self.lengths = store.lengths.astype(np.int64)
        self.separator = list(fmt.separator_ids)

    def system_length(self, row: int) -> int:
        return int(self.lengths[self.system[row]])

    def turn_lengths(self, row: int) -> np.ndarray:
        """Tokens of each turn of user ``row``: request + review + end-of-turn."""
        g = slice(int(self.review_start[row]), int(self.review_start[row + 1]))
        return self.lengths[self.request[g]] + self.lengths[self.answer[g]] + 1

    def min_turn_lengths(self, row: int) -> np.ndarray:
        g = slice(int(self.review_start[row]), int(self.review_start[row + 1]))
        return self.lengths[self.request[g]] + np.minimum(2, self.lengths[self.answer[g]] + 1)

    def tokens(self, row: int, start: int, end: int) -> cf.ConversationTokens:
        """The pieces of turns [start, end) of user ``row`` (turn 0 of the result = turn ``start``)."""
        g0 = int(self.review_start[row])
        ids = self.store.ids
        eot = self.fmt.end_of_turn_id
        return cf.ConversationTokens(
            ids(int(self.system[row])).tolist(), list(self.separator),
            [ids(int(self.request[g0 + i])).tolist() for i in range(start, end)],
            [ids(int(self.answer[g0 + i])).tolist() + [eot] for i in range(start, end)], eot)


class ConversationDataset:
    """One split: its windows as items (``{"input_ids", "labels"}``), its reviews as sample records.

    ``lengths[i]``: tokens of window ``i`` (known without assembling it). ``encoded(k)``: review ``k`` of the
    split (in the split's sample order) as a :class:`ConversationSample`.
    """

    def __init__(self, samples: list[Sample], pieces: ConversationPieces, max_length: int | None):
        self.samples: list[Sample] | None = samples
        self.pieces, self.max_length = pieces, max_length
        by_row: dict[int, list[int]] = {}
        for s in samples:
            by_row.setdefault(pieces.row_of[s.user.index], []).append(s.position)
        rows, starts, ends, lengths, truncated, labelled, offsets = ([] for _ in range(7))
        offsets.append(0)
        where: dict[tuple[int, int], int] = {}  # (row, position) -> window
        for row, positions in by_row.items():
            for w in self._plan(row, sorted(positions)):
                for j in w.labelled:
                    where[(row, j)] = len(rows)
                rows.append(row)
                starts.append(w.start)
                ends.append(w.end)
                lengths.append(w.length)
                truncated.append(w.truncated)
                labelled.extend(w.labelled)
                offsets.append(len(labelled))
        self.row, self.start, self.end = (np.array(a, dtype=np.int32) for a in (rows, starts, ends))
        self.lengths = np.array(lengths, dtype=np.int32)
        self.truncated_windows = np.array(truncated, dtype=bool)
        self.labelled = np.array(labelled, dtype=np.int32)
        self.labelled_offsets = np.array(offsets, dtype=np.int64)
        self.review_window = np.fromiter((where[(pieces.row_of[s.user.index], s.position)] for s in samples),
                                         dtype=np.int32, count=len(samples))

    def _plan(self, row: int, positions: list[int]) -> list[wn.Window]:
        p = self.pieces
        user = p.users[row]
        turn_lengths = p.turn_lengths(row)
        least, system, sep = p.min_turn_lengths(row), p.system_length(row), len(p.separator)
        try:
            if not p.builder.use_history:  # each review alone
                return [_shift(w, j) for j in positions
                        for w in _windows([int(turn_lengths[j])], system, [0], self.max_length, sep, [int(least[j])])]
            return _windows(turn_lengths.tolist(), system, positions, self.max_length, sep, least.tolist())
        except cf.ChatFormatError as err:
            raise ReviewDataError(f"--max_length {self.max_length}", f"too small for the conversation: {err}",
                                     user.index, user.name) from None

    # -- items --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lengths)

    def window(self, i: int) -> wn.Window:
        labelled = self.labelled[self.labelled_offsets[i]:self.labelled_offsets[i + 1]]
        return wn.Window(int(self.start[i]), int(self.end[i]), tuple(int(j) for j in labelled),
                         int(self.lengths[i]), bool(self.truncated_windows[i]))

    def encode(self, i: int) -> cf.EncodedWindow:
        """Window ``i`` assembled by ``review_lm.data.windows.encode_window`` (its turns renumbered from 0)."""
        w = self.window(i)
        tokens = self.pieces.tokens(int(self.row[i]), w.start, w.end)
        local = wn.Window(0, w.end - w.start, tuple(j - w.start for j in w.labelled), w.length, w.truncated)
        return wn.encode_window(tokens, local, self.max_length)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        enc = self.encode(i % len(self))
        return {"input_ids": enc.input_ids, "labels": enc.labels}

    # -- reviews (sample records) -------------------------------------------------------------------------------
    @property
    def num_reviews(self) -> int:
        return len(self.labelled)

    def encoded(self, k: int) -> ConversationSample:
        """Review ``k`` of the split: its generation prompt is its window up to its answer."""
        if self.samples is None:
            raise RuntimeError("release_texts() dropped the samples: only input_ids / labels remain")
        sample = self.samples[k]
        i = int(self.review_window[k])
        w, enc = self.window(i), self.encode(i)
        at = sample.position - w.start
        begin, stop = enc.answer_spans[at]
        builder = self.pieces.builder
        earlier = builder.turns(sample.user.reviews[w.start:sample.position])
        prompt = self.pieces.fmt.layout.generation_text(builder.system_text(sample.user), earlier,
                                                        builder.request_text(sample.target.movie))
        return ConversationSample(sample, enc.input_ids[:stop], enc.labels[:stop], prompt, begin, at, w.truncated)

    def prompt_records(self) -> Iterator[PromptRecord]:
        """Every review's record (test_samples.json), in the split's order: what :meth:`encoded` gives, with the
        prompt length summed from the pieces' lengths instead of assembling the review's window."""
        if self.samples is None:
            raise RuntimeError("release_texts() dropped the samples: only input_ids / labels remain")
        p, builder, sep = self.pieces, self.pieces.builder, len(self.pieces.separator)
        for k, sample in enumerate(self.samples):
            i = int(self.review_window[k])
            row, start = int(self.row[i]), int(self.start[i])
            g0 = int(p.review_start[row])
            earlier = sample.position - start
            # system + each earlier turn of the window (request + review + end-of-turn) + separators + request
            length = (p.system_length(row) + int(p.turn_lengths(row)[start:sample.position].sum()) + sep * earlier
                      + int(p.lengths[p.request[g0 + sample.position]]))
            prompt = p.fmt.layout.generation_text(builder.system_text(sample.user),
                                                  builder.turns(sample.user.reviews[start:sample.position]),
                                                  builder.request_text(sample.target.movie))
            yield PromptRecord(sample, prompt, length, earlier, bool(self.truncated_windows[i]))

    def encoded_samples(self) -> EncodedView:
        return EncodedView(self)

    def release_texts(self) -> None:
        self.samples = None

    # -- facts ----------------------------------------------------------------------------------------------------
    def labelled_tokens(self) -> int:
        """Labelled tokens of one epoch (reviews + end-of-turn; a cut review counts what is left of it)."""
        p, total = self.pieces, 0
        for i in range(len(self)):
            row, w = int(self.row[i]), self.window(i)
            if w.truncated:
                g = int(p.review_start[row]) + w.start
                total += w.length - p.system_length(row) - int(p.lengths[p.request[g]])
            else:
                g = int(p.review_start[row]) + np.asarray(w.labelled, dtype=np.int64)
                total += int((p.lengths[p.answer[g]] + 1).sum())
        return total

    @property
    def truncated_targets(self) -> int:
        return int(self.truncated_windows.sum())

    def preview(self, i: int) -> WindowPreview:
        """Window ``i`` for training_samples_preview.txt: decoded runs of unlabelled / labelled ids."""
        enc, w = self.encode(i), self.window(i)
        tok = self.pieces.tokenizer
        segments: list[tuple[str, bool]] = []
        run_start = 0
        flags = [label != IGNORE_INDEX for label in enc.labels]
        for j in range(1, len(flags) + 1):
            if j == len(flags) or flags[j] != flags[run_start]:
                segments.append((tok.decode(enc.input_ids[run_start:j], skip_special_tokens=False),
                                 flags[run_start]))
                run_start = j
        return WindowPreview(self.pieces.users[int(self.row[i])], (w.start, w.end), len(w.labelled), w.length,
                             sum(flags), w.truncated, segments)

    def preview_text(self, count: int) -> str:
        return conversation_preview_text([self.preview(i) for i in range(min(count, len(self)))], len(self))


def _windows(turn_lengths, system, labelled, max_length, sep, least) -> list[wn.Window]:
    if max_length is None:  # everything in one window, up to the last labelled turn
        last = max(labelled) + 1
        length = system + sum(turn_lengths[:last]) + sep * (last - 1)
        return [wn.Window(0, last, tuple(labelled), length)]
    return wn.plan_windows(turn_lengths, system, labelled, max_length, sep, least)


def _shift(w: wn.Window, by: int) -> wn.Window:
    return wn.Window(w.start + by, w.end + by, tuple(j + by for j in w.labelled), w.length, w.truncated)


def build_conversation_datasets(splits: dict[str, list[Sample]], tokenizer, max_length: int | None,
                                builder: PromptBuilder, fmt: cf.ChatFormat) -> dict[str, ConversationDataset]:
    """One :class:`ConversationDataset` per split, sharing one :class:`ConversationPieces` of all users."""
    users: dict[int, UserHistory] = {}
    for samples in splits.values():
        for s in samples:
            users.setdefault(s.user.index, s.user)
    pieces = ConversationPieces(list(users.values()), tokenizer, builder, fmt, max_length)
    return {name: ConversationDataset(samples, pieces, max_length) for name, samples in splits.items()}


def new_review_prompt(fmt: cf.ChatFormat, user: UserHistory, movie: str, builder: PromptBuilder,
                      max_length: int | None, max_new_tokens: int) -> ConversationSample:
    """The generation prompt for a new review of ``movie`` after the user's whole history (the most recent turns
    that fit with ``max_new_tokens`` in ``max_length``): the same pieces as the training windows."""
    earlier = [(request, cut_text(review, max_length))  # as in training: a huge review is cut before tokenising
               for request, review in (builder.turns(user.reviews) if builder.use_history else [])]
    try:
        gp = fmt.generation_prompt(builder.system_text(user), earlier, builder.request_text(movie), max_length,
                                   max_new_tokens)
    except cf.ChatFormatError:
        raise ReviewDataError(f"--max_length {max_length}", f"leaves no room for the prompt for {movie!r} "
                                 f"(even without history) plus --max_new_tokens {max_new_tokens}",
                                 user.index, user.name) from None
    n = len(gp.input_ids)
    return ConversationSample(new_review_sample(user, movie), gp.input_ids, [IGNORE_INDEX] * n, gp.text, n,
                              gp.turns_kept, False)
