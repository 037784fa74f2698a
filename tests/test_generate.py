"""Tests for generate_review.py and the data loader's new-review prompt (encode_new_review).

The prompt is checked against an independent construction: the same film appended to the user's data as a real
review after their last one, loaded and rendered by the training path. Generation runs on one real short
training run (tiny random Qwen2, byte-level BPE, 2 users) and on a hand-assembled run whose random model has an
untied output layer (a tied random model only repeats the prompt's final newline, so greedy reviews would be
empty and prove little).
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data_loader_movie_review as dl
import generate_review as gr
from review_lm.data import datasets as rd
from review_lm.inference import model_loading
from review_lm.runs import run_folder as rf
from tests.helpers import clean_env, one_line_error, run_train

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "generate_review.py")
MOVIE = "流浪地球"


# --------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------------------------
def example_users(example_data_file: Path) -> list[dict]:
    return json.loads(example_data_file.read_text(encoding="utf-8"))


def second_user() -> dict:
    data = [{"context": [], "continuation": text, "continuation_prefix": f"{movie}: ", "timestamp": day}
            for movie, day, text in [("霸王别姬", "2012-02-02", "不疯魔不成活。"),
                                     ("活着", "2012-03-03", "福贵一家，看得人喘不过气。"),
                                     ("大话西游", "2012-04-04", "曾经有一份真挚的感情摆在我面前。"),
                                     ("阳光灿烂的日子", "2012-05-05", "夏天，屋顶，米兰。"),
                                     ("流浪地球", "2019-02-10", "中国科幻元年，特效不输好莱坞。"),
                                     ("无间道", "2012-06-06", "出来混，迟早要还的。")]]
    return {"user": {"profile": {"name": "Z"}},
            "task": {"description": "基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式",
                     "task_behavior_collections": [{"type": "movie_review", "data": data}]}}


def with_new_review(users: list[dict], user_name: str, movie: str, path: Path) -> dl.Sample:
    """The training path's own sample for ``movie`` written after the user's last review: the film appended to
    the file as a real (later) review, loaded, and taken as that user's newest sample."""
    users = copy.deepcopy(users)
    entry = next(u for u in users if u["user"]["profile"]["name"] == user_name)
    entry["task"]["task_behavior_collections"][0]["data"].append(
        {"context": [], "continuation": "一条以后才写的影评", "continuation_prefix": f"{movie}: ",
         "timestamp": "2099-01-01"})
    path.write_text(json.dumps(users, ensure_ascii=False), encoding="utf-8")
    user = next(u for u in dl.load_review_file(str(path)).users if u.name == user_name)
    return dl.Sample(user, len(user.reviews) - 1, "test")


def fitting_history(tokenizer, builder: dl.PromptBuilder, sample: dl.Sample, max_length: int,
                    max_new_tokens: int) -> int:
    """By brute force on the rendered text: the most recent history that leaves room for the review."""
    best = 0
    for k in range(len(sample.history) + 1):
        ids = tokenizer(builder.render(sample, k), add_special_tokens=False)["input_ids"]
        if len(ids) + max_new_tokens <= max_length:
            best = k
    return best


@pytest.fixture(scope="module")
def two_users(example_data_file) -> list[dict]:
    return [*example_users(example_data_file), second_user()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, two_users) -> Path:
    """One real (1-epoch) training run on a 2-user file, started from its own folder with a relative path."""
    from review_lm.testing.tiny_model import make_tiny_model

    work = tmp_path_factory.mktemp("train")
    (work / "reviews.json").write_text(json.dumps(two_users, ensure_ascii=False), encoding="utf-8")
    model = make_tiny_model(str(work / "tiny"), tokenizer_kind="bpe", corpus=[str(work / "reviews.json")],
                            vocab_size=1000)
    proc = run_train("--data_file", "reviews.json", "--output_dir", "run", "--model_path", model,
                     "--max_epochs", "1", "--warmup_steps", "0", "--max_length", "400", "--report_to", "none",
                     cwd=str(work))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory, trained_run) -> Path:
    """A run folder assembled by hand: an untied random model (model.safetensors), the trained run's tokenizer
    and training_config.json with the data path made absolute."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("hand_run")
    config = AutoConfig.from_pretrained(str(trained_run))
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(trained_run)).save_pretrained(str(out))
    run_config = json.loads((trained_run / "training_config.json").read_text(encoding="utf-8"))
    run_config["arguments"]["data_file"] = str(trained_run.parent / "reviews.json")
    (out / "training_config.json").write_text(json.dumps(run_config, ensure_ascii=False), encoding="utf-8")
    return out


def generate(capsys, *args: str) -> tuple[int, str, str]:
    rc = gr.main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def generate_json(capsys, *args: str) -> list[dict]:
    rc, out, err = generate(capsys, *args, "--json")
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


def cli(*args: str, cwd: Path = REPO, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          cwd=str(cwd), env=clean_env(), input=stdin if stdin is not None else "")


# --------------------------------------------------------------------------------------------------------------
# The prompt (data loader): equal to training's prompt for a review placed after the user's last one
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_profile, use_history", [(True, True), (True, False), (False, True), (False, False)])
def test_prompt_equals_the_training_prompt_of_a_review_after_the_last(example_data_file, bpe_tokenizer, tmp_path,
                                                                      use_profile, use_history):
    builder = dl.PromptBuilder(use_profile, use_history)
    user = dl.load_review_file(str(example_data_file)).users[0]
    expected = with_new_review(example_users(example_data_file), "Y", MOVIE, tmp_path / "later.json")
    enc = rd.encode_new_review(bpe_tokenizer, user, MOVIE, builder, None, 64)
    assert enc.prompt == builder.render(expected)
    assert enc.history_count == (28 if use_history else 0)
    # The ids fed to the model are the prompt's own tokens, nothing after them (no EOS, no target).
    assert enc.input_ids[:enc.prompt_length] == bpe_tokenizer(enc.prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("max_length, max_new_tokens", [(560, 64), (400, 32), (300, 100), (200, 100)])
def test_budget_keeps_the_newest_history_that_leaves_room_for_the_review(example_data_file, bpe_tokenizer, tmp_path,
                                                                         max_length, max_new_tokens):
    builder = dl.PromptBuilder()
    user = dl.load_review_file(str(example_data_file)).users[0]
    expected = with_new_review(example_users(example_data_file), "Y", MOVIE, tmp_path / "later.json")
    keep = fitting_history(bpe_tokenizer, builder, expected, max_length, max_new_tokens)
    assert 0 < keep < 28  # the budget drops old history but keeps some
    enc = rd.encode_new_review(bpe_tokenizer, user, MOVIE, builder, max_length, max_new_tokens)
    assert (enc.history_count, enc.prompt) == (keep, builder.render(expected, keep))
    assert enc.prompt_length + max_new_tokens <= max_length


def test_budget_without_room_for_the_prompt_is_a_clear_error(example_data_file, bpe_tokenizer):
    user = dl.load_review_file(str(example_data_file)).users[0]
    with pytest.raises(dl.ReviewDataError) as err:
        rd.encode_new_review(bpe_tokenizer, user, MOVIE, dl.PromptBuilder(), 60, 40)
    message = str(err.value)
    assert message.startswith("--max_length 60: user #0 (Y): leaves no room") and "--max_new_tokens 40" in message


def test_new_review_sample_keeps_a_film_already_reviewed_in_the_history(example_data_file):
    user = dl.load_review_file(str(example_data_file)).users[0]
    reviews_before = list(user.reviews)
    seen = user.reviews[5]
    sample = dl.new_review_sample(user, seen.movie)
    assert sample.history == reviews_before and sample.target.movie == seen.movie
    assert user.reviews == reviews_before  # the user object is not changed
    assert f"  电影《{seen.movie}》:" in dl.PromptBuilder().render(sample)


# --------------------------------------------------------------------------------------------------------------
# Pure helpers of the script
# --------------------------------------------------------------------------------------------------------------
def test_movie_names_are_cleaned_or_refused():
    assert gr.clean_movie_name("  流浪地球 ") == "流浪地球"
    assert gr.clean_movie_name("《流浪地球》") == "流浪地球"
    assert gr.clean_movie_name("你的名字。") == "你的名字。"
    assert gr.clean_movie_name("流浪\n地球") == "流浪 地球"  # folded as the loader folds titles
    for bad in ("", "   ", "《》", "\n"):
        with pytest.raises(gr.UsageError):
            gr.clean_movie_name(bad)


def test_user_choice_names_the_users_and_shortens_long_lists():
    users = [dl.UserHistory(i, f"u{i}", "d", []) for i in range(15)]
    assert gr.pick_user(users, "u7", "f.json") is users[7]
    assert gr.pick_user(users[:1], None, "f.json") is users[0]
    with pytest.raises(gr.UsageError, match=r"^f.json holds 15 users; pick one with --user NAME: u0, u1, .*, u9, "
                                            r"\.\.\. \(5 more\)$"):
        gr.pick_user(users, None, "f.json")
    with pytest.raises(gr.UsageError, match=r"^--user nobody: no such user in f.json; available: u0, u1, u2$"):
        gr.pick_user(users[:3], "nobody", "f.json")


def test_data_files_list_or_string_resolved_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("[]", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    def record(files, recorded_abs):
        return rf.RunRecord("run/training_config.json", True, True, 400, files, recorded_abs, {}, {})

    for recorded in ("a.json", ["a.json"]):
        assert gr.resolve_data_files(None, record(rf._path_list(recorded), []), "run") == ["a.json"]
    moved = record(["gone.json"], [str(tmp_path / "a.json")])
    assert gr.resolve_data_files(None, moved, "run") == [str(tmp_path / "a.json")]  # the recorded absolute path
    with pytest.raises(gr.UsageError, match=r"training data gone.json .* pass --data_file PATH$"):
        gr.resolve_data_files(None, record(["gone.json"], []), "run")


# --------------------------------------------------------------------------------------------------------------
# The script on a real training run
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_prompt_is_the_training_prompt_under_the_runs_budget(trained_run, two_users, tmp_path, capsys):
    from transformers import AutoTokenizer

    [row] = generate_json(capsys, "--model_dir", str(trained_run), "--user", "Y", "--movie", MOVIE,
                          "--max_new_tokens", "40", "--seed", "3")
    expected = with_new_review(two_users, "Y", MOVIE, tmp_path / "later.json")
    tokenizer = AutoTokenizer.from_pretrained(str(trained_run))
    keep = fitting_history(tokenizer, dl.PromptBuilder(), expected, 400, 40)  # the run's --max_length 400
    assert 0 < keep < 28
    assert row["prompt"] == dl.PromptBuilder().render(expected, keep)
    assert (row["history_count"], row["history_total"]) == (keep, 28)


@pytest.mark.slow
def test_json_holds_the_runs_settings_and_sampling_repeats_with_its_seed(trained_run, capsys):
    common = ("--model_dir", str(trained_run), "--user", "Y", "--movie", MOVIE, "--max_new_tokens", "12")
    first = generate_json(capsys, *common, "--seed", "5", "--num_samples", "2", "--temperature", "1.3")
    again = generate_json(capsys, *common, "--seed", "5", "--num_samples", "2", "--temperature", "1.3")
    shifted = generate_json(capsys, *common, "--seed", "6", "--temperature", "1.3")
    assert [r["review"] for r in first] == [r["review"] for r in again]
    assert first[1]["review"] == shifted[0]["review"]  # review k of a film uses seed + k
    assert first[0]["review"] != first[1]["review"]
    settings = first[1]["settings"]
    assert {k: settings[k] for k in ("use_profile", "use_history", "max_length", "max_new_tokens", "do_sample",
                                     "temperature", "top_p", "seed", "model_kind", "device", "dtype")} == {
        "use_profile": True, "use_history": True, "max_length": 400, "max_new_tokens": 12, "do_sample": True,
        "temperature": 1.3, "top_p": 0.9, "seed": 6, "model_kind": "full", "device": "cpu", "dtype": "fp32"}
    assert [(r["user"], r["movie"], r["sample"]) for r in first] == [("Y", MOVIE, 1), ("Y", MOVIE, 2)]
    assert first[0]["already_reviewed"] is None


@pytest.mark.slow
def test_several_users_need_user_and_each_gets_their_own_history(trained_run, capsys):
    rc, _, err = generate(capsys, "--model_dir", str(trained_run), "--movie", MOVIE)
    assert rc == 2 and err.strip().endswith("holds 2 users; pick one with --user NAME: Y, Z")
    rc, _, err = generate(capsys, "--model_dir", str(trained_run), "--movie", MOVIE, "--user", "W")
    assert rc == 2 and err.strip().endswith("; available: Y, Z") and err.count("\n") == 1
    [row] = generate_json(capsys, "--model_dir", str(trained_run), "--movie", f"《{MOVIE}》", "--user", "Z",
                          "--max_new_tokens", "4")
    assert row["user"] == "Z" and row["prompt"].startswith("用户: Z\n") and "不疯魔不成活。" in row["prompt"]
    assert row["already_reviewed"] == {"timestamp": "2019-02-10", "review": "中国科幻元年，特效不输好莱坞。"}
    assert row["prompt"].endswith(f"请为电影《{MOVIE}》写一条影评：\n")


@pytest.mark.slow
def test_text_output_notes_a_film_already_reviewed_and_shows_the_prompt(trained_run, capsys):
    rc, out, err = generate(capsys, "--model_dir", str(trained_run), "--user", "Z", "--movie", MOVIE,
                            "--show_prompt", "--max_new_tokens", "4", "--seed", "1")
    assert rc == 0
    assert out.startswith(f"===== 电影《{MOVIE}》 · Z · 历史 6/6 条 =====\n----- 输入 (prompt, ")
    assert "\n----- 影评 1/1 -----\n" in out and "请为电影《流浪地球》写一条影评：\n" in out
    assert "loaded full model (cpu, fp32); user Z (6 reviews)" in err
    assert "note: Z already reviewed 《流浪地球》 on 2019-02-10;" in err


@pytest.mark.slow
def test_stream_to_a_terminal_prints_the_same_review(hand_run, capsys, monkeypatch):
    args = ("--model_dir", str(hand_run), "--user", "Y", "--movie", MOVIE, "--max_new_tokens", "12", "--seed", "2")
    rc, plain, _ = generate(capsys, *args)
    monkeypatch.setattr(gr, "stdout_is_terminal", lambda: True)
    streamed_writes = []
    monkeypatch.setattr(gr, "ReviewWriter", _recording_writer(gr.ReviewWriter, streamed_writes))
    rc2, streamed, _ = generate(capsys, *args)
    assert rc == rc2 == 0 and streamed_writes == [True]
    review = plain.splitlines()[1]
    assert review and streamed.splitlines()[0] == plain.splitlines()[0]
    assert "".join(streamed.splitlines()[1:]).strip() == review


def _recording_writer(cls, calls: list):
    class Recording(cls):
        def write(self, prompt_ids, sample_index, stream):
            calls.append(stream)
            return super().write(prompt_ids, sample_index, stream)

    return Recording


# --------------------------------------------------------------------------------------------------------------
# Greedy decoding, interactive mode, adapter runs
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_is_deterministic_and_equals_plain_generate(hand_run, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ("--model_dir", str(hand_run), "--user", "Y", "--movie", MOVIE, "--greedy", "--max_new_tokens", "10")
    [first], [second] = generate_json(capsys, *args), generate_json(capsys, *args)
    assert first["review"] == second["review"] != ""
    assert first["settings"]["do_sample"] is False and first["settings"]["seed"] is None

    tokenizer = AutoTokenizer.from_pretrained(str(hand_run))
    model = AutoModelForCausalLM.from_pretrained(str(hand_run))
    ids = torch.tensor([tokenizer(first["prompt"], add_special_tokens=False)["input_ids"]])
    new = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert first["review"] == tokenizer.decode(new, skip_special_tokens=True).strip()
    assert first["new_tokens"] == len(new)


@pytest.mark.slow
def test_interactive_reads_films_until_an_empty_line_with_one_model_load(hand_run, capsys, monkeypatch):
    loads = []
    real_load = model_loading.load_model_and_tokenizer
    monkeypatch.setattr(model_loading, "load_model_and_tokenizer",
                        lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{MOVIE}\n《》\n  爱乐之城 \n\n不会读到这里\n"))
    rows = generate_json(capsys, "--model_dir", str(hand_run), "--user", "Y", "--interactive", "--greedy",
                         "--max_new_tokens", "4")
    assert [r["movie"] for r in rows] == [MOVIE, "爱乐之城"] and len(loads) == 1
    # Ctrl-D (end of input) quits as well; --movie films come first.
    monkeypatch.setattr(sys, "stdin", io.StringIO("爱乐之城"))
    rc, out, err = generate(capsys, "--model_dir", str(hand_run), "--user", "Y", "--interactive", "--movie", MOVIE,
                            "--greedy", "--max_new_tokens", "4")
    headers = [line for line in out.splitlines() if line.startswith("=====")]
    assert rc == 0 and [h.split(" · ")[0] for h in headers] == [f"===== 电影《{MOVIE}》", "===== 电影《爱乐之城》"]


@pytest.mark.slow
def test_interactive_as_a_process_reports_a_bad_name_and_goes_on(hand_run):
    proc = cli("--model_dir", str(hand_run), "--user", "Y", "--interactive", "--greedy", "--max_new_tokens", "3",
               "--json", stdin=f"《》\n{MOVIE}\n")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["movie"] for line in proc.stdout.splitlines()] == [MOVIE]
    assert "error: --movie '《》\\n': empty movie name" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside get_peft_model
def test_a_lora_adapter_run_generates_through_peft(hand_run, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter_run = tmp_path / "lora_run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hand_run)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(str(adapter_run))
    for name in ("tokenizer.json", "tokenizer_config.json", "training_config.json"):
        shutil.copy(hand_run / name, adapter_run)
    args = ("--model_dir", str(adapter_run), "--user", "Y", "--movie", MOVIE, "--greedy", "--max_new_tokens", "6")
    [row] = generate_json(capsys, *args)
    [full] = generate_json(capsys, "--model_dir", str(hand_run), *args[2:])
    assert row["settings"]["model_kind"] == "lora-adapter" and row["settings"]["base_model"] == str(hand_run)
    assert row["prompt"] == full["prompt"]
    rc, _, err = generate(capsys, *args)
    assert rc == 0 and f"loaded LoRA adapter on base model {hand_run} (cpu, fp32)" in err


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before the model loads
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_or_unfinished_run_folder(tmp_path):
    assert "no such folder" in one_line_error(cli("--model_dir", str(tmp_path / "nope"), "--movie", MOVIE))
    (tmp_path / "checkpoint-2").mkdir()
    assert "unfinished training run (checkpoints but no training_config.json)" in one_line_error(
        cli("--model_dir", str(tmp_path), "--movie", MOVIE))
    (tmp_path / "checkpoint-2").rmdir()
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert one_line_error(cli("--model_dir", str(tmp_path), "--movie", MOVIE)).endswith(
        "no training_config.json, not a finished training run")


def _config_only_run(tmp_path: Path, trained_run: Path, data_file) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((trained_run / "training_config.json").read_text(encoding="utf-8"))
    config["arguments"]["data_file"] = data_file
    config["data"]["file"] = str(tmp_path / "moved.json")
    config["data"]["files"] = [str(tmp_path / "moved.json")]
    (run / "training_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return run


@pytest.mark.slow
def test_bad_input_is_one_line_with_exit_2(trained_run, tmp_path):
    run = str(trained_run)
    cases = [
        (("--model_dir", run, "--user", "Y", "--movie", "  "), "--movie '  ': empty movie name"),
        (("--model_dir", run, "--movie", MOVIE, "--user", "nobody"), "available: Y, Z"),
        (("--model_dir", run, "--movie", MOVIE, "--data_file", "nope.json"), "--data_file nope.json: no such file"),
        (("--model_dir", run, "--user", "Y", "--movie", MOVIE, "--max_new_tokens", "400"),
         "leaves no room for the prompt within the run's --max_length 400"),
        (("--model_dir", str(_config_only_run(tmp_path, trained_run, ["gone/reviews.json"])), "--movie", MOVIE),
         "training data gone/reviews.json (from"),
    ]
    for args, message in cases:
        line = one_line_error(cli(*args))
        assert message in line, (args, line)
    assert one_line_error(cli(*cases[-1][0])).endswith("pass --data_file PATH")


@pytest.mark.slow
def test_the_run_is_found_from_the_training_folder_or_by_its_recorded_path(trained_run, capsys, monkeypatch):
    args = ("--user", "Z", "--movie", MOVIE, "--greedy", "--max_new_tokens", "2")
    [from_elsewhere] = generate_json(capsys, "--model_dir", str(trained_run), *args)  # the recorded absolute path
    monkeypatch.chdir(trained_run.parent)  # where training ran: its relative --data_file resolves
    [from_training_folder] = generate_json(capsys, "--model_dir", "run", *args)
    assert from_training_folder["prompt"] == from_elsewhere["prompt"]


def test_flag_conflicts_are_refused_by_the_parser():
    for args in (["--model_dir", "r"], ["--model_dir", "r", "--movie", "x", "--greedy", "--num_samples", "2"],
                 ["--model_dir", "r", "--movie", "x", "--top_p", "0"],
                 ["--model_dir", "r", "--movie", "x", "--greedy", "--seed", "1"]):
        with pytest.raises(SystemExit) as exc:
            gr.parse_args(args)
        assert exc.value.code == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--max_new_tokens", "-3"], "--max_new_tokens must be >= 1, got -3"),
    (["--temperature", "0"], "--temperature must be > 0, got 0"),
    (["--top_p", "0"], "--top_p must be > 0 and <= 1, got 0"),
])
def test_bad_numbers_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gr.parse_args(["--model_dir", "run", "--movie", "流浪地球", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
