"""Turn the Douban data people actually have into the project's review JSON (the loader's input).

    python import_douban.py INPUT [INPUT ...] --output PATH [--format auto|tofu|dmsc|moviedata|dmr]
        [--user_name NAME] [--min_reviews N] [--max_users N] [--users ID_OR_NAME ...]
        [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--keep_empty] [--include_long_reviews] [--strict] [--overwrite]

Layouts (detected from header / sheet names / keys): the 豆伴 (tofu) XLSX export of one person, DMSC.csv,
Moviedata-10M's comments.csv + movies.csv (+ users.csv), DMR's reviews.json + movies.json. See docs/import.md.

The story: check the flags and the output, detect the inputs, stream every row into a collector that skips and
counts what it cannot use, keep the users with enough reviews, write atomically, print a one-screen summary.
The mechanisms live in review_lm/data/douban_import.py and review_lm/data/douban_formats.py. Pure data: no torch.
"""

from __future__ import annotations

import argparse
import sys

from review_lm.data import douban_import as di
from review_lm.data import douban_output as do
from review_lm.data.douban_formats import FORMATS, parse_day
from review_lm.utils import ArgumentParser, UsageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Convert a Douban export or data set to the project's review JSON.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="the layout's file(s): tofu .xlsx; DMSC.csv; comments.csv movies.csv [users.csv]; "
                             "reviews.json movies.json")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="a .json file (all users), or a folder (one file per user); a .json with more than "
                             f"{do.FILE_USER_LIMIT} users becomes the folder of that name")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="the layout (auto: detect)")
    parser.add_argument("--user_name", metavar="NAME",
                        help="the user's name (required for tofu, the export of one person)")
    parser.add_argument("--min_reviews", type=int, default=None, metavar="N",
                        help=f"keep users with at least N non-empty reviews (default {di.loader_minimum_reviews()}: "
                             "what the loader's 0.7/0.15/0.15 split needs for one train, val and test review)")
    parser.add_argument("--max_users", type=int, metavar="N",
                        help="keep the N users with the most reviews (ties: first seen)")
    parser.add_argument("--users", nargs="+", metavar="ID_OR_NAME", help="keep only these users (ids or names)")
    parser.add_argument("--since", metavar="YYYY-MM-DD", help="keep reviews from this day on")
    parser.add_argument("--until", metavar="YYYY-MM-DD", help="keep reviews up to this day (inclusive)")
    parser.add_argument("--keep_empty", action="store_true",
                        help="keep reviews with an empty text (a rating without a comment; the loader skips them)")
    parser.add_argument("--include_long_reviews", action="store_true",
                        help="tofu: also the 影评 sheet's long reviews (a different genre from short comments)")
    parser.add_argument("--strict", action="store_true", help="stop at the first row that would be skipped")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> int:
    """Flag errors before any input is read; returns the --min_reviews in force."""
    if args.min_reviews is not None and args.min_reviews < 1:
        raise UsageError(f"--min_reviews must be >= 1, got {args.min_reviews}")
    if args.max_users is not None and args.max_users < 1:
        raise UsageError(f"--max_users must be >= 1, got {args.max_users}")
    for flag in ("since", "until"):
        value = getattr(args, flag)
        if value is not None and parse_day(value) != value:
            raise UsageError(f"--{flag} must be a date YYYY-MM-DD, got {value!r}")
    if args.since and args.until and args.since > args.until:
        raise UsageError(f"--since {args.since} is after --until {args.until}")
    if args.user_name is not None and not args.user_name.strip():
        raise UsageError("--user_name is empty")
    return args.min_reviews if args.min_reviews is not None else di.loader_minimum_reviews()


def run(args: argparse.Namespace) -> int:
    min_reviews = check_flags(args)
    output = do.plan_output(args.output, args.overwrite)
    inputs = di.plan_inputs(args.inputs, args.format)
    if inputs.format == "tofu" and not args.user_name:
        raise UsageError("the tofu export holds one person's reviews without their name: give --user_name NAME")
    if inputs.format != "tofu" and args.user_name:
        raise UsageError(f"--user_name is for the tofu export; the {inputs.format} layout names its users "
                         "(pick some with --users)")

    sink = di.Collector(args.keep_empty, args.strict, args.since, args.until)
    di.read_inputs(inputs, sink, args.user_name and args.user_name.strip(), args.include_long_reviews)
    kept, too_few = di.enough_reviews(sink, min_reviews)
    di.resolve_names(inputs, sink, kept)
    selection = di.select_users(kept, len(sink.users), too_few, args.users, args.max_users)
    di.fail_if_nothing(selection, sink, min_reviews)

    output = do.fit_output(output, len(selection.users))
    do.write_output(output, selection.users)
    print(di.format_summary(inputs, sink, selection, output, min_reviews, args.min_reviews is None))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        di.print_error(str(err))
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
