"""Run a whole command as a user would and time it: wall-clock, CPU time, load average before and after.

CPU time is the user + system time ``wait4`` reports for the child: the command
and every descendant it waited for (what ``getrusage(RUSAGE_CHILDREN)`` would add
for it). Daemons a command leaves running (Ray's) are not in it. The command runs
in a session of its own, so Ctrl-C here stops the whole of it.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from bench.provenance import load_average, now

# "2 torch thread(s) (...)": the first line sfpo train / compare / sweep print
THREADS_LINE = re.compile(r"(\d+) torch thread\(s\) \((.*)")


@dataclass
class Timed:
    """One command's run: what ran, with which variables set, how long it took and what it printed."""

    argv: list[str]
    env: dict[str, str]
    started: str
    wall_s: float
    cpu_s: float
    exit_code: int
    load_before: list[float] | None
    load_after: list[float] | None
    torch_threads: int | None = None
    threads_line: str | None = None
    head: list[str] = field(default_factory=list)  # the first lines of the output
    tail: list[str] = field(default_factory=list)  # the last lines
    aliases: dict[str, str] = field(default_factory=dict)  # path -> what records show instead

    def shown(self, text: str) -> str:
        """``text`` with this machine's paths replaced by their aliases (longest first)."""
        for path in sorted(self.aliases, key=len, reverse=True):
            text = text.replace(path, self.aliases[path])
        return text

    @property
    def command(self) -> str:
        """The command as one shell line, the variables it set first, paths shown by their aliases."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return self.shown((env + " " if env else "") + shlex.join(self.argv))

    def record(self) -> dict:
        """A JSON-ready record: the command, its times and loads (paths shown by their aliases; no output)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("head", "tail", "aliases", "argv")}
        out["env"] = {k: self.shown(v) for k, v in self.env.items()}
        out["threads_line"] = self.shown(self.threads_line) if self.threads_line else None
        out["command"] = self.command
        return out


def run_timed(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    cwd: str | None = None,
    log=None,
    echo: bool = False,
    keep_lines: int = 400,
    aliases: dict[str, str] | None = None,
) -> Timed:
    """Run ``argv`` with ``env`` added to (and ``unset`` removed from) this environment; stdout and stderr go,
    line by line, to ``log`` (a text file) and, with ``echo``, to this stdout. Never raises for the command's
    own failure: ``exit_code`` says it. ``aliases``: paths the records show by another name (the interpreter
    as ``python``, a work directory as ``WORK``), so no record holds this machine's paths."""
    full_env = {**os.environ, **(env or {})}
    for name in unset:
        full_env.pop(name, None)
    load_before = load_average()
    started, start = now(), time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    head: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=keep_lines)
    try:
        for line in proc.stdout:
            if len(head) < 40:
                head.append(line.rstrip("\n"))
            tail.append(line.rstrip("\n"))
            if log is not None:
                log.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    wall = time.perf_counter() - start
    timed = Timed(
        argv=list(argv),
        env=dict(env or {}),
        started=started,
        wall_s=round(wall, 3),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
        exit_code=proc.returncode,
        load_before=load_before,
        load_after=load_average(),
        head=head,
        tail=list(tail),
        aliases={sys.executable: "python", **(aliases or {})},
    )
    for line in head:
        match = THREADS_LINE.search(line)
        if match:
            timed.torch_threads, timed.threads_line = int(match.group(1)), match.group(0)
            break
    return timed
