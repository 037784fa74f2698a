"""review_lm.runs.lock: fingerprints, the run lock (with real processes), the restart marker, disk space and
save failures. Fast: no torch import except in the real disk-full test (torch.save's errno-less error)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from review_lm.runs import disk_space as ds
from review_lm.runs import fingerprint, launch, restart
from review_lm.runs import lock as rg
from review_lm.runs import run_folder as rf
from review_lm.utils import UsageError

REPO = Path(__file__).resolve().parent.parent


# ==============================================================================================================
# Fingerprint
# ==============================================================================================================

def recorded_holder(out) -> dict | None:
    """The holder written into ``out``'s lock file (None: none, or released)."""
    return rf.read_record(os.path.join(str(out), rf.LOCK_FILE))

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


# ==============================================================================================================
# Run lock
# ==============================================================================================================
CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    from review_lm.runs import lock as rg
    from review_lm.utils import UsageError
    out, run_id, hold, go, release = sys.argv[1], sys.argv[2] or None, float(sys.argv[3]), sys.argv[4], sys.argv[5]
    while go and not os.path.exists(go):
        time.sleep(0.005)
    try:
        lock = rg.RunLock(out, run_id, log=lambda m: print("log:", m, flush=True)).acquire()
    except UsageError as err:
        print("refused:", err, flush=True)
        sys.exit(2)
    print("locked", os.getpid(), flush=True)
    if release:  # hold until the test says so (no race with the other launches' attempts)
        while not os.path.exists(release):
            time.sleep(0.005)
    else:
        time.sleep(hold)
    lock.release()
""").format(repo=str(REPO))


def child(out: Path, run_id: str = "", hold: float = 60.0, go: str = "", release: str = "",
          **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
                                                                "TORCHELASTIC_RESTART_COUNT")}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), run_id, str(hold), go, release],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**environ, **env})


def wait_locked(proc: subprocess.Popen) -> list[str]:
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f"child ended without the lock: {lines}"
        lines.append(line.strip())
        if line.startswith("locked"):
            return lines


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        kill(proc)


def test_lock_creates_only_the_folder_and_lock_file_records_the_holder_and_releases(tmp_path):
    out = tmp_path / "new" / "run"
    with rg.RunLock(str(out), "r1") as lock:
        assert lock.held and lock.verified and lock.role == "leader"
        assert os.listdir(out) == [rf.LOCK_FILE]
        holder = recorded_holder(out)
        assert holder == lock.holder
        assert holder["pid"] == os.getpid() and holder["run_id"] == "r1" and holder["restart"] == 0
        assert holder["marker_at_start"] is None and holder["host"]
    assert not lock.held and recorded_holder(out) is None
    assert not out.exists()  # the lock made the folder and nothing else was written: left as it was found
    lock.release()  # idempotent
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("x")
    logs = []
    rg.RunLock(str(out), "r2", log=logs.append).acquire().release()
    assert logs == []  # a cleanly released lock is not "dead"
    assert os.listdir(out) == ["mine.txt"]  # the lock file it made is gone again, the folder stays


def test_lock_refuses_a_file_as_output_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        rg.RunLock(str(tmp_path / "f")).acquire()


def test_second_launch_is_refused_at_once_naming_the_holder_then_takes_over_a_killed_one(tmp_path, procs):
    out = tmp_path / "run"
    procs.append(holder := child(out, "launch-a"))
    pid = int(wait_locked(holder)[-1].split()[1])
    with pytest.raises(UsageError) as refused:
        rg.RunLock(str(out), "launch-b", timeout=600).acquire()
    assert holder.poll() is None  # refused while the holder still holds it: at once, not after waiting for it
    message = str(refused.value)
    assert message.startswith(f"{out} is in use by another training run (pid {pid} on host ")
    assert message.endswith("); wait for it or choose another --output_dir") and "\n" not in message
    kill(holder)  # SIGKILL: no release; the kernel drops the flock, the holder text stays
    assert recorded_holder(out)["pid"] == pid
    logs = []
    with rg.RunLock(str(out), "launch-b", log=logs.append) as lock:
        assert lock.holder["pid"] == os.getpid()
    assert len(logs) == 1 and "dead training run" in logs[0] and f"pid {pid} on host" in logs[0]
    assert "earlier attempt" not in logs[0]


def test_ranks_of_the_same_launch_pass_and_others_wait_then_are_refused(tmp_path, procs):
    out = tmp_path / "run"
    procs.append(leader := child(out, "launch-a", TORCHELASTIC_RUN_ID="launch-a"))
    pid = int(wait_locked(leader)[-1].split()[1])
    rank1 = {"RANK": "1", "GROUP_RANK": "0", "TORCHELASTIC_RESTART_COUNT": "0"}
    lock = rg.RunLock(str(out), "launch-a", environ=rank1).acquire()
    assert lock.role == "follower" and lock.verified and not lock.held and lock.holder["pid"] == pid
    lock.release()  # nothing to release: the leader still holds it
    assert recorded_holder(out)["pid"] == pid
    with pytest.raises(UsageError, match=rf"waited 0.3 s .* held by another training run \(pid {pid} on host"):
        rg.RunLock(str(out), "launch-b", environ=rank1, timeout=0.3).acquire()
    assert leader.poll() is None  # the leader (holding for 60 s) still holds it: the follower gave up on its own


def test_follower_waits_for_its_leader(tmp_path, procs):
    out = tmp_path / "run"
    out.mkdir()
    go = tmp_path / "go"
    procs.append(leader := child(out, "launch-a", go=str(go)))
    # The follower starts first (nothing recorded yet), then the leader takes the lock while it waits.
    follower = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); from review_lm.runs import lock "
         f"as rg; l = rg.RunLock({str(out)!r}, 'launch-a', environ={{'RANK': '1'}}, timeout=20).acquire(); "
         "print(l.holder['pid'])"], stdout=subprocess.PIPE, text=True)
    procs.append(follower)
    time.sleep(0.3)
    assert follower.poll() is None  # still waiting
    go.touch()
    pid = int(wait_locked(leader)[-1].split()[1])
    assert follower.wait(10) == 0 and int(follower.stdout.read()) == pid


def test_follower_without_a_launch_id_or_on_another_node_passes_unchecked(tmp_path):
    lone = rg.RunLock(str(tmp_path / "x"), None, environ={"RANK": "1"}).acquire()
    other = rg.RunLock(str(tmp_path / "x"), "a", environ={"RANK": "5", "GROUP_RANK": "1"}).acquire()
    assert not lone.verified and not other.verified and other.role == "other_node"
    assert not (tmp_path / "x").exists()  # they touched nothing


def test_a_follower_with_a_stale_holder_of_the_previous_attempt_waits_for_the_new_leader(tmp_path, procs):
    """A torchrun restart: same launch id, every worker new. The dead attempt's holder is not this attempt's."""
    out = tmp_path / "run"
    procs.append(first := child(out, "launch-a", TORCHELASTIC_RESTART_COUNT="0"))
    old_pid = int(wait_locked(first)[-1].split()[1])
    kill(first)
    restarted = {"RANK": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    with pytest.raises(UsageError, match=f"pid {old_pid}"):  # the holder on disk is restart 0's
        rg.RunLock(str(out), "launch-a", environ=restarted, timeout=0.2).acquire()
    procs.append(second := child(out, "launch-a", TORCHELASTIC_RESTART_COUNT="1"))
    lines = wait_locked(second)
    new_pid = int(lines[-1].split()[1])
    assert new_pid != old_pid
    assert len(lines) == 2 and f"pid {old_pid} on host" in lines[0] and "an earlier attempt of this launch" in lines[0]
    follower = rg.RunLock(str(out), "launch-a", environ=restarted, timeout=5).acquire()
    assert follower.holder["pid"] == new_pid and follower.holder["restart"] == 1


def test_two_launches_at_once_exactly_one_wins(tmp_path, procs):
    out = tmp_path / "run"
    go, release = tmp_path / "go", tmp_path / "release"
    launches = [child(out, run_id, go=str(go), release=str(release)) for run_id in ("launch-a", "launch-b", "launch-c")]
    procs.extend(launches)
    go.touch()  # all three try at about the same time, however slowly each one started
    # The winner holds the lock until `release` exists, so a loser cannot win late: wait for the two losers first.
    deadline = time.monotonic() + 60
    while sum(p.poll() is not None for p in launches) < 2:
        assert time.monotonic() < deadline, "two of the three launches should have been refused"
        time.sleep(0.02)
    release.touch()
    results = [(p.wait(20), p.stdout.read()) for p in launches]
    assert sorted(rc for rc, _ in results) == [0, 2, 2], results
    winner = next(text for rc, text in results if rc == 0)
    winner_pid = int(winner.split()[1])
    for rc, text in results:
        if rc == 2:
            assert f"is in use by another training run (pid {winner_pid} on host" in text


def test_marker_at_start_is_what_the_leader_found(tmp_path):
    rg.write_launch_marker(str(tmp_path), "old-launch")
    with rg.RunLock(str(tmp_path), "new") as lock:
        rg.write_launch_marker(str(tmp_path), "new", phase="clearing")  # what the leader does next
        follower = rg.RunLock(str(tmp_path), "new", environ={"RANK": "1"}).acquire()
        assert lock.marker_at_start["run_id"] == follower.marker_at_start["run_id"] == "old-launch"


def test_launch_id():
    assert launch.launch_id({}) is None
    assert launch.launch_id({"TORCHELASTIC_RUN_ID": "a1b2"}) == "a1b2"
    assert launch.launch_id({"TORCHELASTIC_RUN_ID": "none"}, agent="h:12:345") == "none@h:12:345"
    parent = launch.launch_id({"TORCHELASTIC_RUN_ID": "none"})  # this process's parent stands in for the agent
    assert parent.startswith("none@") and f":{os.getppid()}:" in parent
    assert launch.launch_id({"TORCHELASTIC_RUN_ID": "none"}) == parent  # stable


@pytest.mark.parametrize("env, role", [
    ({}, "leader"), ({"RANK": "0"}, "leader"), ({"RANK": "0", "GROUP_RANK": "0"}, "leader"),
    ({"RANK": "3"}, "follower"), ({"RANK": "3", "GROUP_RANK": "0"}, "follower"),
    ({"RANK": "9", "GROUP_RANK": "1"}, "other_node"),
])
def test_lock_role(env, role):
    assert launch.lock_role(env) == role


def test_describe_holder():
    assert rg.describe_holder(None) == "holder not recorded"
    assert rg.describe_holder({"pid": 7, "host": "h", "started": "2024-05-01T12:00:01"}) == (
        "pid 7 on host h, started 2024-05-01 12:00:01")
    assert rg.describe_holder({"pid": 7, "host": "h", "started": "soon"}).endswith("started soon")


TORCHRUN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    from review_lm.runs import lock as rg
    out, report = sys.argv[1], sys.argv[2]
    logs = []
    lock = rg.RunLock(out, launch.launch_id(), log=logs.append, timeout=30).acquire()
    with open(report, "a") as f:
        f.write(json.dumps({{"rank": os.environ["RANK"], "restart": lock.restart, "launch": lock.run_id,
                            "pid": os.getpid(), "holder": lock.holder["pid"], "verified": lock.verified,
                            "logs": logs}}) + "\\n")
    if lock.restart == 0 and os.environ["RANK"] == "1":
        sys.exit(1)  # attempt 0 fails: torchrun restarts the whole worker group
    import time; time.sleep(0.5)
    lock.release()
""").format(repo=str(REPO))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["--master_port=29613"]], ids=["uuid-run-id", "static-none-run-id"])
def test_real_torchrun_restart_takes_the_lock_back_and_ranks_pass(tmp_path, launcher):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed")
    script, report = tmp_path / "s.py", tmp_path / "report.jsonl"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--max-restarts=1", *launcher, str(script),
                           str(tmp_path / "run"), str(report)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted((r["restart"], r["rank"]) for r in rows) == [(0, "0"), (0, "1"), (1, "0"), (1, "1")]
    assert len({r["launch"] for r in rows}) == 1 and all(r["verified"] for r in rows)
    leaders = {r["restart"]: r for r in rows if r["rank"] == "0"}
    assert all(r["holder"] == leaders[r["restart"]]["pid"] for r in rows)  # followers saw their own leader
    assert leaders[0]["pid"] != leaders[1]["pid"]
    assert leaders[0]["logs"] == []
    assert len(leaders[1]["logs"]) == 1 and f"pid {leaders[0]['pid']} on host" in leaders[1]["logs"][0]
    assert "an earlier attempt of this launch" in leaders[1]["logs"][0]


# ==============================================================================================================
# Launch marker and plan_restart
# ==============================================================================================================
def test_launch_marker_round_trip(tmp_path):
    assert rg.read_launch_marker(str(tmp_path)) is None
    rg.write_launch_marker(str(tmp_path), "r1", phase="clearing")
    marker = rg.read_launch_marker(str(tmp_path))
    assert marker["run_id"] == "r1" and marker["phase"] == "clearing" and marker["pid"] == os.getpid()
    rg.write_launch_marker(str(tmp_path), "r1")
    assert rg.read_launch_marker(str(tmp_path))["phase"] == "started"
    assert sorted(os.listdir(tmp_path)) == [rf.LAUNCH_MARKER]  # no temporary file left
    (tmp_path / rf.LAUNCH_MARKER).write_text('{"run_id": ')  # torn
    assert rg.read_launch_marker(str(tmp_path)) is None
    with pytest.raises(ValueError):
        rg.write_launch_marker(str(tmp_path), "r1", phase="done")


OURS = {"run_id": "me", "phase": "started"}


@pytest.mark.parametrize("restarts, overwrite, resume, state, marker, run_id, expected", [
    # First start: judged as before; overwrite may delete unless resuming.
    (0, False, None, "finished", OURS, "me", ("check", None, False)),
    (0, True, None, "unfinished", None, "me", ("check", None, True)),
    (0, True, "latest", "unfinished", None, "me", ("check", "latest", False)),
    # Restart, the folder still holds a previous run (marker of another launch, none, ours but mid-clearing).
    (1, True, None, "unfinished", {"run_id": "old", "phase": "started"}, "me", ("check", None, True)),
    (1, True, None, "finished", None, "me", ("check", None, True)),
    (2, True, None, "unfinished", {"run_id": "me", "phase": "clearing"}, "me", ("check", None, True)),
    (1, True, None, "unfinished", {"run_id": None, "phase": "started"}, None, ("check", None, True)),
    (1, False, None, "unfinished", {"run_id": "old", "phase": "started"}, "me", ("check", None, False)),
    (1, False, "latest", "unfinished", None, "me", ("check", "latest", False)),
    (1, True, "ck/checkpoint-5", "unfinished", None, "me", ("check", "ck/checkpoint-5", False)),
    # Restart, this launch's own files.
    (1, True, None, "finished", OURS, "me", ("finished", None, False)),
    (1, True, None, "unfinished", OURS, "me", ("resume", "latest", False)),
    (1, False, "other/checkpoint-5", "unfinished", OURS, "me", ("resume", "latest", False)),
    (1, True, None, "empty", OURS, "me", ("resume", None, False)),
    (1, False, "latest", "empty", OURS, "me", ("resume", None, False)),
    (1, False, "other/checkpoint-5", "empty", OURS, "me", ("resume", "other/checkpoint-5", False)),
])
def test_plan_restart_each_branch(restarts, overwrite, resume, state, marker, run_id, expected):
    plan = restart.plan_restart(restarts, overwrite, resume, state, marker, run_id, "out/x")
    assert (plan.action, plan.resume, plan.remove_previous) == expected
    if restarts and plan.action != "resume" or plan.resume is None and restarts:
        assert plan.message and f"torchrun restart {restarts}" in plan.message and "\n" not in plan.message
    elif not restarts or plan.resume == "latest":  # the train script names the checkpoint it resumes from
        assert plan.message is None


def test_plan_restart_messages_say_what_happens():
    old = {"run_id": "old", "phase": "started"}
    assert "still holds a previous run" in restart.plan_restart(1, True, None, "unfinished", old, "me", "o").message
    assert "first start" in restart.plan_restart(1, False, None, "unfinished", old, "me", "o").message
    assert "starting from scratch" in restart.plan_restart(1, False, None, "empty", OURS, "me", "o").message
    assert "starting again from c/1" in restart.plan_restart(1, False, "c/1", "empty", OURS, "me", "o").message


# ==============================================================================================================
# Disk space
# ==============================================================================================================
def test_estimate_run_bytes_formula():
    # Full fine-tuning, fp32 weights + AdamW: 3 checkpoints (limit 2 + the one being written) + 1 final copy.
    n = 1_000_000
    assert ds.estimate_run_bytes(n, n, 4, 8, checkpoints_kept=3, final_copies=1) == (4 * n + 8 * n) * 3 + 4 * n
    assert ds.estimate_run_bytes(n, n, 4) == 40 * n  # the defaults: adamw, 3 kept, 1 final
    # LoRA: checkpoints hold the adapter and its optimizer state only.
    assert ds.estimate_run_bytes(n, 1000, 4, 8, 3, 1, saved_params=1000) == 12_000 * 3 + 4000
    # bf16-pure with Kahan AdamW, bin conversion (2 final copies), tokenizer etc. per copy.
    assert ds.estimate_run_bytes(n, n, 2, ds.OPTIMIZER_BYTES["adamw_kahan_bf16"], 2, 2, overhead_bytes=10) == (
        (2 * n + 6 * n + 10) * 2 + 2 * (2 * n + 10))
    # The measured tiny-model checkpoint (STACK_NOTES): 19.5 MB weights, 39 MB optimizer.pt, 11 MB tokenizer.
    params = 19_500_000 // 4
    per_checkpoint = ds.estimate_run_bytes(params, params, 4, 8, 1, 0, overhead_bytes=11_000_000)
    assert 69e6 < per_checkpoint < 70.5e6


@pytest.mark.parametrize("n, text", [(0, "0 B"), (950, "950 B"), (12_345, "12.3 KB"), (3_400_000, "3.4 MB"),
                                     (7_500_000_000, "7.5 GB"), (250_000_000_000, "250 GB"),
                                     (1_200_000_000_000, "1.2 TB")])
def test_human_bytes(n, text):
    assert ds.human_bytes(n) == text


def test_disk_space_warning():
    assert ds.disk_space_warning("out/x", 3_000_000_000, 3_000_000_000) is None
    assert ds.disk_space_warning("out/x", 3_000_000_000, 10**12) is None
    warning = ds.disk_space_warning("out/x", 3_400_000_000, 1_200_000_000)
    assert warning == ("only 1.2 GB free for out/x, but the run needs about 3.4 GB (checkpoints and the final "
                       "model): free space or choose another --output_dir")


def test_free_space_is_read_on_the_nearest_existing_parent(tmp_path):
    missing = tmp_path / "a" / "b" / "c"
    assert ds.existing_parent(str(missing)) == str(tmp_path)
    assert ds.free_bytes(str(missing)) == shutil.disk_usage(tmp_path).free
    assert ds.check_disk_space(str(missing), 1) is None
    assert "only" in ds.check_disk_space(str(missing), 10**18)
    assert ds.existing_parent("/") == "/"


# ==============================================================================================================
# Save failures
# ==============================================================================================================
def safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 4


def zip_file(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", b"x")


def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A Trainer-shaped checkpoint without torch: zips for .pt/.pth, a valid safetensors header."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(safetensors_bytes())
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        zip_file(folder / name)
    if complete:  # Trainer writes trainer_state.json last
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_checkpoint_without_trainer_state_is_incomplete(tmp_path):
    assert ds.checkpoint_problem(str(make_checkpoint(tmp_path / "checkpoint-1", 1))) is None
    assert "trainer_state.json" in ds.checkpoint_problem(str(make_checkpoint(tmp_path / "checkpoint-2", 2, False)))


@pytest.mark.parametrize("entries, expected", [
    ([], []),
    ([("c3", None), ("c2", None)], []),
    ([("c3", "no trainer_state.json"), ("c2", None)], ["c3"]),
    ([("c4", "x"), ("c3", "y"), ("c2", None), ("c1", "z")], ["c4", "c3"]),  # c1: older than a complete one
    ([("c2", "x"), ("c1", "y")], ["c2", "c1"]),  # nothing complete: an interrupted first save
])
def test_partial_to_remove(entries, expected):
    assert ds.partial_to_remove(entries) == expected


def test_remove_partial_checkpoints_keeps_complete_and_older_ones(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-1", 1, complete=False)
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    make_checkpoint(tmp_path / "checkpoint-3", 3, complete=False)
    logs = []
    assert ds.remove_partial_checkpoints(str(tmp_path), logs.append) == [str(tmp_path / "checkpoint-3")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]
    assert logs == [f"removed incomplete checkpoint {tmp_path / 'checkpoint-3'}: no trainer_state.json (the save "
                    "was interrupted)"]


@pytest.mark.parametrize("err, free, full", [
    (OSError(errno.ENOSPC, "No space left on device"), None, True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), None, True),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), None, True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 0, True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 10**12, False),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), None, False),
    (RuntimeError("basic_ios::clear: iostream error"), 1000, True),
    (OSError(errno.EACCES, "Permission denied"), 0, False),
    (ValueError("bad"), 0, False),
])
def test_is_disk_full(err, free, full):
    assert ds.is_disk_full(err, free) is full


def test_is_disk_full_survives_a_cycle_in_the_context_chain():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not ds.is_disk_full(a, 0)


def test_is_disk_full_looks_at_the_cause():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert ds.is_disk_full(outer)


CMD = "python train_distributed_MovieReview.py --data_file d.json --output_dir out/x --resume_from_checkpoint"


def test_describe_disk_full_names_folder_space_checkpoint_and_command():
    err = OSError(errno.ENOSPC, "No space left on device")
    line = ds.describe_save_failure(err, "out/x", 3_400_000_000, "out/x/checkpoint-20", CMD, free=0)
    assert line == ("saving to out/x failed: the disk is full (the run needs about 3.4 GB, 0 B free now); "
                    f"last complete checkpoint: out/x/checkpoint-20; free space, then resume with: {CMD}")
    assert ds.describe_save_failure(err, "out/x", None, "c", CMD) == (
        f"saving to out/x failed: the disk is full; last complete checkpoint: c; free space, then resume with: {CMD}")


def test_describe_other_failures_and_no_checkpoint_yet():
    err = OSError(errno.EACCES, "Permission denied", "out/x/checkpoint-5/optimizer.pt")
    line = ds.describe_save_failure(err, "out/x", 10**9, None, CMD)
    assert line == ("saving to out/x failed: PermissionError: Permission denied (out/x/checkpoint-5/optimizer.pt); "
                    "no complete checkpoint yet; fix that, then start again (--overwrite_output_dir)")
    line = ds.describe_save_failure(RuntimeError("first line\nsecond"), "o", None, "o/checkpoint-1", CMD)
    assert line.startswith("saving to o failed: RuntimeError: first line; last complete checkpoint: o/checkpoint-1")
    assert "RuntimeError: no message" in ds.describe_save_failure(RuntimeError(), "o", None, None, CMD)


def test_patched_writer_raising_enospc_gives_one_line_and_removes_the_partial_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_checkpoint(out / "checkpoint-10", 10)

    def save_checkpoint(folder: Path) -> None:  # Trainer's order: weights, optimizer, ..., trainer_state last
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(safetensors_bytes())
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.pt"))

    monkeypatch.setattr(ds, "free_bytes", lambda path: 5_000_000)
    logs = []
    with pytest.raises(UsageError) as failed:
        try:
            save_checkpoint(out / "checkpoint-20")
        except OSError as err:
            raise ds.explain_save_failure(err, str(out), 2_000_000_000, CMD, logs.append) from err
    assert str(failed.value) == (f"saving to {out} failed: the disk is full (the run needs about 2.0 GB, 5.0 MB free "
                                 f"now); last complete checkpoint: {out / 'checkpoint-10'}; free space, then resume "
                                 f"with: {CMD}")
    assert sorted(os.listdir(out)) == ["checkpoint-10"] and len(logs) == 1 and "checkpoint-20" in logs[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a 2 MB tmpfs for a real disk-full test: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:  # busy: an open file left
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk_torch_save_and_plain_write(small_tmpfs):
    """On a real 2 MB file system: torch.save fails without an errno, a plain write with ENOSPC; both are
    recognised, the partial checkpoint is removed (freeing its space) and the line names the complete one."""
    torch = pytest.importorskip("torch")
    out = small_tmpfs / "run"
    make_checkpoint(out / "checkpoint-1", 1)
    partial = out / "checkpoint-2"
    partial.mkdir()
    with pytest.raises(Exception) as failed:  # noqa: B017 - whatever torch raises is what a save gives us
        torch.save({"w": torch.zeros(1_000_000)}, partial / "optimizer.pt")
    err = failed.value
    assert not isinstance(err, OSError)  # the point: no errno to go by
    assert ds.free_bytes(str(out)) < 64 * 1024 * 1024
    assert ds.is_disk_full(err, ds.free_bytes(str(out)))
    usage_error = ds.explain_save_failure(err, str(out), 4_000_000, CMD, log=lambda m: None)
    message = str(usage_error)
    assert message.startswith(f"saving to {out} failed: the disk is full (the run needs about 4.0 MB, ")
    assert f"last complete checkpoint: {out / 'checkpoint-1'}; free space, then resume with: {CMD}" in message
    assert not partial.exists() and ds.free_bytes(str(out)) > 1_000_000  # the partial file's space is back
    with pytest.raises(OSError) as plain:
        (out / "big").write_bytes(b"\0" * 3_000_000)
    assert plain.value.errno == errno.ENOSPC and ds.is_disk_full(plain.value)
