"""`forkview serve` (the explorer in a web browser), `completion` and `db-path`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from forkview.cli import build_parser, main, serve_command
from store import Store

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 90.0  # two shared cores: importing aiohttp and textual takes a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ the served command


def test_serve_defaults_to_this_machine_only() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.browse) == ("127.0.0.1", 8000, False)


def test_serve_command_is_the_explorer_with_the_same_options(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["serve", "--port", "9000", "--model", "./some-model", "--device", "cpu",
            "--dtype", "bfloat16", "--mi", "none", "--max-new-tokens", "64",
            "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--seed", "3",
            "--stop", "-- end", "--stop", "\n\n", "--alternatives", "4", "--raw",
            "--db", "rel.db"]
    args = build_parser().parse_args(argv)
    cmd = serve_command(args)
    assert cmd[:3] == [sys.executable, "-m", "forkview"]
    served = build_parser().parse_args(cmd[3:])
    assert served.command is None  # the explorer
    for key in ("model", "device", "dtype", "mi", "max_new_tokens", "temperature", "top_p",
                "top_k", "seed", "stop", "alternatives", "raw"):
        assert getattr(served, key) == getattr(args, key), key
    assert served.db == str(tmp_path / "rel.db")  # absolute: any working directory


def test_serve_command_defaults_round_trip() -> None:
    args = build_parser().parse_args(["serve"])
    served = build_parser().parse_args(serve_command(args)[3:])
    explorer = build_parser().parse_args([])
    for key in ("model", "device", "dtype", "mi", "max_new_tokens", "temperature", "top_p",
                "top_k", "seed", "stop", "alternatives", "raw", "db"):
        assert getattr(served, key) == getattr(explorer, key), key


def test_serve_browse_command(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--browse", "--db", str(tmp_path / "t.db")])
    cmd = serve_command(args)
    served = build_parser().parse_args(cmd[3:])
    assert served.command == "browse"
    assert (served.db_file or served.db) == str(tmp_path / "t.db")


def test_serve_refuses_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """A bad model path or a missing database is one error line, no server."""
    assert main(["serve", "--db", str(tmp_path / "a.db"), "--model", "./no-such-model",
                 "--port", str(free_port())]) == 1
    assert "model path does not exist" in capsys.readouterr().err
    assert main(["serve", "--browse", "--db", str(tmp_path / "missing.db"),
                 "--port", str(free_port())]) == 1
    assert "database not found" in capsys.readouterr().err


# ------------------------------------------------------------------ the server


def start_server(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {**os.environ, "FORKVIEW_DB": str(tmp_path / "serve.db"),
           "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "forkview", "serve", "--port", str(port), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: what is left of it can be seen
    )
    return proc, port


def get_page(port: int, proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert proc.poll() is None, f"serve exited early: {proc.communicate()[0]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_server(proc: subprocess.Popen[str]) -> str:
    """SIGTERM; then the server and everything it started must be gone."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(proc.pid), "processes left after SIGTERM"
    return out


def group_members(pgid: int) -> set[int]:
    """The live processes of a process group (Linux: read from /proc)."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(entry.name))
    return members


def kill_group(proc: subprocess.Popen[str]) -> None:
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_serve_answers_http_on_loopback_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, port = start_server(tmp_path)
    try:
        status, ctype, page = get_page(port, proc)
        assert status == 200 and ctype.startswith("text/html")
        assert "<html" in page.lower()
        # The page's websocket drives one explorer process per browser session, on the
        # address the page was served from.
        assert f"ws://127.0.0.1:{port}/ws" in page
        out = stop_server(proc)
    finally:
        kill_group(proc)
    said = " ".join(out.split())  # the console wraps long lines
    assert f"http://127.0.0.1:{port}" in said
    assert "-m forkview" in said


def test_serve_runs_the_app_per_browser_session(tmp_path: Path) -> None:
    """A websocket (what the page opens) starts `forkview browse` and streams its
    screen; closing it and stopping the server leaves no process behind."""
    import aiohttp

    db = tmp_path / "traces.db"
    Store.open(db).close()
    Store.close_all()
    proc, port = start_server(tmp_path, "--browse", "--db", str(db))

    async def session() -> bytes:
        screen = b""
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"http://127.0.0.1:{port}/ws?width=100&height=30") as ws:
            deadline = time.monotonic() + START_TIMEOUT
            while b"forkview" not in screen:
                left = deadline - time.monotonic()
                assert left > 0, f"no screen from the app: {screen[-500:]!r}"
                msg = await ws.receive(timeout=left)
                assert msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), msg
                if msg.type == aiohttp.WSMsgType.BINARY:
                    screen += msg.data
        return screen

    try:
        get_page(port, proc)
        screen = asyncio.run(session())
        assert b"forkview" in screen
        if Path("/proc/self/stat").exists():  # closing the tab ended its app process
            deadline = time.monotonic() + 30
            while group_members(proc.pid) - {proc.pid} and time.monotonic() < deadline:
                time.sleep(0.2)
            assert group_members(proc.pid) == {proc.pid}
        stop_server(proc)
    finally:
        kill_group(proc)


# ------------------------------------------------------------------ completion, db-path


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_completion_script(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert script.strip()
    for command in ("report", "annotate", "serve", "db-path"):
        assert command in script


def test_completion_works_in_bash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    main(["completion", "bash"])
    script = tmp_path / "forkview.bash"
    script.write_text(capsys.readouterr().out)
    probe = ('source "$1"; COMP_WORDS=(forkview re); COMP_CWORD=1; _shtab_forkview; '
             'echo "${COMPREPLY[@]}"; COMP_WORDS=(forkview serve --p); COMP_CWORD=2; '
             '_shtab_forkview; echo "${COMPREPLY[@]}"')
    out = subprocess.run([bash, "-c", probe, "bash", str(script)], capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    assert out[0].split() == ["replay", "rescore", "report"]
    assert set(out[1].split()) == {"--port", "--public-url"}


def test_completion_needs_a_known_shell(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["completion", "fish"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_db_path_honours_forkview_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FORKVIEW_DB", str(tmp_path / "mine.db"))
    assert main(["db-path"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'mine.db'}\n"
    monkeypatch.delenv("FORKVIEW_DB")
    assert main(["db-path"]) == 0
    default = Path(capsys.readouterr().out.strip())
    assert default.name == "forkview.db" and default.is_absolute()
