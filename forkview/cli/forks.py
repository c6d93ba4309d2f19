"""A trace's family: `fork` (grow branches), `tree` (show the family), `replay`
(regenerate a trace and compare)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from forkview.cli.common import status_line
from forkview.cli.parser import db_option, float_range, positive_int, trace_model_options
from forkview.errors import EXIT_INTERRUPTED, UsageError
from forkview.trace_json import BRANCH, trace_to_json

if TYPE_CHECKING:
    from forkview.forks import FamilyNode


def add_fork(sub: Any) -> None:
    from models.types import SAMPLE_TEMPERATURE

    f = sub.add_parser("fork", help="grow branches from a position of a saved trace")
    db_option(f)
    f.add_argument("--trace", type=int, required=True, metavar="ID")
    f.add_argument("--position", type=int, required=True, metavar="P",
                   help="position as in 'annotate --json' (0 = first generated token); the "
                   "branch's token(s) replace the token there")
    what = f.add_mutually_exclusive_group(required=True)
    what.add_argument("--token", metavar="TEXT",
                      help="force this text (one or more tokens) at P, then generate")
    what.add_argument("--top", type=positive_int, metavar="K",
                      help="one branch per recorded alternative: the K most likely tokens "
                      "other than the one the trace took")
    what.add_argument("--sample", type=positive_int, metavar="N",
                      help=f"N continuations sampled in one batch (default temperature "
                      f"{SAMPLE_TEMPERATURE:g} when the trace was greedy)")
    f.add_argument("--keep-token", action="store_true",
                   help="with --sample: keep the trace's token at P (default: draw it anew)")
    f.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help="tokens generated after the forced ones (default: the trace's)")
    f.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the first branch (branch i gets S + i; default: random)")
    f.add_argument("--temperature", type=float_range(0.0, 100.0), default=None, metavar="T",
                   help="default: the trace's (1 for --sample from a greedy trace)")
    f.add_argument("--json", action="store_true",
                   help="one JSON object per branch and line, as 'annotate --json' plus "
                   "parent_trace_id, fork_position and forced_token_ids")
    trace_model_options(f, "default: the model that made the trace (another model must "
                        "have the same tokenizer)")


def add_tree(sub: Any) -> None:
    tr = sub.add_parser("tree", help="show a trace's family: root, branches, rollouts")
    db_option(tr)
    tr.add_argument("--trace", type=int, required=True, metavar="ID",
                    help="any member of the family")
    tr.add_argument("--json", action="store_true", help="nested JSON")
    tr.add_argument("--rollouts", action="store_true",
                    help="list rollout continuations one by one (default: summarised)")


def add_replay(sub: Any) -> None:
    rp = sub.add_parser("replay", help="regenerate a trace from its stored provenance and "
                        "check it matches token for token")
    db_option(rp)
    rp.add_argument("--trace", type=int, required=True, metavar="ID")
    rp.add_argument("--json", action="store_true")
    trace_model_options(rp, "default: the model that made the trace")


def _branch_json(store: Any, trace_id: int, lm: Any) -> dict[str, Any]:
    """A branch as `fork --json` prints it: the record, the model as loaded, the text
    before the fork (`full_text`) and its own tokens."""
    info = store.trace(trace_id)
    head = "".join(s.text for s in store.full_tokens(trace_id)[: info.fork_position or 0])
    return trace_to_json(info, BRANCH, model=lm.name, model_spec=lm.spec, device=lm.device,
                         dtype=lm.dtype, full_text=head + info.text,
                         tokens=[s.to_json() for s in store.tokens(trace_id)])


def cmd_fork(args: argparse.Namespace) -> int:
    from forkview import forks
    from models.answers import is_cut_off
    from store import Store

    if args.keep_token and args.sample is None:
        raise UsageError("--keep-token goes with --sample")
    if args.token is not None and not args.token:
        raise UsageError("the forced text (--token) is empty")
    # Check the request on a read-only open: a bad id or position changes nothing.
    store = Store.open(args.db, readonly=True)
    source = forks.load_source(store, args.trace)
    forks.check_position(source, args.position)
    store.close()
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.trace_model or source.info.model_spec, args.device, args.dtype,
                    args.backend, status=None if quiet else status_line)
    store = Store.open(args.db)
    forks.check_tokenizer(store, source, lm)
    params = forks.branch_params(source, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 temperature=args.temperature, sampling=args.sample is not None)
    if args.token is not None:
        plan = [forks.PlannedBranch(forks.encode_text(lm, args.token), params, "fork",
                                    repr(args.token))]
    elif args.top is not None:
        plan = forks.plan_alternatives(source, args.position, args.top, params)
    else:
        plan = forks.plan_samples(source, args.position, args.sample, args.keep_token, params)
    started: list[int] = []
    counts = [0] * len(plan)

    def progress(row: int, _step: Any) -> None:
        counts[row] += 1
        if not quiet and sum(counts) % 32 == 0:
            status_line(f"{sum(counts)} tokens over {len(plan)} branch(es)...")

    if not quiet:
        status_line(f"growing {len(plan)} branch(es) of trace {source.info.id} at position "
                    f"{args.position}")
    try:
        results = forks.grow(lm, store, source, args.position, plan,
                             on_start=lambda _r, tid: started.append(tid), on_step=progress)
    except KeyboardInterrupt:
        if started:
            status_line(f"interrupted: branches {', '.join(map(str, started))} kept (stopped)")
        return EXIT_INTERRUPTED
    for b, r in zip(plan, results, strict=True):
        if args.json:
            json.dump(_branch_json(store, r.trace_id, lm), sys.stdout, ensure_ascii=False)
            sys.stdout.write("\n")
        else:
            print(r.trace_id)
            if not quiet:
                mark = {True: "correct", False: "wrong", None: "-"}[r.correct]
                if r.answer is None and is_cut_off(r.output.stop_reason):
                    mark = "cut off"
                status_line(f"  branch {r.trace_id}: {b.label}, {len(r.output.steps)} tokens, "
                            f"{r.output.stop_reason}, answer {r.answer!r} ({mark})")
    return 0


def _tree_lines(node: FamilyNode, show_rollouts: bool, prefix: str = "",
                last: bool = True, top: bool = True) -> list[str]:
    from models.answers import is_cut_off

    mark = {True: "✓", False: "✗", None: ""}[node.correct]
    answer = f"answer {node.answer!r}{mark}" if node.answer is not None else "no answer"
    if node.answer is None and is_cut_off(node.stop_reason):
        answer = "no answer (cut off)"  # models.answers.accept_answer: never scored
    if top:
        head = f"#{node.trace_id} {node.origin} {node.status}"
    else:
        forced = node.forced_token_ids
        how = ("resampled" if forced == [] else f"forced {len(forced or [])} token(s)")
        head = f"@{node.fork_position} #{node.trace_id} {node.origin} ({how}) " \
               f"{node.status}"
    text = " ".join(node.text.split())
    line = f"{head}  {node.n_tokens} tok  {answer}  {text[:40]!r}"
    out = [line if top else prefix + ("└─ " if last else "├─ ") + line]
    child_prefix = "" if top else prefix + ("   " if last else "│  ")
    kids = node.children
    rollouts = [k for k in kids if k.origin == "rollout"]
    shown = kids if show_rollouts else [k for k in kids if k.origin != "rollout"]
    extra = []
    if rollouts and not show_rollouts:
        positions = sorted({k.fork_position for k in rollouts})
        answers: dict[Any, int] = {}
        for k in rollouts:
            answers[k.answer] = answers.get(k.answer, 0) + 1
        common = ", ".join(f"{a!r}×{n}" for a, n in
                           sorted(answers.items(), key=lambda kv: -kv[1])[:4])
        extra.append(f"{len(rollouts)} rollout continuations at {len(positions)} positions "
                     f"(answers {common}; --rollouts lists them)")
    for i, k in enumerate(shown):
        is_last = i == len(shown) - 1 and not extra
        out += _tree_lines(k, show_rollouts, child_prefix, is_last, top=False)
    for line in extra:
        out.append(child_prefix + "└─ " + line)
    return out


def cmd_tree(args: argparse.Namespace) -> int:
    from forkview.forks import family_tree
    from store import Store

    store = Store.open(args.db, readonly=True)
    tree = family_tree(store, args.trace)
    if args.json:
        json.dump(tree.to_json(), sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
        return 0
    print("\n".join(_tree_lines(tree, args.rollouts)))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from forkview import forks
    from store import Store

    store = Store.open(args.db, readonly=True)
    info = store.trace(args.trace)
    forks.check_replayable(info)
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.trace_model or info.model_spec, args.device, args.dtype,
                    args.backend, status=None if quiet else status_line)
    result = forks.replay(lm, store, args.trace)
    if args.json:
        out = {k: getattr(result, k) for k in (
            "trace_id", "matches", "compared", "first_mismatch", "max_logprob_diff", "note",
            "stored_ids", "replayed_ids")}
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    elif result.matches:
        print(f"trace {args.trace} replays token for token ({result.compared} tokens; max "
              f"|logprob difference| {result.max_logprob_diff:.2g} nats)"
              + (f"; {result.note}" if result.note else ""))
    else:
        pos = result.first_mismatch
        i = pos - (info.fork_position or 0)
        got = result.replayed_ids[i] if i < len(result.replayed_ids) else None
        want = result.stored_ids[i] if i < len(result.stored_ids) else None
        print(f"trace {args.trace} differs at position {pos}: stored token id {want}, "
              f"replayed {got} ({result.compared} tokens matched before)")
    return 0 if result.matches else 1
