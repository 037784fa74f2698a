"""A full disk while training ends in one line that says how to go on, and the partial checkpoint is removed."""

from __future__ import annotations

import errno
import os

import pytest

import train_distributed_MovieReview as tr
from review_lm.runs import checkpoints as ft
from tests.helpers import EXAMPLE

pytestmark = pytest.mark.slow


def test_enospc_in_the_second_checkpoint_is_one_line_with_the_resume_command(tmp_path, tiny_model, capsys,
                                                                           monkeypatch):
    import torch

    real_save = torch.save
    saves = []

    def failing_save(obj, f, *args, **kwargs):
        # optimizer.pt of the second checkpoint: the disk is full half-way through a checkpoint.
        if str(f).endswith("optimizer.pt"):
            saves.append(str(f))
            if len(saves) == 2:
                open(f, "wb").write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    code = tr.main(["--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model, "--max_epochs", "3",
                    "--warmup_steps", "0", "--report_to", "none"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    first, partial = (os.path.basename(os.path.dirname(p)) for p in saves)
    assert errors[0].startswith(f"error: saving to {out} failed: the disk is full (the run needs about ")
    assert f"last complete checkpoint: {out / first}; free space, then resume with: " in errors[0]
    assert errors[0].endswith("--resume_from_checkpoint")
    assert not (out / partial).exists()  # the interrupted checkpoint is gone, the complete one stays
    assert ft.checkpoint_problem(str(out / first)) is None
