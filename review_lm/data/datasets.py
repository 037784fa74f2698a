"""The two dataset kinds behind one door: ``build_datasets`` picks the spec samples (``spec_dataset``) or one
conversation per user (``conversation_dataset``); ``prepare_data`` is a training run's data (texts, datasets and
their facts); ``encode_new_review`` is generation's prompt for a new film, assembled as training assembles it.
Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from review_lm.data import chat_layout as cf
from review_lm.data import prompts, reviews
from review_lm.data.conversation_dataset import build_conversation_datasets, new_review_prompt
from review_lm.data.pieces import EncodedView
from review_lm.data.spec_dataset import PROMPT_CHECK_SAMPLES, EncodedSample, ReviewDataset, ReviewTokens
from review_lm.data.splitting import new_review_sample
from review_lm.utils import UsageError


def chat_format_for(tokenizer, chat_template: str) -> cf.ChatFormat | None:
    """The chat format a run's recorded ``chat_template`` (``chat_layout.RECORDED_TEMPLATES``) names; None: none."""
    if chat_template == cf.TEMPLATE_NONE:
        return None
    if chat_template == cf.TEMPLATE_TOKENIZER:
        if not tokenizer.chat_template:
            raise cf.ChatFormatError("the run used the tokenizer's chat template, but this tokenizer has none")
        return cf.ChatFormat(tokenizer, "auto")
    if chat_template == cf.TEMPLATE_BUILTIN:
        return cf.ChatFormat(tokenizer, "none")
    names = f"{', '.join(cf.RECORDED_TEMPLATES[:-1])} or {cf.RECORDED_TEMPLATES[-1]}"
    raise cf.ChatFormatError(f"unknown chat_template {chat_template!r} ({names})")


def build_datasets(splits: dict[str, list[reviews.Sample]], tokenizer, max_length: int | None,
                   builder: prompts.PromptBuilder | None = None, fmt: cf.ChatFormat | None = None,
                   prompt_format: str = "spec") -> dict[str, Any]:
    """One dataset per split. spec: :class:`ReviewDataset` sharing one :class:`ReviewTokens` of all users (with
    ``fmt``: the spec prompt as one user turn of that chat format); conversation:
    ``conversation_dataset.ConversationDataset`` windows of one conversation per user (``fmt`` required)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    builder = builder or prompts.PromptBuilder()
    if prompt_format == "conversation":
        return build_conversation_datasets(splits, tokenizer, max_length, builder, fmt)
    users: dict[int, reviews.UserHistory] = {}
    for samples in splits.values():
        for s in samples:
            if s.user.index not in users:
                users[s.user.index] = s.user
    tokens = ReviewTokens(list(users.values()), tokenizer, builder, max_length)
    return {name: ReviewDataset(samples, tokens, tokenizer.eos_token_id, max_length, fmt)
            for name, samples in splits.items()}


def prompt_text_mismatches(tokenizer, encoded: Sequence[EncodedSample]) -> int:
    """How many samples' prompt ids differ from ``tokenizer(prompt)``.

    Zero for Qwen-style BPE tokenizers; a tokenizer whose pre-tokenisation crosses newlines may differ, and
    then generation from the prompt *text* (evaluation) sees slightly different ids than training did.
    """
    return sum(tokenizer(e.prompt, add_special_tokens=False)["input_ids"] != e.input_ids[:e.prompt_length]
               for e in encoded)


@dataclass
class PreparedData:
    """A training run's data: the texts (rank 0 writes the data files from them) and each split's dataset."""

    data: reviews.ReviewData | None  # None after release_texts()
    splits: dict[str, list[reviews.Sample]]
    datasets: dict[str, Any]  # ReviewDataset / ConversationDataset: compact token pieces, assembled when read
    truncated_targets: int
    text_mismatches: int = 0  # prompts whose text tokenizes differently than their assembled ids ...
    text_checked: int = 0  # ... of the first this many training and test prompts
    prompt_format: str = "spec"
    chat_template: str = "none"  # the template used (chat_layout.RECORDED_TEMPLATES)
    template_source: str | None = None  # the chat format's layout, in words

    def epoch_facts(self, steps_per_epoch: int) -> dict[str, Any]:
        """What one training epoch costs: sequences, reviews, tokens, labelled tokens, reviews per step."""
        train = self.datasets["train"]
        return {"train_sequences": len(train), "train_reviews": train.num_reviews,
                "tokens_per_epoch": int(np.asarray(train.lengths, dtype=np.int64).sum()),
                "labelled_tokens_per_epoch": train.labelled_tokens(),
                "optimizer_steps_per_epoch": steps_per_epoch,
                "reviews_per_optimizer_step": round(train.num_reviews / max(1, steps_per_epoch), 2)}

    def data_facts(self, steps_per_epoch: int) -> dict[str, Any]:
        """The format and what one epoch costs, as the start summary prints and training_config.json records
        them (``resolved``)."""
        return {"prompt_format": self.prompt_format, "chat_template": self.chat_template,
                "chat_template_source": self.template_source, "epoch": self.epoch_facts(steps_per_epoch)}

    def release_texts(self) -> None:
        """Keep only the compact token arrays (ranks that write no text files need nothing else)."""
        self.data, self.splits = None, {}
        for ds in self.datasets.values():
            ds.release_texts()

    def encoded(self, split: str) -> EncodedView:
        """The split's samples as EncodedSample (assembled on access, never all held)."""
        return self.datasets[split].encoded_samples()

    def size(self, split: str) -> int:
        return len(self.datasets[split])


def prepare_data(data: reviews.ReviewData, splits: dict[str, list[reviews.Sample]], tokenizer, max_length: int | None,
                 builder: prompts.PromptBuilder, prompt_format: str = "spec", chat_template: str = "none"
                 ) -> PreparedData:
    """Token pieces for every split. Every torchrun rank runs this itself (cheap and deterministic; see the
    module docstring for why not rank 0 + a cache). ``chat_template``: ``plan.resolve_chat_template``'s."""
    try:
        fmt = chat_format_for(tokenizer, chat_template)
        datasets = build_datasets(splits, tokenizer, max_length, builder, fmt, prompt_format)
    except cf.ChatFormatError as err:  # a template that cannot be rendered turn by turn: the user's flag
        raise UsageError(f"--chat_template: {err}") from None
    checked = []  # evaluation generates from the test prompts' text: their ids must be the assembled ones
    for name in ("train", "test") if prompt_format == "conversation" or fmt is not None else ("train",):
        view = datasets[name].encoded_samples()
        checked += [view[i] for i in range(min(PROMPT_CHECK_SAMPLES, len(view)))]
    return PreparedData(data, splits, datasets, sum(ds.truncated_targets for ds in datasets.values()),
                        prompt_text_mismatches(tokenizer, checked), len(checked), prompt_format, chat_template,
                        fmt.layout.source if fmt is not None else None)


def encode_new_review(tokenizer, user: reviews.UserHistory, movie: str, builder: prompts.PromptBuilder,
                      max_length: int | None, max_new_tokens: int, prompt_format: str = "spec",
                      chat_template: str = "none"):
    """Prompt text and ids for a new review of ``movie``: ``enc.prompt`` and ``enc.input_ids[:enc.prompt_length]``.

    Budget: prompt + ``max_new_tokens`` <= ``max_length`` (the run's --max_length with room kept for the
    review), the most recent history that fits is kept, exactly as in training. The budget holds prompt +
    target + EOS; with an empty target, a budget of ``max_length - max_new_tokens + 1`` leaves the prompt
    ``max_length - max_new_tokens`` tokens. ``max_length=None``: the whole history. ``prompt_format`` /
    ``chat_template``: the run's (``run_folder.RunRecord``); a conversation run's prompt is its generation
    prompt after the user's turns (``conversation_dataset.new_review_prompt``).
    """
    fmt = chat_format_for(tokenizer, chat_template)
    if prompt_format == "conversation":
        return new_review_prompt(fmt, user, movie, builder, max_length, max_new_tokens)
    budget = None if max_length is None else max_length - max_new_tokens + 1
    try:
        datasets = build_datasets({"new": [new_review_sample(user, movie)]}, tokenizer, budget, builder, fmt)
    except reviews.ReviewDataError:  # the message would name the reduced budget: say it in the user's terms
        raise reviews.ReviewDataError(f"--max_length {max_length}", f"leaves no room for the prompt for {movie!r} "
                                 f"(even without history) plus --max_new_tokens {max_new_tokens}",
                                 user.index, user.name) from None
    return datasets["new"].encoded(0)
