"""Hostile input files (issue 26): JSON nested far too deeply, lone surrogates (valid JSON, invalid Unicode) in
every text a script reads from a user's file, and files that do not belong together (a test set's two files from
two runs, a LoRA adapter given another base model, a checkpoint of another run).

Each case as a user meets it: one line ``error: ...``, exit 2, no traceback, nothing written (or the previous
state byte-identical). Output paths, ``--overwrite`` and live runs: ``test_hostile_output.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXAMPLE, REPO, clean_env, one_line_error, run_train, tree_hash

import train_distributed_MovieReview as tr
from review_lm.data.reviews import (
    MAX_JSON_DEPTH,
    ReviewDataError,
    find_lone_surrogate,
    load_review_file,
    nested_too_deeply,
    read_json_file,
)
from review_lm.inference import model_loading
from review_lm.runs import fingerprint, restart, test_set
from review_lm.runs import run_folder as rf
from review_lm.utils import UsageError

BOMB = "[" * 100_000 + "]" * 100_000  # a few hundred KB: a RecursionError traceback before this change
SURROGATE = "好看\ud800"  # json.dumps writes it as the escape \ud800: valid JSON, not valid Unicode


def script(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / name), *args], capture_output=True, text=True, timeout=180,
                          env=clean_env(), cwd=str(cwd or REPO), stdin=subprocess.DEVNULL)


def example_users() -> list[dict]:
    data = json.loads(Path(EXAMPLE).read_text(encoding="utf-8"))
    return data if isinstance(data, list) else [data]


def hostile_reviews(path: Path, field: str = "continuation", record: int = 3) -> str:
    """The example file with a lone surrogate in one field of one record (or the user's name / description)."""
    users = example_users()
    if field == "name":
        users[0]["user"]["profile"]["name"] = SURROGATE
    elif field == "description":
        users[0]["task"]["description"] = SURROGATE
    else:
        users[0]["task"]["task_behavior_collections"][0]["data"][record][field] = SURROGATE
    path.write_text(json.dumps(users), encoding="utf-8")  # ensure_ascii: the surrogate as an escape
    return str(path)


@pytest.fixture
def run_copy(preview_run, tmp_path) -> Path:
    return Path(shutil.copytree(preview_run, tmp_path / "run"))


def fake_finished_run(folder: Path, data_file: str = EXAMPLE) -> Path:
    """Just enough of a finished run for generate_review's input checks: its record."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / rf.RUN_RECORD).write_text(json.dumps({"arguments": {"data_file": [data_file]}}), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------------------------
# The shared reader: depth and Unicode
# --------------------------------------------------------------------------------------------------------------
def test_depth_prescan_counts_brackets_outside_strings_only():
    assert nested_too_deeply(BOMB.encode())
    deep_ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert not nested_too_deeply(deep_ok.encode())
    assert nested_too_deeply(("[" + deep_ok + "]").encode())
    in_string = json.dumps({"text": "[" * 500 + "{" * 500, "q": 'a \\" [[[[ "'}).encode()
    assert not nested_too_deeply(in_string)
    assert not nested_too_deeply(b'[{"a": [1, 2' * 10)  # unbalanced but shallow: json.loads names the position
    assert nested_too_deeply(b"[" * 200)  # a truncated bomb is still a bomb
    escaped = b'{"a": "x\\\\", "b": ' + b"[" * 70 + b"]" * 70 + b"}"  # a string ending in a backslash
    assert nested_too_deeply(escaped)
    assert not nested_too_deeply(b'{"a": "x\\\\\\" ' + b"[" * 70 + b'"}')  # \\ then \" : still in the string
    assert not nested_too_deeply(Path(EXAMPLE).read_bytes())


def test_paired_surrogate_escapes_are_valid_text_and_lone_ones_are_found(tmp_path):
    users = example_users()
    users[0]["task"]["task_behavior_collections"][0]["data"][0]["continuation"] = "笑哭了😂"
    ok = tmp_path / "emoji.json"
    ok.write_text(json.dumps(users), encoding="utf-8")  # 😂 written as the pair \ud83d\ude02
    assert any(r.text == "笑哭了😂" for r in load_review_file(str(ok)).users[0].reviews)
    assert find_lone_surrogate({"a": ["x", {"b": SURROGATE}]})[0] == ["a", 1, "b"]
    assert find_lone_surrogate({"\udc80": 1})[0] == ["\udc80"]
    assert find_lone_surrogate(["fine", {"k": "😂"}]) is None


@pytest.mark.parametrize("field, named", [
    ("continuation", "user #0 (Y): record #3: 'continuation'"),
    ("continuation_prefix", "user #0 (Y): record #3: 'continuation_prefix'"),
    ("name", "user #0: 'user.profile.name'"),
    ("description", "user #0 (Y): 'task.description'"),
])
def test_lone_surrogate_in_a_review_file_names_file_user_record_and_field(tmp_path, field, named):
    path = hostile_reviews(tmp_path / "bad.json", field)
    with pytest.raises(ReviewDataError) as err:
        load_review_file(path)
    assert str(err.value).startswith(f"{path}: {named} is not valid Unicode: a lone surrogate \\ud800")


def test_lone_surrogate_in_any_json_file_is_named_by_its_path(tmp_path):
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"arguments": {"model_path": SURROGATE}}), encoding="utf-8")
    with pytest.raises(ReviewDataError, match=r"record.json: arguments.model_path: not valid Unicode"):
        read_json_file(str(path))


def test_other_json_files_read_by_the_scripts_are_bounded_too(tmp_path):
    from review_lm.runs import checkpoints
    from review_lm.training import sharding

    bomb = tmp_path / "ds.json"
    bomb.write_text(BOMB)
    with pytest.raises(UsageError, match=r"^--deepspeed .*ds.json: not valid JSON \(nested too deeply"):
        sharding.load_deepspeed_config(str(bomb))
    assert rf.read_record(str(bomb)) is None  # lock holder, launch marker, fingerprint: unreadable, not a crash
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / rf.TRAINER_STATE).write_text(BOMB)
    assert checkpoints.checkpoint_problem(str(checkpoint)) == f"{rf.TRAINER_STATE} is truncated or unreadable"


# --------------------------------------------------------------------------------------------------------------
# The scripts: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------------------
def test_loader_cli_names_the_surrogate_and_the_bomb(tmp_path):
    bad = hostile_reviews(tmp_path / "bad.json")
    line = one_line_error(script("data_loader_movie_review.py", bad))
    assert line == (f"error: {bad}: user #0 (Y): record #3: 'continuation' is not valid Unicode: a lone surrogate "
                    "\\ud800 at character 2 (an unpaired \\ud800-\\udfff escape); fix or remove it")
    bomb = tmp_path / "bomb.json"
    bomb.write_text(BOMB)
    assert one_line_error(script("data_loader_movie_review.py", str(bomb))).endswith("nested too deeply (more than "
                                                                                     "64 levels of [ and {); no valid "
                                                                                     "file nests that deep")


@pytest.mark.parametrize("kind", ["surrogate", "bomb"])
def test_train_refuses_hostile_data_and_leaves_no_run_folder(tmp_path, tiny_model, kind):
    if kind == "bomb":
        (tmp_path / "bad.json").write_text(BOMB)
        data = str(tmp_path / "bad.json")
    else:
        data = hostile_reviews(tmp_path / "bad.json")
    out = tmp_path / "out"
    line = one_line_error(run_train("--data_file", data, "--output_dir", str(out), "--model_path", tiny_model,
                                    "--report_to", "none"))
    assert data in line and ("nested too deeply" in line if kind == "bomb" else "'continuation'" in line)
    assert not out.exists()


def test_generate_refuses_hostile_data_file_and_run_record(tmp_path):
    run = fake_finished_run(tmp_path / "run")
    bomb = tmp_path / "bomb.json"
    bomb.write_text(BOMB)
    line = one_line_error(script("generate_review.py", "--model_dir", str(run), "--data_file", str(bomb),
                                 "--movie", "流浪地球"))
    assert line.endswith("nested too deeply (more than 64 levels of [ and {); no valid file nests that deep")
    bad = hostile_reviews(tmp_path / "bad.json")
    assert "record #3: 'continuation' is not valid Unicode" in one_line_error(
        script("generate_review.py", "--model_dir", str(run), "--data_file", bad, "--movie", "流浪地球"))
    (run / rf.RUN_RECORD).write_text('{"arguments": ' + BOMB + "}")
    assert "training_config.json: nested too deeply" in one_line_error(
        script("generate_review.py", "--model_dir", str(run), "--movie", "流浪地球"))
    (run / rf.RUN_RECORD).write_text(json.dumps({"arguments": {"data_file": [EXAMPLE], "model_path": SURROGATE}}))
    assert "training_config.json: arguments.model_path: not valid Unicode" in one_line_error(
        script("generate_review.py", "--model_dir", str(run), "--movie", "流浪地球"))


def test_evaluate_names_a_lone_surrogate_in_each_test_file_and_the_style_pool(run_copy, tmp_path):
    samples_file, histories_file = run_copy / rf.TEST_SAMPLES, run_copy / rf.TEST_HISTORIES
    pool = hostile_reviews(tmp_path / "pool.json", record=5)
    args = ("--baselines_only", "--test_file", str(samples_file), "--output_dir", str(tmp_path / "e"))
    line = one_line_error(script("evaluate_movie_review.py", *args, "--style_pool", pool))
    assert line.startswith(f"error: --style_pool: {pool}: user #0 (Y): record #5: 'continuation' is not valid")

    samples = json.loads(samples_file.read_text(encoding="utf-8"))
    samples[1]["reference"] = SURROGATE
    samples_file.write_text(json.dumps(samples), encoding="utf-8")
    line = one_line_error(script("evaluate_movie_review.py", *args))
    assert line.startswith(f"error: {samples_file}: sample #1 (user 0 Y), field 'reference': not valid Unicode")

    samples[1]["reference"] = "好看"
    samples_file.write_text(json.dumps(samples), encoding="utf-8")
    histories = json.loads(histories_file.read_text(encoding="utf-8"))
    histories["users"][0]["reviews"][2] = SURROGATE
    histories_file.write_text(json.dumps(histories), encoding="utf-8")
    line = one_line_error(script("evaluate_movie_review.py", *args))
    assert line.startswith(f"error: {histories_file}: user entry #0 (user 0), field 'reviews[2]': not valid Unicode")
    assert not (tmp_path / "e").exists()


def test_generate_refuses_a_movie_name_that_is_not_text(tmp_path):
    run = fake_finished_run(tmp_path / "run")
    line = one_line_error(subprocess.run(
        [sys.executable, str(REPO / "generate_review.py"), "--model_dir", str(run), b"--movie",
         b"\xff\xfe"], capture_output=True, text=True, timeout=120, env=clean_env(), cwd=str(REPO)))
    assert "not valid text (bytes that are not UTF-8)" in line


# --------------------------------------------------------------------------------------------------------------
# Files that do not belong together
# --------------------------------------------------------------------------------------------------------------
def test_test_files_carry_the_run_digest_and_a_mix_up_is_one_line(run_copy, tmp_path, tiny_model):
    samples = json.loads((run_copy / rf.TEST_SAMPLES).read_text(encoding="utf-8"))
    histories = json.loads((run_copy / rf.TEST_HISTORIES).read_text(encoding="utf-8"))
    digest = histories[test_set.RUN_DIGEST_KEY]
    assert len(digest) == 16 and {s[test_set.RUN_DIGEST_KEY] for s in samples} == {digest}
    other = tmp_path / "other"  # the same users, another run (another seed)
    assert tr.main(["--data_file", EXAMPLE, "--output_dir", str(other), "--model_path", tiny_model, "--report_to",
                    "none", "--preview_only", "--seed", "7"]) == 0
    shutil.copy(other / rf.TEST_HISTORIES, run_copy / rf.TEST_HISTORIES)
    out = tmp_path / "e"
    line = one_line_error(script("evaluate_movie_review.py", "--baselines_only", "--model_dir", str(run_copy),
                                 "--output_dir", str(out)))
    assert line.startswith(f"error: {run_copy / rf.TEST_SAMPLES} and {run_copy / rf.TEST_HISTORIES} come from "
                           "different runs (run_digest ")
    assert not out.exists()
    # Files written before the digest existed carry none: they still read.
    for s in samples:
        del s[test_set.RUN_DIGEST_KEY]
    (run_copy / rf.TEST_SAMPLES).write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    assert test_set.load_test_samples(str(run_copy / rf.TEST_SAMPLES)).histories is not None
    samples[0][test_set.RUN_DIGEST_KEY] = "0123456789abcdef"
    samples[1][test_set.RUN_DIGEST_KEY] = "fedcba9876543210"
    (run_copy / rf.TEST_SAMPLES).write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UsageError, match="its samples come from 2 different runs"):
        test_set.load_test_samples(str(run_copy / rf.TEST_SAMPLES))


def fake_adapter_run(folder: Path, base: str) -> Path:
    """A LoRA run as far as the input checks see it: record, adapter config, test samples (no weights)."""
    fake_finished_run(folder)
    (folder / rf.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    (folder / rf.ADAPTER_WEIGHTS).write_bytes(b"")
    return folder


def other_base(tiny_model: str, folder: Path, **changes) -> str:
    folder.mkdir()
    config = json.loads((Path(tiny_model) / rf.CONFIG).read_text())
    (folder / rf.CONFIG).write_text(json.dumps({**config, **changes}))
    return str(folder)


def test_lora_base_model_of_another_architecture_is_refused_and_a_moved_one_noted(tmp_path, tiny_model, run_copy):
    run = fake_adapter_run(tmp_path / "lora", tiny_model)
    bigger = other_base(tiny_model, tmp_path / "bigger", hidden_size=128, vocab_size=2000)
    line = one_line_error(script("generate_review.py", "--model_dir", str(run), "--base_model", bigger,
                                 "--movie", "流浪地球"))
    assert line == (f"error: --base_model {bigger} is not the model the adapter in {run} was trained on "
                    f"({tiny_model}): hidden_size 64 -> 128; vocab_size 1000 -> 2000; pass that model (or one of "
                    "the same architecture)")
    shutil.copy(run / rf.ADAPTER_CONFIG, run_copy / rf.ADAPTER_CONFIG)  # evaluate refuses it too, before loading
    (run_copy / rf.ADAPTER_WEIGHTS).write_bytes(b"")
    before = tree_hash(run_copy)
    line = one_line_error(script("evaluate_movie_review.py", "--model_dir", str(run_copy), "--base_model", bigger))
    assert "is not the model the adapter in" in line and tree_hash(run_copy) == before

    moved = other_base(tiny_model, tmp_path / "moved")
    note = model_loading.check_base_model(str(run), moved)
    assert note == (f"--base_model {moved} replaces the adapter's recorded base {tiny_model} (same architecture: "
                    "qwen2, hidden_size 64, vocab_size 1000)")
    assert model_loading.check_base_model(str(run), tiny_model) is None
    assert model_loading.check_base_model(str(run), None) is None
    assert model_loading.config_differences({"model_type": "qwen2"}, {"model_type": "llama"}) == \
        ["model_type 'qwen2' -> 'llama'"]


def test_a_moved_base_is_checked_against_the_adapters_weight_shapes(tmp_path, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(run))
    assert model_loading.adapter_weight_facts(str(run)) == {"hidden_size": 64, "layers": 2}
    config = json.loads((run / rf.ADAPTER_CONFIG).read_text())
    (run / rf.ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    wider = other_base(tiny_model, tmp_path / "wider", hidden_size=96)
    with pytest.raises(UsageError, match=r"its LoRA weights take hidden_size 64, the model has 96; pass that model"):
        model_loading.check_base_model(str(run), wider)
    shallower = other_base(tiny_model, tmp_path / "shallower", num_hidden_layers=1)
    with pytest.raises(UsageError, match=r"its LoRA weights reach layer 1, the model has 1 layers"):
        model_loading.check_base_model(str(run), shallower)
    assert "which is not here to compare with; the adapter's weight shapes fit it" in \
        model_loading.check_base_model(str(run), tiny_model)


def test_a_checkpoint_outside_the_run_folder_resumes_only_the_same_run(tmp_path):
    args = tr.parse_args(["--data_file", EXAMPLE, "--output_dir", str(tmp_path / "new"), "--model_path", "m"])
    current = fingerprint.current_fingerprint(args, 1)
    other_run = tmp_path / "other"
    (other_run / "checkpoint-4").mkdir(parents=True)
    checkpoint = str(other_run / "checkpoint-4")
    with pytest.raises(UsageError, match=r"it is outside --output_dir and .*other has no run_fingerprint.json"):
        restart.check_foreign_checkpoint(checkpoint, str(tmp_path / "new"), current)
    changed = fingerprint.current_fingerprint(tr.parse_args([*sys_args(args), "--learning_rate", "0.1"]), 1)
    fingerprint.write_fingerprint(str(other_run), changed, 3)
    with pytest.raises(UsageError, match=r"it belongs to another run \(.*--learning_rate 0.1 -> 1e-05\)"):
        restart.check_foreign_checkpoint(checkpoint, str(tmp_path / "new"), current)
    fingerprint.write_fingerprint(str(other_run), current, 3)
    restart.check_foreign_checkpoint(checkpoint, str(tmp_path / "new"), current)  # the same run: fine
    restart.check_foreign_checkpoint(str(tmp_path / "new" / "checkpoint-2"), str(tmp_path / "new"), {})  # inside
    restart.check_foreign_checkpoint("latest", str(tmp_path / "new"), {})


def sys_args(args) -> list[str]:
    return ["--data_file", *args.data_file, "--output_dir", args.output_dir, "--model_path", args.model_path]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """One short training run with a checkpoint (shared by the slow tests of this module)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model, "--max_epochs",
                     "1", "--warmup_steps", "0", "--report_to", "none", "--keep_checkpoints", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_train_refuses_another_runs_checkpoint_and_writes_nothing(trained_run, tmp_path, tiny_model):
    checkpoint = rf.checkpoint_names(str(trained_run))[-1]
    before = tree_hash(trained_run)
    out = tmp_path / "continued"
    line = one_line_error(run_train("--data_file", EXAMPLE, "--output_dir", str(out), "--model_path", tiny_model,
                                    "--max_epochs", "2", "--warmup_steps", "0", "--report_to", "none",
                                    "--learning_rate", "3e-4", "--resume_from_checkpoint",
                                    str(trained_run / checkpoint)))
    assert f"--resume_from_checkpoint {trained_run / checkpoint}: it belongs to another run" in line
    assert "--learning_rate 1e-05 -> 0.0003" in line
    assert not out.exists() and tree_hash(trained_run) == before
