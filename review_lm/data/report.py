"""The loader's split report and the split summary (sample counts and time range per split) that training
records; the report (``python data_loader_movie_review.py FILE|DIR ...``): what the data holds, how it
splits, and one sample prompt; as text or ``--json``. Linear in the number of samples; no torch.
"""

from __future__ import annotations

import heapq
import os
from datetime import UTC, date, datetime, timedelta
from typing import Any

from review_lm.data.text_tokens import cut_bound

# The loader imports this module for its CLI, so this one never imports the loader: it only reads the loader's
# objects (ReviewData, UserHistory, Sample, PromptBuilder) through their attributes.


def _time_range(samples: list) -> list[str] | None:
    """Earliest and latest target timestamp, as a stable sort by time would give them: among equal times the
    first sample is the earliest and the last one the latest. Two linear scans instead of a sort."""
    if not samples:
        return None
    first = min(samples, key=lambda s: s.target.time)
    last = max(reversed(samples), key=lambda s: s.target.time)
    return [first.target.timestamp, last.target.timestamp]


def split_summary(samples_by_split: dict[str, list]) -> dict[str, Any]:
    return {name: {"samples": len(ss), "time_range": _time_range(ss)} for name, ss in samples_by_split.items()}


PLACEHOLDER_TITLE = "电影名"  # what the README's format example writes as continuation_prefix ("电影名: ")


def data_warnings(data, max_length: int | None = None, today: date | None = None) -> list[str]:
    """One line per kind of data that looks wrong, each with its count (pure; ``today`` defaults to UTC today).

    * the literal placeholder prefix ``电影名: `` (a file that copied the format example names every film 电影名);
    * a title already in 《》 (the prompt adds them: 《《片名》》);
    * a date after today (it lands in the test split: the latest reviews are tested) - one day of slack, since
      naive timestamps are the writer's local time;
    * a review far longer than ``max_length`` (over 128 characters per token of budget): cut before tokenising.
    """
    today = today or datetime.now(UTC).date()
    bound = cut_bound(max_length)  # where the datasets cut a review before tokenising it
    placeholder = wrapped = future = far = 0
    for user in data.users:
        for r in user.reviews:
            placeholder += r.movie == PLACEHOLDER_TITLE
            wrapped += r.movie.startswith("《") and r.movie.endswith("》")
            future += r.time.date() > today + timedelta(days=1)
            far += bound is not None and len(r.text) > bound
    warnings = []
    if placeholder:
        warnings.append(f"{placeholder} reviews have the placeholder title {PLACEHOLDER_TITLE!r} "
                        f"(continuation_prefix '{PLACEHOLDER_TITLE}: ' copied from the format example, not a film)")
    if wrapped:
        warnings.append(f"{wrapped} titles are already in 《》; the prompt adds them again (《《片名》》)")
    if future:
        warnings.append(f"{future} reviews are dated after today ({today.isoformat()}); the latest reviews form "
                        "the test split")
    if far:
        warnings.append(f"{far} reviews are far longer than --max_length {max_length} (over {bound:,} characters); "
                        "each is cut to that before tokenising (only its first max_length tokens can be used)")
    return warnings


REPORT_USERS_LISTED = 20  # the text report lists every user up to this many, then summarises (--json keeps all)
REPORT_EXTREMES = 5  # users shown with the most / fewest reviews


def _samples_by_user(splits: dict[str, list]) -> dict[int, dict[str, list]]:
    """One pass over all samples (not one per user): user index -> split -> that user's samples."""
    by_user: dict[int, dict[str, list]] = {}
    for name, samples in splits.items():
        for s in samples:
            mine = by_user.get(s.user.index)
            if mine is None:
                mine = by_user[s.user.index] = {n: [] for n in splits}
            mine[name].append(s)
    return by_user


def _user_brief(user) -> dict[str, Any]:
    return {"index": user.index, "name": user.name, "reviews": len(user.reviews), "file": user.file}


def build_report(data, splits: dict[str, list], builder, max_length: int | None = None) -> dict[str, Any]:
    by_user = _samples_by_user(splits)
    no_samples = {name: [] for name in splits}
    per_user = []
    for user in data.users:
        per_user.append({
            "index": user.index, "name": user.name, "reviews": len(user.reviews),
            "skipped_empty": user.skipped_empty, "ignored_collections": user.ignored_collections,
            "file": user.file, "splits": split_summary(by_user.get(user.index, no_samples)),
        })
    warnings = [f"the {name} split is empty" for name in ("val", "test") if not splits[name]]
    warnings += data_warnings(data, max_length)
    example = next((splits[name][0] for name in ("val", "test") if splits[name]), None) or splits["train"][-1]
    most = heapq.nsmallest(REPORT_EXTREMES, data.users, key=lambda u: (-len(u.reviews), u.index))
    fewest = heapq.nsmallest(REPORT_EXTREMES, data.users, key=lambda u: (len(u.reviews), u.index))
    return {
        "file": data.path,
        "files": data.files or [data.path],
        "users": len(data.users),
        "reviews": data.num_reviews,
        "samples": sum(len(ss) for ss in splits.values()),
        "skipped": {
            "empty_reviews": sum(u.skipped_empty for u in data.users),
            "non_movie_review_collections": sum(u.ignored_collections for u in data.users),
        },
        "splits": split_summary(splits),
        "users_with_empty_split": {name: sum(1 for u in per_user if u["splits"][name]["samples"] == 0)
                                   for name in splits},
        "most_reviews": [_user_brief(u) for u in most],
        "fewest_reviews": [_user_brief(u) for u in fewest],
        "per_user": per_user,
        "warnings": warnings,
        "example": {
            "user": example.user.name, "movie": example.target.movie, "timestamp": example.target.timestamp,
            "split": example.split, "prompt": builder.render(example), "target": example.target.text,
        },
    }


def _elide_history(prompt: str, keep: int = 10) -> str:
    """For display only: show the first and last few history lines of a long prompt."""
    lines = prompt.split("\n")
    items = [i for i, line in enumerate(lines) if line.startswith("  电影《")]
    if len(items) <= keep:
        return prompt
    half = keep // 2
    hidden = items[half:-half]
    lines[hidden[0]:hidden[-1] + 1] = [f"  ...（省略 {len(hidden)} 条）"]
    return "\n".join(lines)


def _files_line(files: list[str], shown: int = 3) -> str:
    if len(files) == 1:
        return f"文件: {files[0]}"
    more = f" 等（共 {len(files)} 个）" if len(files) > shown else ""
    return f"文件 ({len(files)} 个): " + ", ".join(files[:shown]) + more


def format_report(report: dict[str, Any]) -> str:
    def span(r):
        return f"{r[0]} ~ {r[1]}" if r else "-"

    files = report.get("files") or [report["file"]]
    out = [
        _files_line(files),
        f"用户数: {report['users']}  影评数: {report['reviews']}  样本数: {report['samples']}",
        f"跳过: 空影评 {report['skipped']['empty_reviews']} 条; "
        f"非 movie_review 集合 {report['skipped']['non_movie_review_collections']} 个",
        "",
        "数据划分 (按时间顺序):",
    ]
    for name, info in report["splits"].items():
        out.append(f"  {name:<5} {info['samples']:>5} 条  {span(info['time_range'])}")
    if 1 < report["users"] <= REPORT_USERS_LISTED:
        out.append("")
        out.append("各用户划分:")
        for u in report["per_user"]:
            parts = "  ".join(f"{n} {i['samples']} ({span(i['time_range'])})" for n, i in u["splits"].items())
            source = f" [{os.path.basename(u['file'])}]" if len(files) > 1 else ""
            out.append(f"  #{u['index']} {u['name']}{source}: {u['reviews']} 条 (空 {u['skipped_empty']})  {parts}")
    elif report["users"] > REPORT_USERS_LISTED:
        def brief(users):
            return ", ".join(f"#{u['index']} {u['name']} ({u['reviews']})" for u in users)

        empty = report["users_with_empty_split"]
        out += [
            "",
            f"各用户 ({report['users']} 个，完整列表见 --json):",
            f"  影评最多: {brief(report['most_reviews'])}",
            f"  影评最少: {brief(report['fewest_reviews'])}",
            f"  val 为空的用户: {empty['val']} 个; test 为空的用户: {empty['test']} 个",
        ]
    for w in report["warnings"]:
        out.append(f"警告: {w}")
    ex = report["example"]
    out += [
        "",
        f"样本示例 ({ex['split']}, {ex['user']}, {ex['timestamp']}):",
        "----- 输入 -----",
        _elide_history(ex["prompt"]).rstrip("\n"),
        "----- 输出 -----",
        ex["target"],
    ]
    return "\n".join(out)
