"""Notebook 02's launcher side: hostfiles, the launch argv, the event protocol,
and job control (SIGTERM, SIGKILL, timeouts) on small stand-in processes."""
import os
import sys
import textwrap

import psutil
import pytest

from knowlm_nb import ROOT, launch
from knowlm_nb.launch import LaunchError


def hostfile(tmp_path, text, name="hostfile"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------- launch command

def test_launch_command_for_three_nodes_of_eight(tmp_path):
    hf = hostfile(tmp_path, "# KnowLM\nworker-1 slots=8\nworker-2 slots=8  # rack B\n\nworker-3 slots=8\n")
    assert launch.parse_hostfile(hf) == {"worker-1": 8, "worker-2": 8, "worker-3": 8}
    argv = launch.launch_command(["--profile", "knowlm-13b"], "deepspeed", 3, 8, hf)
    assert os.path.basename(argv[0]) == "deepspeed"
    assert argv[1:] == ["--hostfile", str(hf), "--num_nodes", "3", "--num_gpus", "8",
                        "--master_addr", "worker-1", "--master_port", "29500",
                        "--module", "knowlm_nb.pretrain", "--profile", "knowlm-13b"]
    argv = launch.launch_command(["--profile", "knowlm-13b"], "torchrun", 3, 8, hf)
    assert os.path.basename(argv[0]) == "torchrun"
    assert argv[1:] == ["--nnodes", "3", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", "worker-1:29500", "--rdzv_id", "knowlm-pretrain",
                        "-m", "knowlm_nb.pretrain", "--profile", "knowlm-13b"]


def test_first_nodes_of_a_longer_hostfile_are_used(tmp_path):
    hf = hostfile(tmp_path, "a slots=4\nb slots=2\nc slots=8\n")
    assert launch.check_capacity(launch.parse_hostfile(hf), 1, 4) == {"a": 4}
    assert launch.check_capacity(launch.parse_hostfile(hf), 2, 2) == {"a": 4, "b": 2}
    argv = launch.launch_command([], "deepspeed", 2, 2, hf, master_port=31000, module="x.y")
    assert argv[argv.index("--master_addr") + 1] == "a"
    assert argv[-4:] == ["--master_port", "31000", "--module", "x.y"]


def test_local_command_and_shell_form():
    argv = launch.launch_command(["--x", "a b"], "torchrun", 1, 2, master_port=29511)
    assert argv[1:] == ["--standalone", "--nproc_per_node", "2", "-m", "knowlm_nb.pretrain",
                        "--x", "a b"]
    assert launch.shell_form(argv).endswith("--x 'a b'")  # display only; jobs run the list
    argv = launch.launch_command([], "deepspeed", 1, 2, master_port=29511)
    assert argv[1:] == ["--num_nodes", "1", "--num_gpus", "2", "--master_port", "29511",
                        "--module", "knowlm_nb.pretrain"]
    port = int(launch.launch_command([], "deepspeed", 1, 2)[-3])  # a free local port by default
    assert 1024 <= port < 65536
    assert launch.single_process_command(["--a", "1"]) == [sys.executable, "-m", "knowlm_nb.pretrain",
                                                           "--a", "1"]


def test_job_env_gives_each_process_one_thread_and_finds_the_package():
    env = launch.job_env(3, {"EXTRA": "1"})
    assert env["OMP_NUM_THREADS"] == "3" and env["EXTRA"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_our_hostfile_reading_agrees_with_deepspeeds():
    from deepspeed.launcher.runner import fetch_hostfile

    path = ROOT / "env" / "hostfile.example"
    assert launch.parse_hostfile(path) == dict(fetch_hostfile(str(path)))


@pytest.mark.parametrize("text, message", [
    ("node1 slots=8\nnode2\n", r"hostfile:2: expected 'HOSTNAME slots=N'"),
    ("node1 slots=eight\n", r"hostfile:1: expected slots=N"),
    ("node1 slots = 8\n", r"hostfile:1: expected 'HOSTNAME slots=N'"),
    ("node1 gpus=8\n", r"hostfile:1: expected slots=N"),
    ("node1 slots=0\n", r"hostfile:1: node1 has slots=0"),
    ("node1 slots=8\nnode1 slots=8\n", r"hostfile:2: host node1 is listed twice"),
    ("node1 slots=8 extra\n", r"hostfile:1: expected 'HOSTNAME slots=N'"),
    ("-rf slots=8\n", r"hostfile:1: '-rf' is not a valid host name"),
    ("# only a comment\n\n", r"no 'HOSTNAME slots=N' line"),
])
def test_malformed_hostfile_is_named_with_its_line(tmp_path, text, message):
    with pytest.raises(LaunchError, match=message):
        launch.parse_hostfile(hostfile(tmp_path, text))


def test_hostfile_missing_binary_or_too_small(tmp_path):
    with pytest.raises(LaunchError, match="hostfile not found"):
        launch.parse_hostfile(tmp_path / "nope")
    (tmp_path / "bin").write_bytes(b"\xff\xfe node1")
    with pytest.raises(LaunchError, match="invalid UTF-8"):
        launch.parse_hostfile(tmp_path / "bin")
    hf = hostfile(tmp_path, "a slots=8\nb slots=4\n")
    with pytest.raises(LaunchError, match="num_nodes 3 but the hostfile lists 2 node"):
        launch.launch_command([], "deepspeed", 3, 8, hf)
    with pytest.raises(LaunchError, match="num_gpus 8 per node but b has slots=4"):
        launch.launch_command([], "deepspeed", 2, 8, hf)
    with pytest.raises(LaunchError, match="needs a hostfile"):
        launch.launch_command([], "deepspeed", 2, 8)
    with pytest.raises(LaunchError, match="launcher must be one of"):
        launch.launch_command([], "mpirun", 1, 2)
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(LaunchError, match="num_gpus must be a positive int"):
            launch.launch_command([], "deepspeed", 1, bad)


# ------------------------------------------------------------ events

def test_events_round_trip_and_read_well(capsys):
    launch.emit_event({"event": "step", "step": 3, "loss": 1.23456, "lr": 1e-3, "tokens": 10,
                       "seconds": 1.0})
    line = capsys.readouterr().out.strip()
    event = launch.parse_event("rank0: " + line)  # a prefix before the marker is fine
    assert event["step"] == 3 and event["loss"] == 1.23456
    assert "loss 1.2346" in launch.describe(event)
    assert launch.parse_event("[knowlm] not json") is None
    assert launch.parse_event("[knowlm] [1, 2]") is None  # an event is an object
    assert launch.parse_event("no marker") is None
    start = {"event": "start", "world_size": 2, "backend": "gloo", "zero_stage": 3,
             "precision": "fp32", "global_batch": 16, "tokens_per_step": 4096, "resumed_from": 20}
    assert launch.describe(start) == ("started: 2 process(es) over gloo, ZeRO-3, fp32, global batch 16 "
                                      "(4,096 token positions a step), resuming from step 20")
    assert "no DeepSpeed" in launch.describe({**start, "zero_stage": None})


# ------------------------------------------------------- job control

# A stand-in for a launched job: a "launcher" that starts a "rank" (a child
# process) and prints one step event every 0.1 s. With IGNORE_TERM it
# ignores SIGTERM, as a rank stuck in a collective would.
FAKE_JOB = textwrap.dedent("""
    import json, signal, subprocess, sys, time
    if sys.argv[1] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("[knowlm] " + json.dumps({"event": "rank", "pid": rank.pid}), flush=True)
    for step in range(1, int(sys.argv[2]) + 1):
        time.sleep(0.1)
        print("[knowlm] " + json.dumps({"event": "step", "step": step}), flush=True)
    rank.kill()
""")


def fake_job(tmp_path, mode="obey", steps=200, grace=30.0):
    script = tmp_path / "job.py"
    script.write_text(FAKE_JOB, encoding="utf-8")
    return launch.Job([sys.executable, str(script), mode, str(steps)], launch.job_env(),
                      log_path=tmp_path / "launcher.log", grace=grace)


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_job_runs_to_its_end(tmp_path):
    result = fake_job(tmp_path, steps=3).start().watch(show=None)
    assert result.returncode == 0 and result.ok and not result.stopped and not result.killed
    assert result.last_step() == 3
    assert (tmp_path / "launcher.log").read_text().count('"event": "step"') == 3


def test_stop_after_a_step_reaches_every_process_of_the_group(tmp_path):
    shown = []
    result = fake_job(tmp_path).start().watch(stop_at_step=3, show=shown.append)
    assert result.stopped and result.ok and not result.killed
    assert result.returncode == -15                        # SIGTERM ended it
    assert result.last_step() == 3                         # it stopped at the step asked
    assert any("step 3 reached: stopping" in s for s in shown)
    rank = next(e["pid"] for e in result.events if e["event"] == "rank")
    assert gone(rank), "the rank the launcher started was stopped too"


def test_sigkill_when_sigterm_is_ignored(tmp_path):
    result = fake_job(tmp_path, mode="ignore", grace=0.5).start().watch(stop_at_step=2, show=None)
    assert result.stopped and result.killed and result.returncode == -9
    rank = next(e["pid"] for e in result.events if e["event"] == "rank")
    assert gone(rank)


def test_timeout_stops_a_job_and_is_not_ok(tmp_path):
    result = fake_job(tmp_path).start().watch(timeout=1.0, show=None)
    assert not result.stopped and not result.ok and result.returncode == -15
    assert "timed out after 1 s" in result.tail[-1]
    assert 0 < result.last_step() < 200
