"""Experiment tracking (W&B): whether and how a run reports, and a stable run id so a resumed run logs on.

W&B without credentials would prompt for a key (or hang without a terminal), so such a run switches to
offline mode, whose runs land in ./wandb and upload later with ``wandb sync``. Only the run id is stored in the
run folder, never a key.
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
import string

from review_lm.runs.run_folder import WANDB_ID_FILE
from review_lm.utils import UsageError, write_text_atomic


def wandb_logged_in(environ: dict[str, str]) -> bool:
    """True when W&B has credentials: WANDB_API_KEY or a netrc entry written by ``wandb login``."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0].split(":")[0]
    try:
        return netrc.netrc(environ.get("NETRC") or None).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_reporting(report_to: str | None, environ: dict[str, str],
                        wandb_installed: bool) -> tuple[str, str | None]:
    """Return (report_to for TrainingArguments, message). May set WANDB_MODE=offline in ``environ``."""
    if report_to is None:
        report_to = "wandb" if wandb_installed else "none"
        if not wandb_installed:
            return "none", "W&B logging off: wandb is not installed (pip install wandb)"
    if report_to == "none":
        return "none", None
    if not wandb_installed:
        raise UsageError("--report_to wandb needs the wandb package (pip install wandb)")
    mode = environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return "wandb", f"W&B mode {mode} (from WANDB_MODE)"
    if not wandb_logged_in(environ):
        environ["WANDB_MODE"] = "offline"
        return "wandb", "W&B: no API key / login found, logging offline to ./wandb (upload later: wandb sync)"
    return "wandb", "W&B: logging online"


def wandb_run_id(output_dir: str, resuming: bool) -> str:
    """The W&B run id for this output_dir: the stored one when resuming, else a new one (stored for later)."""
    path = os.path.join(output_dir, WANDB_ID_FILE)
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = f.read().strip()
        if re.fullmatch(r"[a-z0-9]{1,64}", stored):
            return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text_atomic(path, run_id + "\n")
    return run_id


def configure_wandb_resume(environ: dict[str, str], run_id: str) -> None:
    """wandb.init (called by transformers' WandbCallback) reads these documented environment variables."""
    environ["WANDB_RUN_ID"] = run_id
    environ["WANDB_RESUME"] = "allow"


def configure_wandb_project(environ: dict[str, str], project: str) -> None:
    """transformers' W&B callback reads the project from the environment."""
    environ["WANDB_PROJECT"] = project
