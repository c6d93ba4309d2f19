"""The `forkview` command (`forkview.cli:main`; `python -m forkview` runs the same).

  dispatch.py  build_parser (commands in --help order), COMMANDS, main, and
               exit_status: the one mapping from errors to exit statuses
  parser.py    the parser class (one-line usage errors, exit 2), value types, shared
               option groups (--model, --db, generation options...)
  common.py    status lines, MI estimators by name, the coloured token stream
  generate.py  annotate          tui.py     the explorer, browse, serve
  traces.py    traces, export, figure, merge, db-path
  forks.py     fork, tree, replay
  mi.py        mi, rescore, import
  report.py    report

Imports stay inside the commands: `forkview --help`, `traces`, `export` and `browse`
never import torch (nor, but for `browse`, Textual), so they answer at once on a
machine where loading torch takes seconds. The errors are forkview/errors.py's.
"""

from forkview.cli.dispatch import COMMANDS, build_parser, exit_status, main
from forkview.cli.parser import PROG, Parser, generation_params, usage_line
from forkview.cli.tui import serve_command
from forkview.errors import UsageError

_params = generation_params  # the name tests/test_thinking.py imports

__all__ = ["COMMANDS", "PROG", "Parser", "UsageError", "build_parser", "exit_status",
           "generation_params", "main", "serve_command", "usage_line"]
