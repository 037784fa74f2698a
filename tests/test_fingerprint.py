"""review_lm.runs.fingerprint: the data digest, the run fingerprint and its differences, and
resume_decision branch by branch. Fast: no torch import."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from review_lm.runs import fingerprint

# ==============================================================================================================
# Fingerprint
# ==============================================================================================================

def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


ARGS = {"train_ratio": 0.7, "val_ratio": 0.15, "test_ratio": 0.15, "model_path": "Qwen/Qwen2.5-3B",
        "max_length": 4096, "finetuning_type": "full", "use_profile": True, "use_history": True,
        "batch_size": 2, "gradient_accumulation_steps": 8, "learning_rate": 1e-5, "seed": 42,
        "lora_target": ("q_proj", "v_proj"),
        # dropped (may change on resume):
        "output_dir": "out", "max_epochs": 3, "logging_steps": 5, "data_file": ["a.json"], "report_to": "none"}


@pytest.fixture
def data(tmp_path):
    return [write(tmp_path / "a.json", b'{"a": 1}' * 1000), write(tmp_path / "b.json", b'{"b": 2}')]


def test_files_digest_streams_and_changes_with_one_byte(tmp_path, monkeypatch):
    big = write(tmp_path / "big.json", os.urandom(3 * fingerprint._CHUNK + 17))
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Spy(real_open(p, mode, *a, **k)))
    digest = fingerprint.files_digest([big])
    monkeypatch.undo()
    assert reads and all(n == fingerprint._CHUNK for n in reads)  # chunked, never the whole file at once
    import hashlib

    assert digest == hashlib.sha256((big.stat().st_size).to_bytes(8, "big") + big.read_bytes()).hexdigest()
    data = bytearray(big.read_bytes())
    data[12345] ^= 1
    big.write_bytes(bytes(data))
    assert fingerprint.files_digest([big]) != digest


def test_files_digest_depends_on_order_and_file_boundaries_not_names(tmp_path):
    a, b = write(tmp_path / "a", b"ab"), write(tmp_path / "b", b"c")
    a2, b2 = write(tmp_path / "a2", b"a"), write(tmp_path / "b2", b"bc")
    assert fingerprint.files_digest([a, b]) != fingerprint.files_digest([b, a])
    assert fingerprint.files_digest([a, b]) != fingerprint.files_digest([a2, b2])  # same concatenation, other split
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    copies = [shutil.copy(a, moved / "x"), shutil.copy(b, moved / "y")]
    assert fingerprint.files_digest(copies) == fingerprint.files_digest([a, b])


def test_fingerprint_is_plain_json_drops_resume_fields_and_is_stable(data):
    fp = fingerprint.run_fingerprint(ARGS, data, resolved={"world_size": 2})
    assert json.loads(json.dumps(fp)) == fp  # exactly what reads back from the run folder
    assert fp["arguments"]["lora_target"] == ["q_proj", "v_proj"]
    assert not {"output_dir", "max_epochs", "logging_steps", "data_file", "report_to"} & set(fp["arguments"])
    assert fp["data"]["files"] == [str(p) for p in data] and fp["data"]["bytes"] == sum(p.stat().st_size for p in data)
    again = fingerprint.run_fingerprint(dict(reversed(list(ARGS.items())), max_epochs=9), data,
                                        resolved={"world_size": 2})
    assert again == fp and fingerprint.fingerprint_digest(again) == fingerprint.fingerprint_digest(fp)
    assert fingerprint.fingerprint_differences(fp, again) == []
    assert len(fingerprint.fingerprint_digest(fp)) == 16


def test_one_changed_data_byte_is_named_in_the_differences(data):
    before = fingerprint.run_fingerprint(ARGS, data)
    data[1].write_bytes(b'{"b": 3}')  # same size, one byte
    after = fingerprint.run_fingerprint(ARGS, data)
    assert fingerprint.fingerprint_digest(after) != fingerprint.fingerprint_digest(before)
    assert fingerprint.fingerprint_differences(before, after) == ["--data_file content changed"]
    fewer = fingerprint.run_fingerprint(ARGS, data[:1])
    assert fingerprint.fingerprint_differences(before, fewer) == ["--data_file content changed (2 files -> 1)"]


def test_moved_data_files_with_the_same_content_are_the_same_run(tmp_path, data):
    other = tmp_path / "moved"
    other.mkdir()
    moved = [shutil.copy(p, other / p.name) for p in data]
    a, b = fingerprint.run_fingerprint(ARGS, data), fingerprint.run_fingerprint(ARGS, moved)
    assert fingerprint.fingerprint_differences(a, b) == []
    assert fingerprint.fingerprint_digest(a) == fingerprint.fingerprint_digest(b)


def test_each_kind_of_argument_difference_is_one_phrase(data):
    old = fingerprint.run_fingerprint(ARGS, data, resolved={"world_size": 2})
    new_args = {**ARGS, "max_length": 2048, "use_history": False, "lora_rank": 8, "lora_target": ["all"],
                "model_path": "x" * 80}
    del new_args["seed"]
    new = fingerprint.run_fingerprint(new_args, data, resolved={"world_size": 4})
    assert fingerprint.fingerprint_differences(old, new) == [
        "--lora_rank (unset) -> 8",
        "--lora_target q_proj v_proj -> all",
        "--max_length 4096 -> 2048",
        "--model_path Qwen/Qwen2.5-3B -> " + "x" * 57 + "...",
        "--seed 42 -> (unset)",
        "--use_history on -> off",
        "world_size 2 -> 4",
    ]
    assert fingerprint.fingerprint_differences({**old, "version": 0}, new) == [
        "run fingerprint format 0 -> 1 (cannot compare)"]


# ---- resume_decision, branch by branch -------------------------------------------------------------------------
@pytest.fixture
def fps(data):
    same = fingerprint.run_fingerprint(ARGS, data)
    return same, dict(same), fingerprint.run_fingerprint({**ARGS, "batch_size": 4, "max_length": 2048}, data)


def test_resume_without_a_recorded_fingerprint_warns(fps):
    action, message = fingerprint.resume_decision(None, fps[0], False, 3, 3, "out/x")
    assert action == "resume" and "out/x has no run fingerprint" in message


def test_resume_with_other_settings_is_refused_naming_each_difference(fps):
    action, message = fingerprint.resume_decision(fps[0], fps[2], False, 3, 3, "out/x")
    assert action == "refuse" and "\n" not in message
    assert "--batch_size 2 -> 4; --max_length 4096 -> 2048" in message and "out/x" in message


def test_a_difference_is_refused_even_when_epochs_grow_on_a_finished_run(fps):
    assert fingerprint.resume_decision(fps[0], fps[2], True, 3, 10).action == "refuse"


def test_same_run_unfinished_resumes_silently(fps):
    assert fingerprint.resume_decision(fps[0], fps[1], False, 3, 3) == ("resume", None)
    assert fingerprint.resume_decision(fps[0], fps[1], False, None, 3) == ("resume", None)  # epochs not recorded


def test_max_epochs_may_not_shrink(fps):
    action, message = fingerprint.resume_decision(fps[0], fps[1], False, 5, 3, "out/x")
    assert action == "refuse" and "may only grow" in message and "5" in message


def test_finished_run_is_refused_unless_epochs_grow(fps):
    action, message = fingerprint.resume_decision(fps[0], fps[1], True, 3, 3, "out/x")
    assert action == "refuse" and "already finished; nothing to resume" in message
    assert fingerprint.resume_decision(fps[0], fps[1], True, None, 5).action == "refuse"  # cannot tell that it grows
    action, message = fingerprint.resume_decision(fps[0], fps[1], True, 3, 5, "out/x")
    assert action == "resume" and "finished with --max_epochs 3; training on to 5 epochs" in message


def test_unfinished_run_with_more_epochs_says_so(fps):
    action, message = fingerprint.resume_decision(fps[0], fps[1], False, 3, 5)
    assert action == "resume" and "was started with --max_epochs 3; training on to 5" in message
