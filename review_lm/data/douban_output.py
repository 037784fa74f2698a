"""What the Douban importer writes: each user as the spec's review JSON (one file of all users, or a folder of one
file per user, named safely and stably), written atomically, never over a previous output without --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass

from review_lm.data.prompts import TASK_DESCRIPTION
from review_lm.data.reviews import REVIEW_TYPE
from review_lm.utils import UsageError

TYPE_DESC = "豆瓣影评数据"
FILE_USER_LIMIT = 300  # above this many users a .json --output becomes a folder of one file per user


@dataclass
class UserReviews:
    """One user's reviews in read order: {(day, film, text): time of day} - the key is the duplicate test."""

    __slots__ = ("key", "name", "reviews", "non_empty")

    def __init__(self, key: str, name: str | None):
        self.key, self.name, self.reviews, self.non_empty = key, name, {}, 0

    def records(self) -> list[dict]:
        """The spec's records, oldest first; equal times keep read order (sorted is stable)."""
        ordered = sorted(self.reviews.items(), key=lambda item: (item[0][0], item[1]))
        return [{"context": [], "continuation": text, "continuation_prefix": f"{film}: ", "timestamp": day}
                for (day, film, text), _ in ordered]




def user_entry(user: UserReviews) -> dict:
    """One user in the spec's layout."""
    return {"user": {"profile": {"name": user.name}},
            "task": {"description": TASK_DESCRIPTION, "task_behavior_collections": [
                {"type": REVIEW_TYPE, "type_desc": TYPE_DESC, "data": user.records()}]}}


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class OutputPlan:
    path: str
    per_user: bool  # a folder of one file per user (else one file holding every user)
    overwrite: bool


def plan_output(path: str, overwrite: bool) -> OutputPlan:
    """A ``.json`` path is one file; a folder (existing, or any other name) gets one file per user."""
    per_user = os.path.isdir(path) or not path.lower().endswith(".json")
    plan = OutputPlan(path, per_user, overwrite)
    check_output(plan)
    return plan


def check_output(plan: OutputPlan) -> None:
    path = plan.path
    if plan.per_user and os.path.isfile(path):
        raise UsageError(f"--output {path}: a file; a per-user output is a folder (or name a .json file)")
    if not plan.per_user and os.path.isdir(path):
        raise UsageError(f"--output {path}: a folder; name a .json file or a folder for one file per user")
    exists = os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path))
    if exists and not plan.overwrite:
        raise UsageError(f"--output {path} exists; add --overwrite to replace it")
    if exists and plan.per_user:
        strays = [n for n in os.listdir(path) if not n.endswith(".json")]
        if strays:  # --overwrite replaces the whole folder: never one holding anything but review files
            raise UsageError(f"--output {path} holds {strays[0]}, not a review file; not replacing that folder")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UsageError(f"--output {path}: {parent} is not a folder")


def fit_output(plan: OutputPlan, users: int) -> OutputPlan:
    """Many users in one .json: a folder of that name instead (the loader reads a folder one file at a time,
    one huge file would be one huge JSON tree in memory)."""
    if plan.per_user or users <= FILE_USER_LIMIT:
        return plan
    folder = OutputPlan(plan.path[:-len(".json")], True, plan.overwrite)
    check_output(folder)
    return folder


def user_file_names(users: list[UserReviews]) -> list[str]:
    """``user_<name>_<hash of the user's id>.json``: file-system safe, the same name every import."""
    names, taken = [], set()
    for user in users:
        slug = re.sub(r"[^\w-]+", "_", user.name).strip("_")[:32] or "user"
        name = f"user_{slug}_{hashlib.sha1(user.key.encode()).hexdigest()[:10]}"
        candidate, n = name, 1
        while candidate.lower() in taken:  # a hash prefix shared by two ids: keep both, deterministically
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate.lower())
        names.append(candidate + ".json")
    return names


_JSON = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps(ensure_ascii=False) builds one per call


def user_json(user: UserReviews) -> str:
    """:func:`user_entry` as indented JSON text with one review per line: readable, and fast (``json.dumps``
    with ``indent`` runs the pure-Python encoder, 3x slower on 2M reviews; here each string is encoded once by
    the C string encoder)."""
    dump = _JSON.encode
    records = ",\n".join(
        f'            {{"context": [], "continuation": {dump(r["continuation"])}, '
        f'"continuation_prefix": {dump(r["continuation_prefix"])}, "timestamp": {dump(r["timestamp"])}}}'
        for r in user.records())
    return (f'  {{\n    "user": {dump({"profile": {"name": user.name}})},\n    "task": {{\n'
            f'      "description": {dump(TASK_DESCRIPTION)},\n      "task_behavior_collections": [\n        {{\n'
            f'          "type": {dump(REVIEW_TYPE)},\n          "type_desc": {dump(TYPE_DESC)},\n'
            f'          "data": [\n{records}\n          ]\n        }}\n      ]\n    }}\n  }}')


def _write_users(path: str, users: list[UserReviews]) -> None:
    """A JSON list of users, one user serialised at a time (the output is never one big string)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, user in enumerate(users):
            f.write(("" if i == 0 else ",\n") + user_json(user))
        f.write("\n]\n")


def write_output(plan: OutputPlan, users: list[UserReviews]) -> list[str]:
    """Write atomically: a temporary file / folder beside the target, renamed onto it when complete."""
    parent = os.path.dirname(os.path.abspath(plan.path))
    os.makedirs(parent, exist_ok=True)  # like training's --output_dir: data/me.json needs no mkdir first
    tmp = os.path.join(parent, f".{os.path.basename(plan.path.rstrip(os.sep))}.{os.getpid()}.tmp")
    old = tmp + ".old"
    try:
        if not plan.per_user:
            _write_users(tmp, users)
            os.replace(tmp, plan.path)
            return [plan.path]
        os.mkdir(tmp)
        names = user_file_names(users)
        for user, name in zip(users, names, strict=True):
            _write_users(os.path.join(tmp, name), [user])
        if os.path.isdir(plan.path):  # checked by check_output: empty, or only review files with --overwrite
            os.rename(plan.path, old)
        os.rename(tmp, plan.path)
        shutil.rmtree(old, ignore_errors=True)
        return [os.path.join(plan.path, n) for n in names]
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(plan.path):
            os.rename(old, plan.path)
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.path.exists(tmp) and os.remove(tmp)
        raise
