"""review_lm.runs.lock: the run lock (with real processes, and a real torchrun restart), launch ids and
lock roles, the launch marker and review_lm.runs.restart's plan_restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from review_lm.runs import launch, restart
from review_lm.runs import lock as rg
from review_lm.runs import run_folder as rf
from review_lm.utils import UsageError

REPO = Path(__file__).resolve().parent.parent


def recorded_holder(out) -> dict | None:
    """The holder written into ``out``'s lock file (None: none, or released)."""
    return rf.read_record(os.path.join(str(out), rf.LOCK_FILE))


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
    from review_lm.runs import launch, lock as rg
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
