"""Launching a training job: hostfile, launcher argv, environment, and job control with signals.

Stage 02's launcher side, independent of what the processes train:

* :func:`parse_hostfile` reads DeepSpeed's ``HOSTNAME slots=N`` files, with
  errors that name ``file:line``; :func:`check_capacity` checks that the first
  ``num_nodes`` hosts have ``num_gpus`` slots each.
* :func:`launch_command` builds the exact ``deepspeed --hostfile ...
  --num_nodes ... --num_gpus ...`` or ``torchrun`` argv (a list, never a shell
  string); :func:`single_process_command` is plain ``python -m MODULE``;
  :func:`job_env` gives each process one BLAS thread.
* The event protocol: a launched process prints ``[knowlm] {json}`` lines
  (:func:`emit_event`), the parent reads them back (:func:`parse_event`) and
  shows them readably (:func:`describe`).
* :class:`Job` starts the command in its own process group, streams its log,
  and can stop it after a given step (SIGTERM, then SIGKILL), as a scheduler
  preempting a node would; :class:`JobResult` is what it saw.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from . import ROOT

#: What the launchers start in every process unless told otherwise.
ENTRY_POINT = "knowlm_nb.pretrain"
LOG_PREFIX = "[knowlm] "
LAUNCHERS = ("deepspeed", "torchrun")


class LaunchError(ValueError):
    """A launch that cannot work as asked; the message names the problem (file:line for a hostfile)."""


# ================================================================== hostfile

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """``{host: slots}`` from a DeepSpeed hostfile, in file order.

    One node per line, ``HOSTNAME slots=N``; ``#`` comments and blank lines are
    skipped. Anything else is an error naming ``file:line`` and what is wrong.
    What this accepts, DeepSpeed's launcher reads the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LaunchError(f"{path}: not a text file (invalid UTF-8)") from None
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise LaunchError(f"{where}: expected 'HOSTNAME slots=N', got {raw.strip()!r}")
        host, slots = parts
        if not _HOST.fullmatch(host):
            raise LaunchError(f"{where}: {host!r} is not a valid host name")
        m = re.fullmatch(r"slots=(\d+)", slots)
        if not m:
            raise LaunchError(f"{where}: expected slots=N (N GPUs on {host}), got {slots!r}")
        if int(m.group(1)) < 1:
            raise LaunchError(f"{where}: {host} has slots=0; a node needs at least one slot")
        if host in hosts:
            raise LaunchError(f"{where}: host {host} is listed twice")
        hosts[host] = int(m.group(1))
    if not hosts:
        raise LaunchError(f"{path}: no 'HOSTNAME slots=N' line; the hostfile lists no node")
    return hosts


def check_capacity(hosts: Mapping[str, int], num_nodes: int, num_gpus: int,
                   where: str | Path = "hostfile") -> dict[str, int]:
    """The first ``num_nodes`` hosts, each with at least ``num_gpus`` slots."""
    if num_nodes > len(hosts):
        raise LaunchError(f"{where}: num_nodes {num_nodes} but the hostfile lists "
                          f"{len(hosts)} node(s): {', '.join(hosts)}")
    used = dict(list(hosts.items())[:num_nodes])
    short = {h: s for h, s in used.items() if s < num_gpus}
    if short:
        raise LaunchError(f"{where}: num_gpus {num_gpus} per node but "
                          + ", ".join(f"{h} has slots={s}" for h, s in short.items()))
    return used


# ================================================================== launcher

def _tool(name: str) -> str:
    """The venv's copy of a console script (``deepspeed``, ``torchrun``) if present."""
    local = Path(sys.executable).with_name(name)
    if local.is_file():
        return str(local)
    return shutil.which(name) or name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (a one-node rendezvous, a local server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_command(script_args: Iterable[str] = (), launcher: str = "deepspeed",
                   num_nodes: int = 1, num_gpus: int = 2, hostfile: str | Path | None = None,
                   master_addr: str | None = None, master_port: int | None = None,
                   module: str = ENTRY_POINT) -> list[str]:
    """The argv that launches ``module`` on ``num_nodes`` x ``num_gpus`` processes.

    * ``deepspeed``: ``deepspeed [--hostfile H] --num_nodes N --num_gpus G
      [--master_addr A] --master_port P --module MODULE ARGS``. With a hostfile
      it is run once, on the first node, which starts the others over ssh.
    * ``torchrun``: one node ``--standalone``; several nodes use c10d
      rendezvous at the first host, and the same command runs on every node.

    ``master_port`` defaults to a free local port on one node and 29500
    across nodes.
    """
    script_args = [str(a) for a in script_args]
    if launcher not in LAUNCHERS:
        raise LaunchError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    for name, value in (("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LaunchError(f"{name} must be a positive int, got {value!r}")
    hosts = None
    if hostfile:
        hosts = check_capacity(parse_hostfile(hostfile), num_nodes, num_gpus, hostfile)
        master_addr = master_addr or next(iter(hosts))
    elif num_nodes > 1:
        raise LaunchError(f"num_nodes {num_nodes} needs a hostfile naming the nodes")
    if master_port is None:
        master_port = 29500 if hosts else free_port()
    if launcher == "deepspeed":
        argv = [_tool("deepspeed")]
        if hostfile:
            argv += ["--hostfile", str(hostfile)]
        argv += ["--num_nodes", str(num_nodes), "--num_gpus", str(num_gpus)]
        if master_addr:
            argv += ["--master_addr", master_addr]
        argv += ["--master_port", str(master_port), "--module", module]
    elif hosts:
        argv = [_tool("torchrun"), "--nnodes", str(num_nodes), "--nproc_per_node", str(num_gpus),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}",
                "--rdzv_id", "knowlm-pretrain", "-m", module]
    else:
        argv = [_tool("torchrun"), "--standalone", "--nproc_per_node", str(num_gpus),
                "-m", module]
    return argv + script_args


def single_process_command(script_args: Iterable[str] = (), module: str = ENTRY_POINT) -> list[str]:
    """Plain ``python -m MODULE ARGS``: one process, no launcher."""
    return [sys.executable, "-m", module, *[str(a) for a in script_args]]


def job_env(threads_per_process: int = 1, extra: Mapping[str, str] | None = None) -> dict:
    """Environment for the launched processes: one BLAS thread each (2 cores, 2 ranks)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads_per_process), "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)})
    env.update(extra or {})
    return env


def shell_form(argv: list[str]) -> str:
    """How ``argv`` reads in a terminal (for display only; jobs run the list)."""
    return shlex.join(argv)


# ======================================================================= jobs

@dataclass
class JobResult:
    """What :meth:`Job.watch` saw: exit code, whether we stopped it, its events and last lines."""

    argv: list[str]
    returncode: int | None
    stopped: bool                    # we stopped it (SIGTERM / SIGKILL) after stop_at_step
    killed: bool                     # it needed SIGKILL
    seconds: float
    events: list[dict] = field(default_factory=list)   # parsed "[knowlm] {...}" lines
    tail: list[str] = field(default_factory=list)      # last lines of output

    @property
    def ok(self) -> bool:
        """It ended with code 0, or we stopped it on purpose."""
        return self.returncode == 0 or self.stopped

    def last_step(self) -> int:
        """The last optimizer step the job logged (0 if none)."""
        return max((e["step"] for e in self.events if e.get("event") == "step"), default=0)


def emit_event(event: Mapping) -> None:
    """Print one run event as a ``[knowlm] {json}`` line, for :func:`parse_event` in the parent."""
    print(LOG_PREFIX + json.dumps(dict(event)), flush=True)


def parse_event(line: str) -> dict | None:
    """The JSON of a ``[knowlm] {...}`` log line, else None."""
    i = line.find(LOG_PREFIX)
    if i < 0:
        return None
    try:
        event = json.loads(line[i + len(LOG_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def describe(event: Mapping) -> str:
    """One readable line for a run event."""
    kind = event.get("event")
    if kind == "step":
        return (f"step {event['step']:>4}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
                f"tokens {event['tokens']:>9,}  {event['seconds']:6.1f} s")
    if kind == "checkpoint":
        return f"checkpoint-{event['step']} written (every rank done)"
    if kind == "start":
        zero = f"ZeRO-{event['zero_stage']}" if event.get("zero_stage") is not None else "no DeepSpeed"
        resumed = (f", resuming from step {event['resumed_from']}" if event.get("resumed_from")
                   else "")
        return (f"started: {event['world_size']} process(es) over {event['backend']}, {zero}, "
                f"{event['precision']}, global batch {event['global_batch']} "
                f"({event['tokens_per_step']:,} token positions a step){resumed}")
    if kind == "done":
        losses = ", ".join(f"{k} {v:.3f}" for k, v in event["heldout_loss"].items())
        return f"done at step {event['global_step']}: held-out loss {losses}"
    return json.dumps(dict(event))


def show_line(line: str) -> None:
    """Print a line worth seeing: run events readably, errors and the launcher's
    own commands as they are; the rest stays in ``launcher.log``."""
    event = parse_event(line)
    if event:
        print(describe(event), flush=True)
    elif any(k in line for k in ("Error", "error:", "Traceback", "cmd = ", "spawned with command",
                                 "Killed", "exits with return code")):
        print(line, flush=True)


class Job:
    """A launched run: start it, stream its log, optionally stop it after a step.

    The command runs in a new session (its own process group), so stopping it
    reaches the launcher and every rank: SIGTERM first, then SIGKILL for what
    is still alive after ``grace`` seconds.
    """

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None,
                 log_path: Path | None = None, cwd: Path = ROOT, grace: float = 30.0):
        self.argv, self.env, self.cwd = list(argv), dict(env or job_env()), cwd
        self.grace = grace
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Job":
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1,
                                     start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        try:
            for line in self.proc.stdout:
                if log:
                    log.write(line)
                    log.flush()
                self._lines.put(line.rstrip("\n"))
        finally:
            if log:
                log.close()
            self._lines.put(None)

    def stop(self, grace: float | None = None) -> bool:
        """SIGTERM the job's process group; SIGKILL what is left after ``grace``
        seconds (default: the job's). Returns True when SIGKILL was needed."""
        import psutil

        grace = self.grace if grace is None else grace

        if self.proc.poll() is not None:
            return False
        try:  # the ranks, found before the launcher exits and orphans them
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        os.killpg(self.proc.pid, signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            killed = True
        _, alive = psutil.wait_procs(family, timeout=5 if killed else grace)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        return killed or bool(alive)

    def watch(self, stop_at_step: int = 0, timeout: float | None = None,
              show: Callable[[str], None] | None = show_line) -> JobResult:
        """Stream the output until the job ends, or until step ``stop_at_step``
        is logged and the job is stopped. ``show`` gets every line."""
        events, tail, stopped, killed = [], [], False, False
        deadline = time.time() + timeout if timeout else None
        while True:
            remaining = None if deadline is None else deadline - time.time()
            if remaining is not None and remaining <= 0:
                killed = self.stop()
                tail.append(f"[job] timed out after {timeout:.0f} s and was stopped")
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                break
            tail = (tail + [line])[-60:]
            event = parse_event(line)
            if event:
                events.append(event)
            if show:
                show(line)
            if (stop_at_step and event and event.get("event") == "step"
                    and event["step"] >= stop_at_step):
                if show:
                    show(f"[job] step {event['step']} reached: stopping the run "
                         "(SIGTERM, then SIGKILL if needed)")
                killed = self.stop()
                stopped = True
                break
        self.proc.wait()
        return JobResult(self.argv, self.proc.returncode, stopped, killed,
                         time.time() - self.t0, events, tail)


def run_job(argv: list[str], env: Mapping[str, str] | None = None, stop_at_step: int = 0,
            timeout: float | None = 1800, show: Callable[[str], None] | None = show_line,
            log_path: Path | None = None) -> JobResult:
    """Start ``argv``, stream it, stop it after ``stop_at_step`` (0: let it end)."""
    return Job(argv, env, log_path).start().watch(stop_at_step, timeout, show)
