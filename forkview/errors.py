"""forkview's own errors: one line for a person, and the command's exit status.

`forkview.cli.dispatch.exit_status` (called by `main`) is the one place an exception
becomes a message and an exit status. The model layer's `models.errors.ModelError` and
the store's `store.errors.StoreError` are not subclasses (models/ and store/ never
import forkview/), so it names them beside these.

Which to raise:
  UsageError     a bad command-line value or request (`--positions x,y`, greedy copies):
                 exit 2, the line pointing at the command's --help
  ForkviewError  a well-formed request that cannot be done (a position past the trace's
                 end): exit 1; subclasses, e.g. forkview.forks.ForkError, say where
  StoreError     the database, or what it holds, cannot serve the request: a missing
                 trace, a trace still running or without tokens, an empty prompt set
  ModelError     a model cannot be loaded or used (bad spec, too-long prompt)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class ForkviewError(Exception):
    """A request forkview refuses: reported on one line, exit status `exit_code`."""

    exit_code = EXIT_FAILED


class UsageError(ForkviewError):
    """A bad command-line value: reported on one line, exit status 2."""

    exit_code = EXIT_USAGE
