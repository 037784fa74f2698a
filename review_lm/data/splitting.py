"""The chronological split (per user: oldest reviews train, then validation, newest test; never random), and the
sample that asks a user for a review of a new film (``generate_review.py``). Imports no torch."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from review_lm.data.reviews import Review, ReviewData, ReviewDataError, Sample, UserHistory

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.15, 0.15)


# --------------------------------------------------------------------------------------------------------------
# Chronological split
# --------------------------------------------------------------------------------------------------------------
def check_ratios(train_ratio: float, val_ratio: float, test_ratio: float, path: str = "") -> None:
    for name, value in (("train_ratio", train_ratio), ("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ReviewDataError(path, f"--{name} must be between 0 and 1, got {value}")
    total = train_ratio + val_ratio + test_ratio
    if abs(total - 1.0) > 1e-6:
        raise ReviewDataError(path, f"--train_ratio + --val_ratio + --test_ratio must sum to 1, got {total:g}")


def split_sizes(n: int, train_ratio: float, val_ratio: float) -> tuple[int, int, int]:
    """``int(n*train)`` train, ``int(n*val)`` val, the rest test (28 -> 19/4/5).

    A tiny epsilon keeps float products such as 0.7*10 = 6.999... from losing a review.
    """
    n_train = min(n, int(n * train_ratio + 1e-9))
    n_val = min(n - n_train, int(n * val_ratio + 1e-9))
    return n_train, n_val, n - n_train - n_val


def split_chronologically(data: ReviewData, train_ratio: float = DEFAULT_RATIOS[0],
                          val_ratio: float = DEFAULT_RATIOS[1],
                          test_ratio: float = DEFAULT_RATIOS[2]) -> dict[str, list[Sample]]:
    """Per user, oldest reviews train, the next ones validate, the newest test. Never random.

    Every non-empty review is one sample; its history is *all* of the user's earlier reviews, whatever split
    they fell in (the past is known when the future is predicted), and never a later one.
    """
    check_ratios(train_ratio, val_ratio, test_ratio, data.path)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for user in data.users:
        sizes = split_sizes(len(user.reviews), train_ratio, val_ratio)
        position = 0
        for name, size in zip(SPLITS, sizes, strict=True):
            for _ in range(size):
                splits[name].append(Sample(user, position, name))
                position += 1
    return splits



# --------------------------------------------------------------------------------------------------------------
# A review of a new film (generate_review.py): the same prompt as training, after the user's whole history
# --------------------------------------------------------------------------------------------------------------
NEW_REVIEW_SPLIT = "new"


def new_review_sample(user: UserHistory, movie: str) -> Sample:
    """A sample asking ``user`` for a review of ``movie`` now, i.e. after all of their reviews.

    Its history is the user's whole history, oldest first (a film already in it is allowed: that review stays
    in the history). The target is a placeholder with empty text, timed with the last review; only its movie
    name reaches the prompt. The user object itself is not changed.
    """
    last_time = user.reviews[-1].time if user.reviews else datetime.min
    placeholder = Review(user.index, user.name, -1, movie, "", "", last_time)
    return Sample(replace(user, reviews=[*user.reviews, placeholder]), len(user.reviews), NEW_REVIEW_SPLIT)
