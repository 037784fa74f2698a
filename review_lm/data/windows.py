"""Conversation windows: a user's history as training sequences that fit ``max_length``, with their labels.

:func:`plan_windows` splits a history longer than ``max_length`` into overlapping windows so that every labelled
review is labelled exactly once and keeps at least half the budget of context; :func:`encode_window` assembles
one window's ``input_ids`` / ``labels`` from the pieces of ``review_lm.data.chat_layout`` (the one place that
assembles conversation ids and labels). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from review_lm.data.chat_layout import ChatFormat, ChatFormatError, ConversationTokens, EncodedWindow, Turn
from review_lm.data.prompts import IGNORE_INDEX


def check_conversation_ids(fmt: ChatFormat, system: str | None, turns: Sequence[Turn]) -> ConversationTokens:
    """Check that the concatenated pieces' ids equal ``tokenizer(conversation text)`` (and, with a template,
    that the text equals the template's rendering); return the pieces. Raises :class:`ChatFormatError`.

    Equal for Qwen-style byte-level BPE: every piece boundary is next to a special token or right after the
    assistant header's newline, and reviews are stripped (a review starting with whitespace could merge with
    that newline in the whole text).
    """
    fmt.check_against_template(system, turns)
    tokens = fmt.encode_conversation(system, turns)
    pieces = tokens.input_ids()
    whole = fmt.tokenizer(fmt.conversation_text(system, turns), add_special_tokens=False)["input_ids"]
    if pieces != whole:
        at = next((i for i, (a, b) in enumerate(zip(pieces, whole, strict=False)) if a != b),
                  min(len(pieces), len(whole)))
        raise ChatFormatError(f"{fmt.layout.source}: the pieces' ids differ from the whole text's ids at token "
                              f"{at} (pieces {pieces[at:at + 5]}, whole {whole[at:at + 5]})")
    return tokens


# ------------------------------------------------------------------------------------------------------------
# Windows
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Turns ``[start, end)`` after the system piece; ``labelled`` (ascending, in range) carry labels.
    ``length``: its tokens. ``truncated``: its only turn's review was cut to fit (end-of-turn kept)."""

    start: int
    end: int
    labelled: tuple[int, ...]
    length: int = 0
    truncated: bool = False


def plan_windows(turn_lengths: Sequence[int], system_length: int, labelled: Iterable[int], max_length: int,
                 separator_length: int = 0, min_turn_lengths: Sequence[int] | None = None) -> list[Window]:
    """Cut one user's conversation into windows of at most ``max_length`` tokens. Pure; no tokenizer.

    ``turn_lengths[i]``: tokens of turn i (request + review + end-of-turn); ``system_length``: the system
    piece; ``separator_length``: the separator before every turn but a window's first (window tokens =
    system + its turns + separators). ``labelled``: the turns whose reviews are trained / evaluated (e.g. a
    user's train reviews; or the val reviews, whose context is every earlier review of any split: unlabelled
    turns serve as context). ``min_turn_lengths[i]``: the fewest tokens turn i can be cut to (request + one
    review token + end-of-turn; default: not checked here, :func:`encode_window` raises if the request leaves
    no review token).

    Rule. ``R = max_length - system_length`` is the token budget for turns; the *context* of review j is the
    tokens between the system piece and j's request (earlier turns of its window, with their separators).
    Windows are built greedily, oldest first: the first labelled review j not yet labelled opens a window.

    * Its context is the shortest run of immediately preceding whole turns holding at least
      ``A_j = min(R // 2, R - len_j)`` tokens (half the budget, less if review j itself is long), or all
      earlier turns if they hold less; if the turn before that run would not fit next to review j
      (context + len_j > R), the run stops there. So every labelled review gets
      ``context >= min(all earlier turns, A_j)`` unless an earlier turn too long to share a window with it
      cuts it off.
    * The window then extends over the following turns while they fit in ``max_length`` and ends at the last
      labelled turn among them; every labelled review in it is labelled there (each gets more context than
      j). The next window opens at the first labelled review after it. Windows overlap by their context.
    * Every labelled review is labelled in exactly one window; unlabelled turns only serve as context.
    * A labelled turn longer than ``R`` gets a window of its own with no context, its review cut so the window
      is exactly ``max_length`` tokens, end-of-turn kept (as the spec path keeps EOS after a cut target):
      ``truncated=True``. If even ``min_turn_lengths`` does not fit, or the system piece alone fills
      ``max_length``, :class:`ChatFormatError`.

    Cost. Let ``m`` be the longest turn (+ separator) and ``W`` the number of windows. A window's context is
    ``< R/2 + m`` and every window but the last moves on by ``> R/2 - 2m`` tokens of turns no other window
    passes over, so ``W - 1 < T / (R/2 - 2m)`` where ``T`` = the tokens of the turns the windows cover, each
    once, and the total is ``<= W * (system_length + R/2 + m) + T``. Relative to the conversation once
    (``system_length + T``), the worst case tends to ``1 + (system_length + R/2 + m) / (R/2 - 2m)``, i.e.
    ``2x + 2*system_length/R`` for reviews short against the budget (about ``2.4x`` at ``m = R/20``), and
    ``1x`` when the history fits in one window. :func:`windows_cost` measures it.
    """
    labelled = sorted(set(labelled))
    n, sep = len(turn_lengths), separator_length
    if labelled and not 0 <= labelled[0] <= labelled[-1] < n:
        raise ChatFormatError(f"labelled turns must be in 0..{n - 1}, got {labelled[0]}..{labelled[-1]}")
    budget = max_length - system_length  # R
    if labelled and budget <= 0:
        raise ChatFormatError(f"max_length {max_length} is too small: the system piece alone needs "
                              f"{system_length} tokens")
    t = [length + sep for length in turn_lengths]  # a turn with the separator before it
    is_labelled = [False] * n
    for j in labelled:
        is_labelled[j] = True
    windows: list[Window] = []
    k = 0
    while k < len(labelled):
        j = labelled[k]
        if turn_lengths[j] > budget:  # alone, cut to fit
            least = 0 if min_turn_lengths is None else min_turn_lengths[j]
            if least > budget:
                raise ChatFormatError(f"max_length {max_length} is too small for turn {j}: the system piece "
                                      f"({system_length} tokens) and its request need {system_length + least} "
                                      f"tokens with one review token")
            windows.append(Window(j, j + 1, (j,), max_length, True))
            k += 1
            continue
        room = budget - turn_lengths[j]
        want = min(budget // 2, room)
        start, context = j, 0
        while start > 0 and context < want and context + t[start - 1] <= room:
            start -= 1
            context += t[start]
        used, end, stop = context + turn_lengths[j], j + 1, j + 1
        while stop < n and used + t[stop] <= budget:
            used += t[stop]
            stop += 1
            if is_labelled[stop - 1]:
                end = stop
        inside = tuple(i for i in labelled[k:] if i < end)
        length = system_length + sum(t[start:end]) - sep
        windows.append(Window(start, end, inside, length))
        k += len(inside)
    return windows


def windows_cost(windows: Sequence[Window], turn_lengths: Sequence[int], system_length: int,
                 separator_length: int = 0) -> tuple[int, int]:
    """``(total tokens of all windows, tokens of the covered conversation once)``; their ratio is the cost
    factor of windowing (1.0 when one window holds everything)."""
    if not windows:
        return 0, 0
    start, end = min(w.start for w in windows), max(w.end for w in windows)
    once = system_length + sum(turn_lengths[start:end]) + separator_length * (end - start - 1)
    return sum(w.length for w in windows), once


# ------------------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------------------
def encode_window(tokens: ConversationTokens, window: Window, max_length: int | None = None) -> EncodedWindow:
    """``input_ids`` / ``labels`` of one window: ``system + turn_start + (separator + turn)...``; labels are
    IGNORE_INDEX everywhere but the answer spans (review ids + end-of-turn) of ``window.labelled``.

    ``window.truncated``: the single turn's review is cut to fill ``max_length`` exactly, end-of-turn kept.
    """
    ids = list(tokens.system)
    labels = [IGNORE_INDEX] * len(ids)
    labelled = set(window.labelled)
    spans: list[tuple[int, int]] = []
    for i in range(window.start, window.end):
        if i > window.start:
            ids += tokens.separator
            labels += [IGNORE_INDEX] * len(tokens.separator)
        ids += tokens.requests[i]
        labels += [IGNORE_INDEX] * len(tokens.requests[i])
        answer = list(tokens.answers[i])
        if window.truncated:
            if max_length is None:
                raise ChatFormatError("a truncated window needs the max_length it was planned with")
            room = max_length - len(ids) - 1
            if room < 1:
                raise ChatFormatError(f"max_length {max_length} leaves no review token for turn {i}")
            answer = answer[:-1][:room] + [tokens.end_of_turn_id]
        spans.append((len(ids), len(ids) + len(answer)))
        ids += answer
        labels += answer if i in labelled else [IGNORE_INDEX] * len(answer)
    return EncodedWindow(ids, labels, list(range(window.start, window.end)), spans, tuple(window.labelled),
                         window.truncated)


def conversation_features(fmt: ChatFormat, system: str | None, turns: Sequence[Turn],
                          labelled: Iterable[int] | None = None, max_length: int | None = None
                          ) -> list[dict[str, list[int]]]:
    """Convenience for small data: the features of every window of one conversation (one window when
    ``max_length`` is None). ``labelled``: default every turn."""
    tokens = fmt.encode_conversation(system, turns)
    labelled = list(range(len(turns))) if labelled is None else list(labelled)
    if max_length is None:
        windows = [Window(0, len(turns), tuple(sorted(set(labelled))))] if labelled else []
    else:
        windows = plan_windows(tokens.turn_lengths, len(tokens.system), labelled, max_length,
                               len(tokens.separator), tokens.min_turn_lengths)
    return [encode_window(tokens, w, max_length).as_features() for w in windows]
