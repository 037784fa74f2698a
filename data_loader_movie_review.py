"""Douban movie-review histories: load, validate, split chronologically, build the history prompt.

The spec's loader script: a thin command line over ``review_lm.data`` (where the data model, validation, the
chronological split and every prompt text and file format live). It keeps the names the spec and the README use,
so ``import data_loader_movie_review as dl`` and ``dl.load_review_file(...)`` / ``dl.split_chronologically(...)``
work as before.

Pipeline::

    data = load_review_file(path)                      # validate; sort each user's reviews by time (stable)
    splits = split_chronologically(data, 0.7, 0.15, 0.15)  # per user: oldest -> train, then val, newest -> test
    builder = PromptBuilder(use_profile=True, use_history=True)
    builder.render(sample)                             # prompt text, exactly the spec's "模型输入格式"
    review_lm.data.datasets.build_datasets(splits, tokenizer, max_length, builder)  # input_ids / labels

Several files and/or directories of ``.json`` files load as one data set with :func:`load_review_data`
(users numbered globally, so users from different files stay distinct; errors still name the file).

Run as a script it prints the split report (``python data_loader_movie_review.py FILE|DIR ... [--json]``). The
inspection path never imports torch or transformers, and the report is linear in the number of samples.

Data errors raise :class:`ReviewDataError`, whose message is one line naming the file, the user (index and
name), the record index and what is wrong.
"""

from __future__ import annotations

import json
import sys

from review_lm.data.prompts import (  # noqa: F401  (the loader's public names, as the spec and README use them)
    IGNORE_INDEX,
    LOSS_CLOSE,
    LOSS_OPEN,
    TEST_HISTORIES_FORMAT,
    PromptBuilder,
    conversation_preview_text,
    history_line,
    preview_text,
    sample_record,
    test_histories,
)
from review_lm.data.reviews import (  # noqa: F401
    REVIEW_TYPE,
    Review,
    ReviewData,
    ReviewDataError,
    Sample,
    UserHistory,
    expand_data_paths,
    load_review_data,
    load_review_file,
    movie_name,
    one_line,
    parse_timestamp,
    read_json_file,
)
from review_lm.data.splitting import (  # noqa: F401
    DEFAULT_RATIOS,
    NEW_REVIEW_SPLIT,
    SPLITS,
    check_ratios,
    new_review_sample,
    split_chronologically,
    split_sizes,
)


# --------------------------------------------------------------------------------------------------------------
# Report (CLI; its layout lives in review_lm.data.report)
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from review_lm.utils import ArgumentParser  # one-line argument errors (no torch)

    parser = ArgumentParser(description="Inspect a Douban review file and its chronological split.")
    parser.add_argument("data_file", nargs="+",
                        help="review JSON file(s) and/or directories of .json files, loaded as one data set")
    parser.add_argument("--train_ratio", type=float, default=DEFAULT_RATIOS[0], help="training share (0.7)")
    parser.add_argument("--val_ratio", type=float, default=DEFAULT_RATIOS[1], help="validation share (0.15)")
    parser.add_argument("--test_ratio", type=float, default=DEFAULT_RATIOS[2], help="test share (0.15)")
    parser.add_argument("--no_profile", action="store_true", help="drop the 用户 line from the prompt")
    parser.add_argument("--no_history", action="store_true", help="drop the history block from the prompt")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max_length", type=int, default=4096,
                        help="the training --max_length, for the warning about reviews far longer than it (4096)")
    args = parser.parse_args(argv)
    try:
        check_ratios(args.train_ratio, args.val_ratio, args.test_ratio)
        data = load_review_data(args.data_file)
        splits = split_chronologically(data, args.train_ratio, args.val_ratio, args.test_ratio)
    except ReviewDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from review_lm.data.report import build_report, format_report  # the report's layout (no torch)

    report = build_report(data, splits, PromptBuilder(not args.no_profile, not args.no_history), args.max_length)
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
