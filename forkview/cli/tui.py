"""The Textual commands: the explorer (`forkview` without a command), `browse`, and
`serve`, which runs either in a web browser. Textual is imported only when one opens."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from forkview.cli.common import estimators_named, status_line
from forkview.cli.parser import (
    check_template_options,
    db_option,
    explorer_options,
    generation_options,
    generation_params,
    port_number,
)


def add_browse(sub: Any) -> None:
    b = sub.add_parser("browse", help="browse saved traces without loading a model")
    b.add_argument("db_file", nargs="?", metavar="DB", help="database file (default: --db)")
    db_option(b)


def add_serve(sub: Any) -> None:
    sv = sub.add_parser("serve", help="serve the explorer (or the browser) in a web browser; "
                        "for SSH: ssh -L 8000:127.0.0.1:8000 HOST, then open "
                        "http://127.0.0.1:8000", allow_abbrev=False)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; there "
                    "is no login, so anyone who can reach another address can use it)")
    sv.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    sv.add_argument("--public-url", default=None, metavar="URL",
                    help="the address the web browser uses, when it is not http://HOST:PORT "
                    "(e.g. a tunnel to another local port)")
    sv.add_argument("--browse", action="store_true",
                    help="serve 'forkview browse' (saved traces, no model) instead of the "
                    "explorer")
    explorer_options(sv)
    generation_options(sv)


def cmd_browse(args: argparse.Namespace) -> int:
    from store import Store

    db = args.db_file or args.db
    Store.open(db, readonly=True).close()
    from forkview.app import create_app

    return run_tui(create_app(db_path=db, browse_only=True))


def cmd_explore(args: argparse.Namespace) -> int:
    from models.engine import check_options
    from models.loading import resolve_spec

    resolve_spec(args.model)  # a path that doesn't exist fails here, before the TUI opens
    # likewise a missing llama.cpp extra, or options its engine cannot take
    check_options(args.backend, args.device, args.dtype)
    from forkview import preload

    # On llama.cpp the model loads while the store and the explorer are imported.
    pre = preload.start(args.model, args.device, args.dtype, args.backend)
    from store import Store
    from store.db import default_db_path

    Store.open(args.db).close()
    names = [] if args.mi.strip() in ("", "none") else args.mi.split(",")
    mi_names = [e.name for e in estimators_named(names, [])]  # unknown names fail here too
    from forkview.app import create_app

    app = create_app(
        db_path=args.db or default_db_path(), model_spec=args.model, device=args.device,
        dtype=args.dtype, backend=args.backend, params=generation_params(args),
        mi_estimators=mi_names, preload=pre,
    )
    return run_tui(app)


def run_tui(app: Any) -> int:
    """Run the explorer or the browser until it quits or its terminal goes away.

    Here SIGHUP (the window or the SSH connection closing), SIGTERM and SIGINT ask the
    app to quit as `q` does (`ForkviewApp.hang_up`: running work is saved as stopped;
    the status is 128 + the signal) and arm a watchdog that ends the process if the app
    cannot. Not KeyboardInterrupt, as in the other commands (`_raise_interrupt`): raised
    inside Textual's event loop, one of the several a hangup brings (the kernel's, the
    shell's, those `uv run` forwards) could cut Textual's cleanup short and leave its
    input thread, no daemon, spinning on the dead terminal, keeping python and the `uv`
    waiting for it alive (issue 13). A terminal that goes away without a signal is
    noticed by the app's driver (forkview.app)."""


    hang_up = getattr(app, "hang_up", None)  # a ForkviewApp; any other app runs as is

    def on_signal(signum: int, _frame: Any) -> None:
        hang_up(128 + signum)

    previous: dict[int, Any] = {}
    if hang_up is not None:
        wanted = (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
        previous = {sig: signal.signal(sig, on_signal) for sig in wanted if sig is not None}
        app.arm_watchdog()
    try:
        app.run()
    finally:
        if not getattr(app, "hung_up", False):  # after a hangup, repeats change nothing
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return int(getattr(app, "return_code", 0) or 0)


def serve_command(args: argparse.Namespace) -> list[str]:
    """The command textual-serve runs for each browser session: `forkview` (or
    `forkview browse`) with the options `serve` was given, run by this interpreter
    (`sys.executable -m forkview`, so it works under `uv run` and in any venv)."""
    cmd = [sys.executable, "-m", "forkview"]
    db = [f"--db={os.path.abspath(os.path.expanduser(args.db))}"] if args.db else []
    if args.browse:
        return [*cmd, "browse", *db]
    # --flag=value: a value starting with '-' (a stop text, an empty --mi) stays a value.
    cmd += [f"--mi={args.mi}", f"--model={args.model}", f"--device={args.device}",
            f"--dtype={args.dtype}", f"--backend={args.backend}",
            f"--max-new-tokens={args.max_new_tokens}",
            f"--temperature={args.temperature!r}", f"--top-p={args.top_p!r}",
            f"--top-k={args.top_k}", f"--alternatives={args.alternatives}"]
    if args.seed is not None:
        cmd.append(f"--seed={args.seed}")
    cmd += [f"--stop={text}" for text in args.stop]
    if args.raw:
        cmd.append("--raw")
    if args.system is not None:
        cmd.append(f"--system={args.system}")
    if args.enable_thinking is not None:
        cmd.append("--enable-thinking" if args.enable_thinking else "--no-enable-thinking")
    return cmd + db


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress
    import shlex

    from store import Store

    # What the served command would refuse is refused here, before the server starts.
    if args.browse:
        Store.open(args.db, readonly=True).close()
    else:
        Store.open(args.db).close()
        from models.engine import check_options
        from models.loading import resolve_spec

        resolve_spec(args.model)
        check_options(args.backend, args.device, args.dtype)
        names = [] if args.mi.strip() in ("", "none") else args.mi.split(",")
        estimators_named(names, [])
        check_template_options(args)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        status_line(f"warning: listening on {args.host}: there is no login, anyone who can "
                    "reach this address can run the explorer and write the database")
    from textual_serve.server import Server

    server = Server(shlex.join(serve_command(args)), host=args.host, port=args.port,
                    title="forkview", public_url=args.public_url)
    server.serve()  # until SIGINT or SIGTERM
    return 0
