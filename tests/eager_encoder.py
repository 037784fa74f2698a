"""The eager encoder: every sample's ids built directly from the prompt pieces, one sample at a time.

Production uses the lazy ``review_lm.data.spec_dataset`` (pieces stored once, samples assembled on demand). This is the
plain computation it replaces, kept only as the tests' oracle: ``tests/test_review_dataset.py`` checks that both
give the same ids, labels, history counts and truncation for every sample.
"""

from __future__ import annotations

import data_loader_movie_review as dl
from data_loader_movie_review import IGNORE_INDEX, PromptBuilder, ReviewDataError, Sample
from review_lm.data.spec_dataset import EncodedSample

__all__ = ["SampleTokenizer", "dl"]


class SampleTokenizer:
    """Turns samples into ``input_ids`` / ``labels`` under a token budget.

    ``input_ids = prompt + target + [EOS]``; ``labels`` are -100 on the prompt and equal to the ids on the
    target and EOS. Labels come from spans, never from masking pad ids, so EOS stays labelled when the pad id
    equals the EOS id (Qwen2.5 base).

    Budget: the most recent history items that fit in ``max_length`` are kept ("(N条)" shows how many);
    the target is never dropped, only truncated if it alone does not fit.

    Cost: each review is tokenized once (plus once more as the last history item, whose piece carries the
    blank line) and every user's samples are assembled from those cached pieces. Re-tokenizing the rendered
    prompt for each sample would cost O(n^2) tokenizer work per user, since a user's n-th sample repeats all
    n-1 earlier reviews; users with thousands of reviews are normal. Prefix sums over the piece lengths find
    how many history items fit with one binary search per sample. Because piece boundaries sit just after a
    newline (see ``PromptBuilder``), the assembled ids equal ``tokenizer(prompt)`` for BPE tokenizers with
    GPT-2/Qwen-style pre-tokenisation; the tests check this on the example data with the real Qwen vocabulary.
    """

    def __init__(self, tokenizer, max_length: int | None, builder: PromptBuilder = PromptBuilder()):  # noqa: B008 - frozen
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
        self.tokenizer, self.max_length, self.builder = tokenizer, max_length, builder
        self._cache: dict[str, list[int]] = {}
        self.truncated_targets = 0

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = ids
        return ids

    def encode_split(self, samples: list[Sample]) -> list[EncodedSample]:
        by_user: dict[int, list[Sample]] = {}
        for s in samples:
            by_user.setdefault(s.user.index, []).append(s)
        encoded: dict[tuple[int, int], EncodedSample] = {}
        for user_samples in by_user.values():
            for enc in self._encode_user(user_samples):
                encoded[(enc.sample.user.index, enc.sample.position)] = enc
        return [encoded[(s.user.index, s.position)] for s in samples]

    def encode(self, sample: Sample) -> EncodedSample:
        return self.encode_split([sample])[0]

    def count_text_mismatches(self, encoded: list[EncodedSample], limit: int = 32) -> int:
        """How many of the first ``limit`` samples' prompt ids differ from ``tokenizer(prompt)``.

        Zero for Qwen-style BPE tokenizers; a tokenizer whose pre-tokenisation crosses newlines may differ, and
        then generation from the prompt *text* (evaluation) sees slightly different ids than training did.
        """
        return sum(
            self.tokenizer(e.prompt, add_special_tokens=False)["input_ids"] != e.input_ids[: e.prompt_length]
            for e in encoded[:limit]
        )

    def _encode_user(self, samples: list[Sample]) -> list[EncodedSample]:
        user = samples[0].user
        reviews = user.reviews
        # Lengths of each review as a non-last history item, prefix-summed once per user.
        lengths = [0]
        if self.builder.use_history:
            upto = max(s.position for s in samples)
            for r in reviews[:upto]:
                lengths.append(lengths[-1] + len(self._ids(self.builder.history_item(r, last=False))))
        header = self._ids(self.builder.header(user))
        out = []
        for s in samples:
            out.append(self._encode_one(s, header, lengths))
        return out

    def _encode_one(self, s: Sample, header: list[int], lengths: list[int]) -> EncodedSample:
        eos = self.tokenizer.eos_token_id
        request = self._ids(self.builder.request(s.target.movie))
        target = self._ids(s.target.text)
        base = len(header) + len(request)
        truncated = False
        if self.max_length is not None and base + len(target) + 1 > self.max_length:
            room = self.max_length - base - 1
            if room < 1:
                raise ReviewDataError(
                    f"--max_length {self.max_length}", f"too small: the prompt without history already needs "
                    f"{base} tokens for {s.target.movie!r}", s.user.index, s.user.name, s.target.record_index)
            target, truncated = target[:room], True
            self.truncated_targets += 1
        available = None if self.max_length is None else self.max_length - base - len(target) - 1
        count = self._history_count(s, lengths, available)
        ids = list(header)
        if count:
            ids += self._ids(self.builder.history_title(count))
            first = s.position - count
            for j in range(first, s.position):
                ids += self._ids(self.builder.history_item(s.user.reviews[j], last=j == s.position - 1))
        ids += request
        prompt_length = len(ids)
        ids += target + [eos]
        labels = [IGNORE_INDEX] * prompt_length + target + [eos]
        return EncodedSample(s, ids, labels, prompt_length, count, truncated, self.builder)

    def _history_count(self, s: Sample, lengths: list[int], available: int | None) -> int:
        """How many of the most recent history items fit in ``available`` tokens."""
        n = s.position if self.builder.use_history else 0
        if n == 0 or available is None:
            return n
        last = s.user.reviews[n - 1]
        last_len = len(self._ids(self.builder.history_item(last, last=True)))

        def cost(k: int) -> int:  # tokens for the k most recent items, title included
            return (len(self._ids(self.builder.history_title(k))) + last_len
                    + lengths[n - 1] - lengths[n - k])

        # cost(k) grows with k, so binary search for the largest k that fits.
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= available:
                lo = mid
            else:
                hi = mid - 1
        return lo
