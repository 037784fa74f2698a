"""The README's commands run as written after its set-up (issue 17).

Every ``python``/``torchrun`` command in the README's bash blocks is parsed by its script's own argument parser
and checked by the training script's flag validation (so a renamed or misspelled flag fails here). The commands
that need neither a GPU nor the model hub - the loader report, the CPU recipe with the tiny model, the offline
preview - are run for real, in order, in a scratch folder, with the venv's python first on PATH.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import data_loader_movie_review as dl
import evaluate_movie_review as ev
import generate_review as gr
import train_distributed_MovieReview as tr
from review_lm.training.plan import validate_arguments
from tests.helpers import REPO

SCRIPTS = {"train_distributed_MovieReview.py", "evaluate_movie_review.py", "generate_review.py",
           "data_loader_movie_review.py", "tools/make_tiny_model.py"}


def readme_commands() -> list[str]:
    """Every shell line of the README's ```bash blocks, continuations joined, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def script_argv(command: str) -> tuple[str, list[str]] | None:
    """(script, its arguments) for a python/torchrun command of one of ours; None for anything else."""
    words = shlex.split(command.replace("$MASTER_ADDR", "10.0.0.1"))
    for i, word in enumerate(words):
        if word in SCRIPTS and words[0] in ("python", "torchrun"):
            return word, words[i + 1:]
    return None


def runnable_here(script: str, argv: list[str]) -> bool:
    """Needs neither a GPU nor the hub: the loader, the tiny model and what uses it."""
    joined = " ".join(argv)
    return (script in ("data_loader_movie_review.py", "tools/make_tiny_model.py") or "tiny-qwen2" in joined
            or "outputs/cpu_try" in joined)


def test_every_readme_command_parses_with_its_script():
    checked = 0
    for command in readme_commands():
        found = script_argv(command)
        if found is None or "..." in command:
            continue
        script, argv = found
        if script == "train_distributed_MovieReview.py":
            validate_arguments(tr.parse_args(argv))
        elif script == "evaluate_movie_review.py":
            ev.parse_args(argv)
        elif script == "generate_review.py":
            gr.parse_args(argv)
        checked += 1
    assert checked >= 25  # the spec's commands, the ablations, LoRA/FSDP/DeepSpeed, evaluation, generation


@pytest.mark.slow
def test_the_readme_commands_that_need_no_gpu_run_as_written(tmp_path):
    for name in ("example_movie_review_data.json", "tools", "configs"):  # the files the commands name
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ran = []
    for command in readme_commands():
        found = script_argv(command)
        if command.startswith(("mkdir", "cp ")) or (found and runnable_here(*found) and "..." not in command):
            if found:  # the scripts by their path in the repository (run from the scratch folder)
                command = command.replace(found[0], str(REPO / found[0]), 1)
            proc = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=tmp_path, env=env,
                                  timeout=600, stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
            ran.append(command)
    assert (tmp_path / "outputs" / "cpu_try" / "eval" / "metrics.json").is_file()
    assert (tmp_path / "outputs" / "preview_Y" / "test_samples.json").is_file()
    assert len(ran) >= 8
    assert dl.load_review_file(str(tmp_path / "exports" / "user_Y.json")).num_reviews == 28
