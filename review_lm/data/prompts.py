"""Every prompt text and file format of a sample: the history prompt (the spec's "模型输入格式"), the turns of the
conversation format, test_samples.json records, test_histories.json and the training-sample previews.

The single source of truth for the model's input: the token ids are assembled from these pieces by
``review_lm.data.spec_dataset`` and ``review_lm.data.conversation_dataset``. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from review_lm.data.reviews import Review, Sample, UserHistory

PROMPT_FORMATS = ("spec", "conversation")  # --prompt_format: one sample per review, or one conversation per user
# The spec's task description (the 任务 line): what importers write into new review files.
TASK_DESCRIPTION = "基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式"
IGNORE_INDEX = -100  # label value that the loss ignores (transformers / PyTorch convention); the one definition


# --------------------------------------------------------------------------------------------------------------
# The prompt (spec: "模型输入格式")
# --------------------------------------------------------------------------------------------------------------
def history_line(review: Review) -> str:
    """One history item, on one line: inner newlines and runs of whitespace are folded to single spaces."""
    return f"  电影《{review.movie}》: {' '.join(review.text.split())}"


@dataclass(frozen=True)
class PromptBuilder:
    """Renders the model input. The prompt ends with a newline; the target review follows it directly::

        用户: Y
        任务: 基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式

        历史影评记录 (19条):
          电影《钢铁侠1》: boring
          ...

        请为电影《美人鱼》写一条影评：
    """

    use_profile: bool = True
    use_history: bool = True

    # The prompt is assembled from these pieces (and the datasets tokenize the same pieces), so text and
    # token ids cannot drift apart. Piece boundaries sit right after a newline and never between two
    # newlines, because BPE pre-tokenisation merges "\n\n" (and punctuation + "\n") into one token.
    def header(self, user: UserHistory) -> str:
        profile = f"用户: {user.name}\n" if self.use_profile else ""
        return f"{profile}任务: {user.description}\n\n"

    @staticmethod
    def history_title(count: int) -> str:
        return f"历史影评记录 ({count}条):\n"

    @staticmethod
    def history_item(review: Review, last: bool) -> str:
        # The blank line after the history block belongs to its last item (see the note above).
        return history_line(review) + ("\n\n" if last else "\n")

    @staticmethod
    def request(movie: str) -> str:
        return f"请为电影《{movie}》写一条影评：\n"

    def render(self, sample: Sample, history_count: int | None = None, lines: Sequence[str] | None = None) -> str:
        """The prompt for ``sample``, with the most recent ``history_count`` earlier reviews (default: all).

        ``lines``: the user's :meth:`history_lines`, when many prompts of one user are rendered (each line is
        folded once instead of once per prompt holding it); the text is the same."""
        history = self.kept_history(sample, history_count)
        parts = [self.header(sample.user)]
        if history:
            parts.append(self.history_title(len(history)))
            if lines is None:
                parts.extend(self.history_item(r, i == len(history) - 1) for i, r in enumerate(history))
            else:  # history_item(r, last) is history_line(r) + "\n", and one more "\n" after the last one
                parts.append("\n".join(lines[sample.position - len(history):sample.position]) + "\n\n")
        parts.append(self.request(sample.target.movie))
        return "".join(parts)

    @staticmethod
    def history_lines(user: UserHistory) -> list[str]:
        """Every review of ``user`` as its history line (no newline), for :meth:`render`'s ``lines``."""
        return [history_line(r) for r in user.reviews]

    # -- the conversation format (--prompt_format conversation): the same texts as chat turns ---------------------
    # review_lm.data.chat_layout frames them (system turn, user turns, assistant answers); no trailing newlines, the
    # framing supplies the line breaks.
    def system_text(self, user: UserHistory) -> str:
        """The system turn: "用户: NAME\n任务: DESC" (profile on) or "任务: DESC" (--no_profile)."""
        return self.header(user).rstrip("\n")

    @staticmethod
    def request_text(movie: str) -> str:
        """A user turn: "请为电影《MOVIE》写一条影评：" (the spec's request line without its newline)."""
        return PromptBuilder.request(movie).rstrip("\n")

    def turns(self, reviews: Sequence[Review]) -> list[tuple[str, str]]:
        """(request text, review text) per review, in the given (chronological) order."""
        return [(self.request_text(r.movie), r.text) for r in reviews]

    def kept_history(self, sample: Sample, history_count: int | None = None) -> list[Review]:
        if not self.use_history:
            return []
        history = sample.history
        if history_count is not None:
            history = history[len(history) - history_count:] if history_count > 0 else []
        return history


def sample_record(enc) -> dict[str, Any]:
    """The JSON form of an encoded sample, as written to ``test_samples.json`` and read by evaluation.

    ``prompt`` is exactly the text whose tokens the model saw (``tokenizer(prompt, add_special_tokens=False)``
    gives ``input_ids[:prompt_length]``). The user's earlier review texts are not repeated here (they would make
    the file grow with the square of the history): ``position`` is how many reviews the user wrote before this
    one, and :func:`test_histories` stores each user's reviews once, so that evaluation can read this sample's
    earlier reviews (the same for every ablation, whatever the prompt kept) as ``reviews[:position]``.
    """
    s = enc.sample
    record = {
        "user": s.user.name,
        "user_index": s.user.index,
        "record_index": s.target.record_index,
        "movie": s.target.movie,
        "timestamp": s.target.timestamp,
        "split": s.split,
        "prompt": enc.prompt,
        "reference": s.target.text,
        "history_count": enc.history_count,
        "prompt_tokens": enc.prompt_length,
        "target_truncated": enc.target_truncated,
        "position": s.position,
    }
    if s.target.collection is not None:  # several movie_review collections: where the review is in the file
        record["collection"], record["collection_record"] = s.target.collection
    return record


TEST_HISTORIES_FORMAT = "test_histories/1"


def test_histories(samples: Sequence[Sample]) -> dict[str, Any]:
    """The JSON form of test_histories.json: per user of ``samples``, their review texts (oldest first) up to
    their last test sample, stored once; ``test_start`` is the position of the user's first test sample, so
    ``reviews[:test_start]`` are the reviews written before the test split."""
    users: dict[int, dict[str, Any]] = {}
    for s in samples:
        entry = users.get(s.user.index)
        if entry is None:
            entry = users[s.user.index] = {"user_index": s.user.index, "user": s.user.name, "test_start": s.position,
                                           "end": s.position, "reviews": s.user.reviews}
        entry["test_start"] = min(entry["test_start"], s.position)
        entry["end"] = max(entry["end"], s.position)
    return {"format": TEST_HISTORIES_FORMAT, "users": [
        {"user_index": u["user_index"], "user": u["user"], "test_start": u["test_start"],
         "reviews": [r.text for r in u.pop("reviews")[:u["end"]]]} for u in users.values()]}


def preview_text(encoded: Sequence, total: int) -> str:
    """training_samples_preview.txt: the first encoded training samples as the model sees them."""
    blocks = []
    for i, enc in enumerate(encoded, 1):
        s = enc.sample
        target_tokens = len(enc.input_ids) - enc.prompt_length
        blocks.append(
            f"===== 训练样本 {i}/{total}: {s.user.name} · {s.target.movie} · {s.target.timestamp} =====\n"
            f"tokens: prompt {enc.prompt_length} + target {target_tokens} (含 EOS) = {len(enc.input_ids)}"
            f"; 历史 {enc.history_count}/{len(s.history)} 条" + ("; target 已截断" if enc.target_truncated else "")
            + f"\n----- 输入 (prompt) -----\n{enc.prompt}----- 输出 (target, 计算 loss) -----\n{s.target.text}\n"
        )
    return "\n".join(blocks)


LOSS_OPEN, LOSS_CLOSE = "【loss▶", "◀loss】"  # marks of the labelled spans in a conversation preview


def conversation_preview_text(windows: Sequence, total: int) -> str:
    """training_samples_preview.txt for --prompt_format conversation: the first training sequences (windows of
    a user's conversation) as the model sees them, decoded from their ids, every labelled span (review +
    end-of-turn, the loss) between LOSS_OPEN and LOSS_CLOSE. ``windows``: objects with ``user``, ``turns``
    (start, end), ``reviews`` (labelled), ``length``, ``labelled_tokens``, ``truncated``, ``segments``
    ((text, labelled) runs)."""
    blocks = []
    for i, w in enumerate(windows, 1):
        body = "".join(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if labelled else text for text, labelled in w.segments)
        blocks.append(
            f"===== 训练序列 {i}/{total}: {w.user.name} · 第 {w.turns[0] + 1}-{w.turns[1]} 条影评"
            f" (共 {len(w.user.reviews)} 条) =====\n"
            f"tokens: {w.length} (其中计算 loss {w.labelled_tokens}); 计算 loss 的影评 {w.reviews} 条"
            + ("; 影评已截断" if w.truncated else "")
            + f"\n----- 对话 ({LOSS_OPEN} … {LOSS_CLOSE} 之间计算 loss) -----\n{body}\n"
        )
    return "\n".join(blocks)
