"""The TUI ends when its terminal goes away (issue 13, item 2).

`uv run forkview browse DB` runs in a real pseudo-terminal that is its controlling
terminal (a session of its own, as an SSH login or a tmux window gives it). Once it has
drawn, the terminal is taken away as a dropped SSH connection takes it (the master side
closed: the kernel hangs the terminal up) or the session is sent SIGHUP. Within a few
seconds no process of that session may be left: not python, and not the `uv` parent.

Before the fix, 5 of 15 closes of a terminal where browse had been typed into a shell
(the "shell" case) left python and `uv` running under init: Textual's input thread (no
daemon) spun on the hung-up terminal after the app had stopped (restarted by the
SIGCONT that follows a hangup), or its writer thread had died on EIO and the app
blocked writing to it; KeyboardInterrupt raised by SIGHUP inside Textual's loop could
cut its cleanup short too (see forkview.app and forkview.cli.tui.run_tui).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from models.types import Alternative, GenerationParams, TokenStep
from store import Store

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="pseudo-terminals and /proc")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is two plus three?"
BROWSE_DRAWN = b"Enter opens"  # the browser's hint line: its first screen is up
CLOSES = 30
PARALLEL = 3  # two busy cores: three starts at a time keep the test near 30 s
DRAW_TIMEOUT = 60.0  # a start takes 1-2 s on an idle machine
GONE_TIMEOUT = 10.0  # the app quits in well under a second; its watchdog ends it in 2 s
BASH = shutil.which("bash")
ANSI = re.compile(rb"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def build_db(path: Path) -> Path:
    """One model, one prompt, one complete trace of five tokens."""
    store = Store.open(path)
    model = store.upsert_model(name="tiny-m", spec="tiny-m", kind="object",
                               dtype="float32", device="cpu")
    tid = store.start_trace(model_id=model, prompt_id=store.add_prompt(PROMPT),
                            prompt_token_ids=[1, 2], params=GenerationParams())
    with store.writer(tid) as w:
        for i, text in enumerate([" The", " answer", " is", " 5", "."]):
            w.add(TokenStep(position=i, token_id=10 + i, text=text, logprob=-0.5, rank=1,
                            entropy=0.3 * i, sampling_entropy=0.0,
                            top=[Alternative(10 + i, text, 0.6)]))
    store.close()
    return path


def forkview_command(*args: str) -> list[str]:
    uv = shutil.which("uv")
    if uv is None:  # pragma: no cover - the project is run with uv
        return [sys.executable, "-m", "forkview", *args]
    # exactly what a user types: `uv run --no-sync` left processes behind less often
    return [uv, "run", "forkview", *args]


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process of session `sid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        # the command name may hold spaces and parentheses: fields follow the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state not in ("Z", "X"):
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def _take_terminal() -> None:  # in the child, after setsid(): the pty becomes its tty
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def start_in_pty(cmd: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start `cmd` in a new session whose controlling terminal is a fresh 80x24 pty;
    returns the process and the master side's fd."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TEXTUAL", "PYTEST", "COLUMNS", "LINES", "NO_COLOR"))}
    env.update(TERM="xterm-256color", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                env=env, start_new_session=True, preexec_fn=_take_terminal)
    finally:
        os.close(slave)
    return proc, master


def drain(master: int, wait: float = 0.0) -> bytes:
    """What the terminal has written so far (b"" once it is gone)."""
    out = b""
    while select.select([master], [], [], wait)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: nothing left on the other side
            break
        if not chunk:
            break
        out += chunk
        wait = 0.0
    return out


def keep_reading(master: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        drain(master, min(left, 0.05))


def wait_drawn(master: int, needle: bytes, timeout: float = DRAW_TIMEOUT) -> None:
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += drain(master, 0.2)
        if needle in ANSI.sub(b"", seen):
            return
    raise AssertionError(f"never drew {needle!r}; screen so far: {ANSI.sub(b'', seen)[-400:]!r}")


def wait_session_gone(proc: subprocess.Popen[bytes], master: int | None,
                      timeout: float = GONE_TIMEOUT) -> float:
    """Seconds until no process of proc's session is left; AssertionError naming
    what is left after `timeout`. Reads the terminal meanwhile while it is open."""
    t0 = time.monotonic()
    while True:
        proc.poll()  # reaps uv, our child
        left = session_processes(proc.pid)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"still running {timeout:.0f}s after the hangup: {left}")
        if master is not None:
            drain(master)
        time.sleep(0.05)


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    for pid, _ in session_processes(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def close_once(db: Path, how: str, delay: float = 0.0) -> float:
    """Start browse in a pty, wait until it has drawn, take the terminal away and
    return the seconds until nothing of the session was left. `how`: "close" the
    master; "shell": the same, but browse was typed into an interactive shell (which
    then sends its job SIGHUP and SIGCONT, and exits); "sighup" to the process group.
    `delay`: seconds between the first screen and the hangup (the app's timers run)."""
    command = forkview_command("browse", str(db))
    if how == "shell":
        proc, master = start_in_pty([BASH, "--norc", "--noprofile", "-i"])
        os.write(master, shlex.join(command).encode() + b"\r")
    else:
        proc, master = start_in_pty(command)
    try:
        wait_drawn(master, BROWSE_DRAWN)
        keep_reading(master, delay)
        if how in ("close", "shell"):
            os.close(master)
            master = None
        else:
            os.killpg(proc.pid, signal.SIGHUP)  # uv and python; uv forwards it again
        return wait_session_gone(proc, master)
    finally:
        if master is not None:
            os.close(master)
        kill_session(proc)


def test_browse_ends_when_its_terminal_goes_away(tmp_path: Path) -> None:
    db = build_db(tmp_path / "t.db")
    # half the closes behind a shell: the case that left processes most often
    kinds = ["shell", "close", "shell", "sighup"] if BASH else ["close", "sighup"]
    hows = [kinds[i % len(kinds)] for i in range(CLOSES)]
    failures, times = [], []
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(close_once, db, how, 0.1 * (i % 5))
                   for i, how in enumerate(hows)]
        for how, future in zip(hows, futures, strict=True):
            try:
                times.append(future.result())
            except AssertionError as e:
                failures.append(f"{how}: {e}")
    assert not failures, f"{len(failures)} of {CLOSES} hangups left processes:\n" + \
        "\n".join(failures)
    assert len(times) == CLOSES


def test_explorer_hangup_saves_the_generating_trace_stopped(
        long_context_model_dir: Path, tmp_path: Path) -> None:
    """The explorer, generating without end (a tiny model with a huge context), loses
    its terminal: it ends, and the trace keeps its tokens, marked stopped."""
    db = tmp_path / "explore.db"
    proc, master = start_in_pty(forkview_command(
        "--model", str(long_context_model_dir), "--db", str(db), "--mi", "none",
        "--max-new-tokens", "100000"))
    try:
        wait_drawn(master, b"Enter generates")  # the prompt box is up
        os.write(master, b"go\r")  # typed before the model is ready: it runs once loaded
        deadline = time.monotonic() + DRAW_TIMEOUT
        while not _running_trace_with_tokens(db):
            assert time.monotonic() < deadline, ANSI.sub(b"", drain(master))[-400:]
            drain(master, 0.2)
        os.close(master)
        master = None
        wait_session_gone(proc, None)
    finally:
        if master is not None:
            os.close(master)
        kill_session(proc)
    store = Store.open(db, readonly=True)
    try:
        [info] = store.list_traces()
        assert (info.status, info.stop_reason) == ("stopped", "interrupted")
        assert info.n_tokens >= 1 and len(store.tokens(info.id)) == info.n_tokens
    finally:
        store.close()


def _running_trace_with_tokens(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return bool(con.execute("SELECT 1 FROM traces WHERE status = 'running' "
                                    "AND n_tokens > 0").fetchall())
        finally:
            con.close()
    except sqlite3.Error:  # not created yet
        return False
