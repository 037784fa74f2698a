"""Where an evaluation writes: checked before anything slow, staged beside the old results, swapped in when done.

``check_output_folder`` says in one line why an output folder cannot be written (before generation).
``staged_results`` gives a temporary folder in the output folder's parent; the evaluation writes its files there,
and only when every file is written are they swapped in. So ``--overwrite`` never destroys before it can succeed:
a failure (an exception, a full disk) leaves the previous evaluation byte-identical and removes the staging folder.

Swapping in: a folder that does not exist yet, or holds only evaluation files, is exchanged whole (atomically with
Linux's ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames). A folder holding other files too (``--output_dir .``)
keeps them: only the evaluation's files are replaced, ``metrics.json`` - the mark of a finished evaluation -
removed first and written last, so that an interruption between the renames reads as unfinished, not as mixed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from collections.abc import Iterator

from review_lm.runs.run_folder import METRICS_FILE, PREDICTIONS_FILE, SAMPLE_SCORES_FILE, STYLE_FIGURE
from review_lm.utils import UsageError, check_output_path

EVAL_FILES = (PREDICTIONS_FILE, STYLE_FIGURE, SAMPLE_SCORES_FILE, METRICS_FILE)  # swapped in this order, marker last
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def check_output_folder(out_dir: str) -> None:
    """One line, before anything slow, when ``out_dir`` cannot receive the results: it exists as a file, a file
    sits in its path, or the folder where the results are staged (its parent) cannot be written."""
    check_output_path(out_dir, "output folder")
    if os.path.isdir(out_dir):  # staged beside it: the parent must take the temporary folder and the swap
        check_output_path(os.path.dirname(os.path.realpath(out_dir)), "the output folder's parent")


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the call is unavailable or refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(stage: str, out_dir: str) -> None:
    """Move the finished results of ``stage`` into ``out_dir`` (see the module docstring)."""
    if not os.path.lexists(out_dir):
        os.rename(stage, out_dir)
        return
    if set(os.listdir(out_dir)) <= set(EVAL_FILES):  # only our files: replace the folder whole
        if _exchange(stage, out_dir):
            shutil.rmtree(stage)  # now the old results
            return
        old = f"{stage}.old"
        os.rename(out_dir, old)
        os.rename(stage, out_dir)
        shutil.rmtree(old)
        return
    new = set(os.listdir(stage))
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, METRICS_FILE))
    for name in EVAL_FILES:
        target = os.path.join(out_dir, name)
        if name in new:
            os.replace(os.path.join(stage, name), target)
        elif os.path.isfile(target):  # e.g. an old style.png this evaluation did not draw
            os.remove(target)
    shutil.rmtree(stage)


@contextlib.contextmanager
def staged_results(out_dir: str) -> Iterator[str]:
    """A temporary folder beside ``out_dir`` to write the results into; swapped in when the block succeeds.

    On any failure the staging folder is removed and ``out_dir`` is left as it was; an OSError (a full disk, a
    folder made read-only meanwhile) becomes a one-line UsageError saying so."""
    out = os.path.realpath(out_dir)  # a link to the results folder: the folder is replaced, the link kept
    parent = os.path.dirname(out)
    made = []  # parent folders this call creates: removed again on failure
    probe = parent
    while not os.path.exists(probe):
        made.append(probe)
        probe = os.path.dirname(probe)
    stage = os.path.join(parent, f".{os.path.basename(out)}.staging-{os.getpid()}")
    try:
        os.makedirs(stage)
        yield stage
        _swap_in(stage, out)
    except BaseException as err:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            raise UsageError(f"{out_dir}: cannot write the results ({reason}); the previous results there, if "
                             "any, are unchanged") from None
        raise
