"""Small helpers shared by every script: user errors, atomic writes, optional imports, versions, plots.

Kept free of torch/transformers imports so that error paths and ``--compare`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

# Fonts that carry Chinese glyphs, most common first (Linux, macOS, Windows). Matplotlib's default DejaVu Sans
# has none, so Chinese run names and titles would otherwise be drawn as empty boxes.
_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
              "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", "SimHei", "Arial Unicode MS")



# The one dtype vocabulary: the short names users type and records show (--dtype, precision modes, autocast) and
# torch's attribute names (``getattr(torch, name)``, what from_pretrained's dtype= and bitsandbytes take).
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # --dtype of evaluation and generation


def torch_dtype_name(short: str) -> str:
    """``bf16`` -> ``bfloat16`` (a torch attribute name)."""
    return DTYPE_NAMES[short]


def short_dtype_name(torch_name: str) -> str:
    """``bfloat16`` -> ``bf16``."""
    return {v: k for k, v in DTYPE_NAMES.items()}[torch_name]



class UsageError(Exception):
    """A user error: reported as one line ``error: <message>`` on stderr, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --batch_size: invalid int value: 'x'``, exit 2.

    The usage text is printed only where it helps: an unknown flag or a missing required one."""

    def error(self, message: str):
        if message.startswith(("unrecognized arguments", "the following arguments are required")):
            super().error(message)
        self.exit(2, f"error: {message}\n")


def check_range(name: str, value: float | int | None, minimum: float, inclusive: bool = True,
                maximum: float | None = None) -> None:
    """``--name`` must be >= minimum (or > with ``inclusive=False``) and <= maximum: one-line UsageError."""
    if value is None:
        return
    low_ok = value >= minimum if inclusive else value > minimum
    if not low_ok or (maximum is not None and value > maximum):
        bound = f"{'>=' if inclusive else '>'} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
        raise UsageError(f"--{name} must be {bound}, got {value:g}")


# Output paths, checked before anything slow
MIN_FREE_BYTES = 1 << 20  # below this a folder counts as full: not even a record or a metrics.json would fit


def nearest_existing(path: str) -> str:
    """``path`` itself when it exists (or is a dangling link), else its nearest existing ancestor."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _write_problem(folder: str) -> str | None:
    """Why nothing can be written in the existing folder ``folder`` (None when a probe file can be).

    Decided by trying - create, write and remove a probe file - not by os.access or the mode bits: root ignores
    the bits, and a read-only mount, a full disk or an ACL are only seen by writing."""
    probe = os.path.join(folder, f".write-probe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as err:
        return err.strerror or str(err)
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    free = stats.f_bavail * stats.f_frsize
    return None if free >= MIN_FREE_BYTES else f"no space left on the device ({free} bytes free)"


def check_output_path(path: str, what: str, kind: str = "folder") -> None:
    """Can ``path`` (a folder, or a file with ``kind="file"``) be created or written? One-line UsageError if not.

    Meant for every output path of a script, before anything slow (and before the train script's run lock):
    a path that exists as the wrong kind, a regular file in the middle of it, a folder (or the nearest existing
    ancestor of a folder still to be made) that cannot be written - read-only, permission denied, no space.
    ``what`` names the path in the message (``--output_dir``). Creates nothing (the probe file is removed)."""
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file', not {kind!r}")
    name = f"{what} {path}" if what else path
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{name}: exists and is not a folder")
    if kind == "file" and os.path.isdir(path):
        raise UsageError(f"{name}: is a folder, not a file")
    folder = path if kind == "folder" else os.path.dirname(os.path.abspath(path))
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        raise UsageError(f"{name}: cannot be created: {existing} is a file, not a folder" if os.path.isfile(existing)
                         else f"{name}: cannot be created: {existing} is not a folder")
    problem = _write_problem(existing)
    if problem is not None:
        inside = "" if os.path.abspath(existing) == os.path.abspath(folder) else f" (in {existing})"
        raise UsageError(f"{name}: cannot write there{inside}: {problem}")


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it onto ``path``:
    a crash leaves either the old file or the new one, never half of one."""
    # Same folder (os.replace is atomic only within one file system); a plain open() rather than mkstemp, so
    # the result gets the usual umask permissions instead of mkstemp's owner-only 0600.
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def importable(module: str) -> bool:
    """Can ``module`` be imported and used? An optional GPU package (flash_attn, bitsandbytes, deepspeed) that is
    installed but built for another torch/CUDA fails at import: that counts as absent, not as a crash."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "cannot use it"
        return False
    return True


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def library_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Python and the given packages' installed versions (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    versions.update({name: package_version(name) for name in packages})
    return versions


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), with a Chinese-capable font when installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in _CJK_FONTS if name in installed]
    if cjk:
        plt.rcParams["font.sans-serif"] = [*cjk, *plt.rcParams["font.sans-serif"]]
        plt.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack the Unicode minus sign
    return plt


# --------------------------------------------------------------------------------------------------------------
# Interrupts before training (Ctrl-C, SIGTERM): one line, exit 128 + signal, never a half-removed previous run
# --------------------------------------------------------------------------------------------------------------
INTERRUPT_SIGNALS = ("SIGINT", "SIGTERM")
# Testing hook: "POINT" or "POINT:SIGTERM" sends that signal (default SIGINT) to this process when start-up
# reaches the named point (interrupt_point), so tests interrupt at a known place instead of racing a timer.
SIGNAL_AT_ENV = "REVIEW_LM_TEST_SIGNAL_AT"
_received: list[int] = []  # signals seen by interrupt_handler (a swallowed exception still leaves its mark)


class Interrupted(BaseException):
    """A signal before training started. BaseException, like KeyboardInterrupt: no ``except Exception`` of a
    library swallows it. ``str()`` is the one line to print, ``exit_code`` 128 + the signal (130 for SIGINT,
    143 for SIGTERM, as training's graceful stop and generation use)."""

    def __init__(self, signum: int, where: str = "while starting"):
        import signal

        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"{signal.Signals(signum).name} received {where}: stopped before training started")


def interrupt_handler(signum: int, frame) -> None:
    _received.append(signum)
    if not _deferring:
        raise Interrupted(signum)


_deferring: list[bool] = []  # non-empty inside deferred_interrupts: the handler records, the section's end raises


def install_interrupt_handlers() -> None:
    """SIGINT/SIGTERM raise :class:`Interrupted` until training installs its own graceful stop (main thread)."""
    import signal

    for name in INTERRUPT_SIGNALS:
        signal.signal(getattr(signal, name), interrupt_handler)


def interrupt_point(name: str) -> None:
    """A named start-up point: raise :class:`Interrupted` if a signal arrived whose exception was swallowed
    (an exception raised in a ``__del__`` is only printed), and fire the testing hook (``SIGNAL_AT_ENV``)."""
    import signal

    wanted = os.environ.get(SIGNAL_AT_ENV, "")
    if wanted and wanted.split(":")[0] == name:
        sig = getattr(signal, wanted.split(":")[1] if ":" in wanted else "SIGINT")
        os.kill(os.getpid(), sig)  # the handler runs at the next bytecode (or when deferred_interrupts ends)
    if _received and not _deferring:
        raise Interrupted(_received[-1], f"before {name}")


class deferred_interrupts:
    """``with deferred_interrupts():`` holds SIGINT/SIGTERM for a short critical section - replacing a previous
    run by a new one - and raises :class:`Interrupted` when it ends. In Python, not with the signal mask: the
    kernel may hand a process-directed signal to any thread (tokenizers' and torch's worker threads do not block
    it), so only the handler itself can be relied on to wait."""

    def __enter__(self):
        _deferring.append(True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _deferring.pop()
        if not _deferring and _received and exc_type is None:
            raise Interrupted(_received[-1], "while the run folder was replaced")
