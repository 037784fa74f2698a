"""Write a review of a new film in the user's voice, with a trained model.

    python generate_review.py --model_dir outputs/movie_review_model_Y --movie 流浪地球 --movie 爱乐之城
    python generate_review.py --model_dir outputs/movie_review_model_Y --interactive

The prompt is the one training used (``review_lm.data.datasets.encode_new_review``): the run's own settings
from its ``training_config.json`` (``review_lm.runs.run_folder.read_run_record``: profile/history ablation,
``--max_length``, ``--prompt_format`` and the chat template; a conversation run's prompt is the conversation of
the user's turns + the new request, and a review also stops at the end-of-turn token) and the user's whole history,
i.e. every review of theirs in the training data file (or ``--data_file``), oldest first, the newest kept when
the token budget binds (room is kept for ``--max_new_tokens``). A film the user already reviewed is allowed:
the history is what they wrote before now.

Sampling by default (``--temperature 0.7 --top_p 0.9``; ``--seed`` makes it repeatable, review k of a film uses
seed + k), or ``--greedy``. Each review stops at EOS or ``--max_new_tokens``. Reviews go to stdout, streamed
token by token when stdout is a terminal; what was loaded and notes go to stderr. ``--json`` prints one JSON
object per line and review (user, movie, prompt, review, settings) for scripts.

Any kind of output directory the trainer writes loads (``model_loading``): a full model or a LoRA adapter.
Bad input is one line ``error: ...`` on stderr with exit code 2, found before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import data_loader_movie_review as dl
from review_lm.data.reviews import lone_surrogate
from review_lm.inference import model_loading
from review_lm.inference.generation import (
    GenerationSettings,
    Written,
    add_decoding_arguments,
    add_loading_arguments,
    check_decoding,
    generate_one,
    generation_config_kwargs,
    stop_token_ids,
)
from review_lm.runs.run_folder import RunRecord, read_run_record
from review_lm.utils import ArgumentParser, UsageError, check_range

LISTED_USERS = 10  # names shown when a user must be picked; the rest are counted


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description="Write a review of a new film in the user's voice with a trained model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a finished training run (output_dir of the trainer)")
    p.add_argument("--movie", action="append", default=[], metavar="NAME", help="film to review (repeatable)")
    p.add_argument("--interactive", action="store_true", help="type films one by one (empty line or Ctrl-D quits)")
    p.add_argument("--user", help="whose voice, in a multi-user data file (required when there are several)")
    p.add_argument("--data_file", nargs="+", metavar="PATH",
                   help="review files/folders with the user's history (default: the run's training data)")
    p.add_argument("--seed", type=int, default=None, help="seed for repeatable sampling (default: a random one)")
    p.add_argument("--num_samples", type=int, default=1, help="reviews per film")
    add_decoding_arguments(p, sample_by_default=True, max_new_tokens=256)
    p.add_argument("--show_prompt", action="store_true", help="print the exact prompt before the reviews")
    p.add_argument("--json", action="store_true", help="one JSON object per line and review, nothing streamed")
    add_loading_arguments(p)
    args = p.parse_args(argv)
    if not args.movie and not args.interactive:
        p.error("name a film with --movie NAME (repeatable) or use --interactive")
    try:
        check_range("num_samples", args.num_samples, 1)
        check_decoding(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    except UsageError as err:
        p.error(str(err))
    if args.greedy and args.num_samples > 1:
        p.error("--greedy writes the same review every time: drop --num_samples or --greedy")
    if args.greedy and args.seed is not None:
        p.error("--seed has no effect with --greedy")
    return args


# --------------------------------------------------------------------------------------------------------------
# The run and the user (no torch: every input error is found before the model loads)
# --------------------------------------------------------------------------------------------------------------
def resolve_data_files(given: list[str] | None, run: RunRecord, model_dir: str) -> list[str]:
    """``--data_file`` if given; else the run's data files, relative to the current folder, or failing that the
    absolute paths the run recorded. A missing file is one line that suggests ``--data_file``."""
    if given:
        for path in given:
            if not os.path.exists(path):
                raise UsageError(f"--data_file {path}: no such file or folder")
        return given
    config = run.path
    if not run.data_files:
        raise UsageError(f"{config} does not name the training data; pass --data_file PATH")
    if all(os.path.exists(p) for p in run.data_files):
        return run.data_files
    if run.recorded_abs_files and all(os.path.exists(p) for p in run.recorded_abs_files):
        return run.recorded_abs_files
    missing = next(p for p in run.data_files if not os.path.exists(p))
    raise UsageError(f"training data {missing} (from {config}) not found from {os.getcwd()}; run from the folder "
                     "training ran in, or pass --data_file PATH")


def load_users(paths: list[str]) -> list[dl.UserHistory]:
    """Every user of every file (folders expand to their ``*.json`` files), read by the trainer's own loader."""
    return dl.load_review_data(paths).users


def format_names(names: list[str], limit: int = LISTED_USERS) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def pick_user(users: list[dl.UserHistory], name: str | None, source: str) -> dl.UserHistory:
    names = [u.name for u in users]
    if name is None:
        if len(users) == 1:
            return users[0]
        raise UsageError(f"{source} holds {len(users)} users; pick one with --user NAME: {format_names(names)}")
    name = dl.one_line(name)  # the loader folds names to one line; so does the choice
    matches = [u for u in users if u.name == name]
    if not matches:
        raise UsageError(f"--user {name}: no such user in {source}; available: {format_names(names)}")
    if len(matches) > 1:
        raise UsageError(f"--user {name}: {len(matches)} users of that name in {source}; keep one in --data_file")
    return matches[0]


def clean_movie_name(raw: str) -> str:
    """The film's name as the prompt writes it: stripped, without one pair of surrounding 《》 (the prompt adds
    them), folded to one line as the loader folds the data's titles (``dl.one_line``: the name sits on the
    prompt's one request line). An empty name is an error."""
    name = dl.one_line(raw).strip()
    if name.startswith("《") and name.endswith("》"):
        name = name[1:-1].strip()
    if not name:
        raise UsageError(f"--movie {raw!r}: empty movie name")
    if lone_surrogate(name) is not None:  # bytes that are not UTF-8 in the argument or the typed line
        raise UsageError(f"--movie {raw!r}: not valid text (bytes that are not UTF-8)")
    return name


def earlier_review_of(user: dl.UserHistory, movie: str) -> dl.Review | None:
    """The user's latest review of ``movie``, if they reviewed it before."""
    return next((r for r in reversed(user.reviews) if r.movie == movie), None)


# --------------------------------------------------------------------------------------------------------------
# Generation (torch / transformers imported here only)
# --------------------------------------------------------------------------------------------------------------
class ReviewWriter:
    """The loaded model and the decoding settings; writes one review per call."""

    def __init__(self, loaded, args: argparse.Namespace, run: RunRecord):
        from transformers import GenerationConfig

        self.loaded, self.args = loaded, args
        tokenizer = loaded.tokenizer
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=1, do_sample=not args.greedy,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        # evaluate's rule: every field that decides the output is set, none comes from the model's own config.
        # The run's chat format (if any) ends a review with its end-of-turn token as well as EOS.
        self.gen_kwargs = generation_config_kwargs(settings, stop_token_ids(tokenizer, run.chat_template),
                                                   tokenizer.pad_token_id)
        self.gen_config = GenerationConfig(**self.gen_kwargs)
        # Without --seed draw one, so that every sampled review can be reproduced from its recorded seed.
        self.base_seed = None if args.greedy else (args.seed if args.seed is not None
                                                   else random.SystemRandom().randrange(2**31))

    def write(self, prompt_ids: list[int], sample_index: int, stream: bool) -> Written:
        # Review k of a film depends on seed + k only, not on the films before it.
        seed = None if self.base_seed is None else self.base_seed + sample_index
        return generate_one(self.loaded, prompt_ids, self.gen_config, seed, stream)

    def settings(self, run: RunRecord, seed: int | None) -> dict[str, Any]:
        """Everything that decided a review, for --json."""
        a = self.args
        return {
            "model_dir": os.path.abspath(a.model_dir), "model_kind": self.loaded.kind,
            "base_model": self.loaded.base_model, "use_profile": run.use_profile, "use_history": run.use_history,
            "max_length": run.max_length, "prompt_format": run.prompt_format, "chat_template": run.chat_template,
            "max_new_tokens": a.max_new_tokens, "do_sample": not a.greedy,
            "temperature": None if a.greedy else a.temperature, "top_p": None if a.greedy else a.top_p,
            "seed": seed, "device": self.loaded.device, "dtype": self.loaded.dtype,
        }


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def review_film(writer: ReviewWriter, run: RunRecord, user: dl.UserHistory, movie: str) -> None:
    """Print ``--num_samples`` reviews of ``movie`` (text, streamed on a terminal, or JSON lines)."""
    args = writer.args
    earlier = earlier_review_of(user, movie)
    if earlier is not None:
        print(f"note: {user.name} already reviewed 《{movie}》 on {earlier.timestamp}; that review stays in the "
              "history and a new one is written", file=sys.stderr)
    from review_lm.data.datasets import encode_new_review  # torch: after the model has loaded

    enc = encode_new_review(writer.loaded.tokenizer, user, movie, run.builder, run.max_length, args.max_new_tokens,
                            run.prompt_format, run.chat_template)
    prompt_ids = enc.input_ids[:enc.prompt_length]
    history = f"历史 {enc.history_count}/{len(user.reviews)} 条" if run.use_history else "无历史"
    stream = not args.json and stdout_is_terminal()
    if not args.json:
        print(f"===== 电影《{movie}》 · {user.name} · {history} =====")
        if args.show_prompt:
            print(f"----- 输入 (prompt, {enc.prompt_length} tokens) -----\n{enc.prompt}", end="")
    for k in range(args.num_samples):
        if not args.json and (args.num_samples > 1 or args.show_prompt):
            print(f"----- 影评 {k + 1}/{args.num_samples} -----", flush=True)
        written = writer.write(prompt_ids, k, stream)
        if args.json:
            print(json.dumps({
                "user": user.name, "movie": movie, "sample": k + 1, "prompt": enc.prompt, "review": written.text,
                "prompt_tokens": enc.prompt_length, "history_count": enc.history_count,
                "history_total": len(user.reviews), "new_tokens": written.new_tokens,
                "hit_max_new_tokens": written.hit_limit,
                "already_reviewed": None if earlier is None else {"timestamp": earlier.timestamp,
                                                                  "review": earlier.text},
                "settings": writer.settings(run, written.seed),
            }, ensure_ascii=False), flush=True)
        elif not stream:  # streamed text is already on the screen
            print(written.text, flush=True)
        if written.hit_limit:
            print(f"note: stopped at --max_new_tokens {args.max_new_tokens} before the model ended the review",
                  file=sys.stderr)
    if not args.json:
        print(flush=True)


def typed_movies(stdin: TextIO, prompt: bool) -> Iterator[str]:
    """Lines typed on stdin until an empty line or end of input (Ctrl-D)."""
    while True:
        if prompt:
            print("电影名（空行或 Ctrl-D 退出）> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line.strip():  # "" is end of input, "\n" an empty line: both quit
            return
        yield line


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, dl.ReviewDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    settings = read_run_record(args.model_dir)
    data_files = resolve_data_files(args.data_file, settings, args.model_dir)
    user = pick_user(load_users(data_files), args.user, ", ".join(data_files))
    movies = [clean_movie_name(m) for m in args.movie]
    if settings.max_length is not None and args.max_new_tokens >= settings.max_length:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt within the run's "
                         f"--max_length {settings.max_length}")
    model_loading.check_model_dir(args.model_dir)
    if note := model_loading.check_base_model(args.model_dir, args.base_model):  # before the slow load
        print(f"note: {note}", file=sys.stderr)

    loaded = model_loading.load_model_and_tokenizer(args.model_dir, args.device, args.dtype,
                                                    args.trust_remote_code, args.base_model)
    print(f"{loaded.summary}; user {user.name} ({len(user.reviews)} reviews)", file=sys.stderr)
    writer = ReviewWriter(loaded, args, settings)
    for movie in movies:
        review_film(writer, settings, user, movie)
    if args.interactive:
        for line in typed_movies(sys.stdin, prompt=sys.stdin.isatty()):
            try:  # a bad name is reported and the loop goes on: the model stays loaded
                review_film(writer, settings, user, clean_movie_name(line))
            except (UsageError, dl.ReviewDataError) as err:
                print(f"error: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
