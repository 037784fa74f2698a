"""Helpers shared by the test modules: run a script as a user would, write small review files, read run records,
build review files and read prompts for the data loader's tests, and the chat turns of a user for the chat layout's.

Fixtures live in ``conftest.py``; test modules import these functions from here (never from each other).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import data_loader_movie_review as dl
from review_lm.data import chat_layout as cf
from review_lm.runs import checkpoints as ft
from review_lm.training import efficiency

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "train_distributed_MovieReview.py")
EXAMPLE = str(REPO / "example_movie_review_data.json")

# Qwen2.5-Instruct's chat template (standard ChatML, default system message when none is given).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_train(*args: str, torchrun: int = 0, env: dict[str, str] | None = None, cwd: str | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               SCRIPT, *args]
    else:
        cmd = [sys.executable, SCRIPT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or clean_env(),
                          cwd=cwd or str(REPO), stdin=subprocess.DEVNULL)


def write_reviews(path: Path, texts: list[str], name: str = "toy") -> str:
    """A one-user review file in the spec's format, one review per day starting 2020-01-01."""
    records = [
        {"context": [], "continuation": text, "continuation_prefix": f"电影{i % 5}: ",
         "timestamp": f"2020-{1 + i // 28:02d}-{1 + i % 28:02d}"}
        for i, text in enumerate(texts)
    ]
    user = {"user": {"profile": {"name": name}},
            "task": {"description": "基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式",
                     "task_behavior_collections": [{"type": "movie_review", "data": records}]}}
    path.write_text(json.dumps([user], ensure_ascii=False), encoding="utf-8")
    return str(path)


def write_drift_reviews(folder: Path) -> str:
    """Train on one phrase, validate on another: the validation loss soon stops improving (early stopping)."""
    return write_reviews(folder / "drift.json", ["哈哈哈哈哈哈哈哈"] * 21 + ["呜呜呜呜 sad sad"] * 9)


def read_config(out: Path) -> dict:
    return json.loads((out / "training_config.json").read_text(encoding="utf-8"))


def state_dict(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def assert_same_weights(a, b) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256 of its bytes: "byte-identical" in one comparison."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_plan(runtime, quantization=None):
    """A RunPlan around a RuntimePlan (``plan.plan_runtime``), for tests of what the model is loaded with."""
    from review_lm.training import plan, sharding

    chosen = efficiency.plan_efficiency(False, False, runtime.attention, False)
    return plan.RunPlan(runtime, chosen, quantization, sharding.ShardingPlan("none"), 1, 16)


# Long runs as a user starts them: a process that can be watched, signalled and killed.
def start_train(*args: str, torchrun: int = 0, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                cwd: str | None = None) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                *extra] if torchrun else [sys.executable]
    # Own session: a failing test can end the launcher and its workers together (finish()).
    return subprocess.Popen([*launcher, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env or clean_env(), cwd=cwd or str(REPO), stdin=subprocess.DEVNULL,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for the run; past ``timeout`` kill it with everything it started, and fail."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        workers = child_pids(proc.pid)  # torchrun's workers run in sessions of their own
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"run still going after {timeout} s: {proc.communicate()[0][-3000:]}") from None


def wait_for_checkpoints(proc: subprocess.Popen, out: Path, count: int, timeout: float = 240) -> list[str]:
    """Block until ``count`` complete checkpoints exist in ``out`` (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [c for c in ft.checkpoints_newest_first(str(out)) if ft.checkpoint_problem(c) is None]
        if len(done) >= count:
            return done
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    finish(proc, timeout=0.1)
    raise AssertionError(f"no {count} complete checkpoints in {out} after {timeout} s")


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def worker_pid(agent_pid: int, local_rank: int) -> int:
    for pid in child_pids(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under {agent_pid}")


# Review files, prompts and the loader's CLI (test_data_loader, test_data_files, test_prompts, test_token_budget).
MODULE_PATH = REPO / "data_loader_movie_review.py"
TASK = "基于用户在豆瓣上的历史影评数据，模拟该用户的影评风格和行为模式"
REAL_FILES = ("multi_user_4.json", "user_3eeb2203.json", "user_cb8b084a.json")


def review(text: str, movie: str = "电影", ts: str = "2015-01-01", prefix: str | None = None) -> dict:
    return {"context": [], "continuation": text,
            "continuation_prefix": f"{movie}: " if prefix is None else prefix, "timestamp": ts}


def user_entry(name: str, records: list, description: str = TASK, extra_collections: tuple = ()) -> dict:
    collections = [{"type": "movie_review", "type_desc": "豆瓣影评数据", "data": records}, *extra_collections]
    return {"user": {"profile": {"name": name}},
            "task": {"description": description, "task_behavior_collections": collections}}


def records_of(entry: dict) -> list:
    return entry["task"]["task_behavior_collections"][0]["data"]


def write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def load_obj(tmp_path: Path, obj, name: str = "data.json") -> dl.ReviewData:
    return dl.load_review_file(write_json(tmp_path / name, obj))


def all_samples(splits: dict) -> list:
    return [s for name in dl.SPLITS for s in splits[name]]


def folded(text: str) -> str:
    return " ".join(text.split())


def expected_history_lines(records: list) -> list[str]:
    """History lines built straight from raw JSON records (independent of the module's helpers)."""
    lines = []
    for r in records:
        prefix = r["continuation_prefix"]
        assert prefix.endswith(": "), prefix
        lines.append(f"  电影《{prefix.removesuffix(': ')}》: {folded(r['continuation'])}")
    return lines


def history_lines_in(prompt: str) -> list[str]:
    return [line for line in prompt.split("\n") if line.startswith("  电影《")]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, str(MODULE_PATH), *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", cwd=REPO, env=env, timeout=timeout)


# A user's conversation for the chat layout (test_chat_format, test_chat_windows); FORMAT_NAMES: the keys of
# conftest's ``formats``.
FORMAT_NAMES = ["qwen3-template", "qwen25-template", "qwen-builtin", "bpe-builtin-eos", "bpe-builtin-chatml"]


def system_text(user: dl.UserHistory, use_profile: bool = True) -> str:
    """What the loader will pass as the system text: the spec's header lines (profile optional, task always)."""
    return dl.PromptBuilder(use_profile=use_profile).header(user).rstrip("\n")


def request_text(review: dl.Review) -> str:
    return dl.PromptBuilder.request(review.movie).rstrip("\n")


def user_turns(user: dl.UserHistory) -> list[cf.Turn]:
    return [(request_text(r), r.text) for r in user.reviews]
