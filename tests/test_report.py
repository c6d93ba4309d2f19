"""The overlap report: gathering from a store, the four formats, the command line, the
golden report on sample_db/, and the explorer's report screen."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from forkview.analysis import overlap as ov
from forkview.analysis.peaks import TUKEY, PeakRule
from forkview.analysis.report import (
    ReportError,
    ReportSettings,
    build_report,
    render_csv,
    render_html,
    render_json,
    render_markdown,
)
from forkview.cli import main
from models.types import GenerationParams, TokenStep
from store import Store

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "report_sample_db.md"
SCRIPT = "<script>alert(1)</script>"
WORDS = [" So", " Let", " we", " 3", " +", " =", ".", "\n\n", " Wait", " the"]
FAST = ReportSettings(bootstrap=60, null=60)


def build_db(path: Path) -> dict[str, int]:
    """12 root traces of model A (8 in set s1, 4 in s2; every third correct), all
    rescored by model B, hsic runs by both models and a sparse rollout run by A on some;
    one fork branch with its own tokens and run (left out unless branches are asked for).
    One token of every trace is a `<script>` tag; model B's name holds HTML too."""
    rng = np.random.default_rng(0)
    store = Store.open(path)
    a = store.upsert_model(name="model-A", spec="a-spec", kind="dir", dtype="float32",
                           device="cpu")
    b = store.upsert_model(name="model-<b>B</b>", spec="b-spec", kind="dir", dtype="float32",
                           device="cpu")
    params = GenerationParams(max_new_tokens=64)
    roots = []
    for i in range(12):
        prompt = store.add_prompt(f"problem {i}", reference_answer="1",
                                  source_set="s1" if i < 8 else "s2", source_id=str(i))
        tid = store.start_trace(model_id=a, prompt_id=prompt, prompt_token_ids=[1, 2],
                                params=params)
        n = 25 + 2 * i
        h = rng.exponential(0.6, n) * (rng.random(n) < 0.7)
        with store.writer(tid) as w:
            for p in range(n):
                text = SCRIPT if p == 3 else WORDS[int(rng.integers(len(WORDS)))]
                w.add(TokenStep(position=p, token_id=p % 7, text=text, logprob=-0.1, rank=1,
                                entropy=float(h[p]), sampling_entropy=0.0))
            w.finish("complete", "eos")
        store.set_answer(tid, "1" if i % 3 == 0 else "2", "final", i % 3 == 0)
        mi = 0.8 * h + rng.normal(0, 0.25, n)
        run, _ = store.open_mi_run(tid, "hsic", {"bandwidth": 50}, model_id=a)
        store.add_mi_values(run, [(p, float(mi[p]), None) for p in range(n)])
        store.finish_mi_run(run, "complete")
        if i % 2 == 0:  # rollout on a few positions only: the rest has no MI
            run, _ = store.open_mi_run(tid, "rollout", {"samples": 4}, model_id=a)
            store.add_mi_values(run, [(p, float(mi[p]), None) for p in range(0, n, 3)])
            store.finish_mi_run(run, "complete")
        hb = np.clip(h + rng.normal(0, 0.2, n), 0, None)
        store.add_token_scores(tid, b, [
            TokenStep(position=p, token_id=p % 7, text="", logprob=-0.1, rank=1,
                      entropy=float(hb[p]), sampling_entropy=0.0) for p in range(n)])
        run, _ = store.open_mi_run(tid, "hsic", {"bandwidth": 50, "model": "b"}, model_id=b)
        store.add_mi_values(run, [(p, float(0.8 * hb[p] + rng.normal(0, 0.25)), None)
                                  for p in range(n)])
        store.finish_mi_run(run, "complete")
        roots.append(tid)
    child = store.start_trace(model_id=a, prompt_id=prompt, prompt_token_ids=[1, 2],
                              params=params, parent_trace_id=roots[0], fork_position=5,
                              forced_token_ids=[3], origin="fork")
    with store.writer(child) as w:
        for p in range(5, 25):
            w.add(TokenStep(position=p, token_id=1, text=" branch", logprob=-0.1, rank=1,
                            entropy=1.0 + p / 10, sampling_entropy=0.0))
        w.finish("complete", "eos")
    run, _ = store.open_mi_run(child, "hsic", {"bandwidth": 50}, model_id=a)
    store.add_mi_values(run, [(p, float(p), None) for p in range(5, 25)])
    store.finish_mi_run(run, "complete")
    store.close()
    return {"a": a, "b": b, "child": child, "first": roots[0]}


@pytest.fixture(scope="module")
def report_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("report") / "report.db"
    return path, build_db(path)


@pytest.fixture(scope="module")
def full_report(report_db):
    path, _ = report_db
    store = Store.open(path, readonly=True)
    try:
        return build_report(store, ReportSettings(bootstrap=60, null=60, by="correct"))
    finally:
        store.close()


def rows_of(report, model="model-A", estimator="hsic", group="all"):
    (row,) = [r for r in report.rows
              if r.model == model and r.estimator == estimator and r.group == group]
    return row


# ---------------------------------------------------------------------- gathering
def comparable(doc):
    """A result's JSON as the report writes it (NaN / inf -> null), without the
    multiplicity adjustment, which only a whole report sets."""
    from forkview.analysis.report import _clean

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("adjusted_p", "p_adj")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(_clean(doc))


def test_report_numbers_match_the_statistics_on_the_stored_values(report_db, full_report):
    path, _ = report_db
    store = Store.open(path, readonly=True)
    roots = sorted(i.id for i in store.list_traces(roots_only=True))
    trace, pos, ent, mi, texts = [], [], [], [], []
    for k, tid in enumerate(roots):
        steps = store.tokens(tid)
        runs = [r for r in store.mi_runs(tid) if r.estimator == "hsic"
                and r.params == {"bandwidth": 50}]
        values = store.mi_values(runs[-1].id)
        for s in steps:
            trace.append(k)
            pos.append(s.position)
            ent.append(s.entropy)
            mi.append(values.get(s.position, np.nan))
            texts.append(s.text)
    store.close()
    trace, ent = np.array(trace), np.array(ent)
    high, _ = ov.high_entropy_mask(ent, trace, ov.EntropyRule())
    # one prompt per root here, so prompt clusters are traces; E refitted (corpus scope)
    expected = ov.analyse(trace, np.array(pos), ent, np.array(mi), high, TUKEY,
                          trace_ids=roots, texts=texts, bootstrap=60, null=60,
                          cluster=list(range(len(roots))), refit=True)
    row = rows_of(full_report)
    assert comparable(row.result.to_json()) == comparable(expected.to_json())
    assert row.params == [{"params": {"bandwidth": 50}, "traces": 12}]
    (model_a,) = [m for m in full_report.models if m.name == "model-A"]
    assert model_a.n_traces == 12 and model_a.n_tokens == len(ent)
    assert model_a.generated == 12 and model_a.rescored == 0
    assert model_a.n_high == int(high.sum())


def test_missing_mi_positions_are_left_out(full_report):
    row = rows_of(full_report, estimator="rollout")
    assert row.result.n_traces == 6  # every other trace has a rollout run
    lengths = [25 + 2 * i for i in range(0, 12, 2)]
    assert row.result.n_positions == sum(len(range(0, n, 3)) for n in lengths)


def test_branches_only_when_asked(report_db):
    path, ids = report_db
    store = Store.open(path, readonly=True)
    roots = build_report(store, FAST)
    both = build_report(store, ReportSettings(bootstrap=0, null=0, branches=True))
    store.close()
    assert ids["child"] not in rows_of(roots).result.trace_ids
    assert ids["child"] in rows_of(both).result.trace_ids
    assert rows_of(both).result.n_positions == rows_of(roots).result.n_positions + 20


def test_split_by_correct(full_report):
    groups = {r.group: r.result for r in full_report.rows
              if r.model == "model-A" and r.estimator == "hsic"}
    assert set(groups) == {"all", "correct", "incorrect"}
    assert groups["correct"].n_traces == 4 and groups["incorrect"].n_traces == 8
    assert (groups["correct"].n_positions + groups["incorrect"].n_positions
            == groups["all"].n_positions)
    # one E for the whole selection: the split only partitions it
    assert groups["correct"].n_high + groups["incorrect"].n_high == groups["all"].n_high


def test_rescoring_model_and_between_model_agreement(report_db, full_report):
    _, ids = report_db
    (model_b,) = [m for m in full_report.models if m.id == ids["b"]]
    assert model_b.generated == 0 and model_b.rescored == 12
    assert rows_of(full_report, model="model-<b>B</b>").result.n_traces == 12
    kinds = {c["what"]: c for c in full_report.comparisons}
    assert set(kinds) == {"entropy", "peaks: hsic"}
    ent = kinds["entropy"]
    assert ent["n_positions"] == model_b.n_tokens and ent["n_traces"] == 12
    assert 0 < ent["a_in_b"] <= 1 and 0 < ent["jaccard"] <= ent["a_in_b"]


def test_filters(report_db):
    path, ids = report_db
    store = Store.open(path, readonly=True)
    try:
        s2 = build_report(store, ReportSettings(bootstrap=0, null=0, sets=("s2",),
                                                models=("model-a",), estimators=("hsic",)))
        assert [(r.model, r.estimator) for r in s2.rows] == [("model-A", "hsic")]
        assert s2.rows[0].result.n_traces == 4 and s2.n_traces == 4
        by_id = build_report(store, ReportSettings(bootstrap=0, null=0,
                                                   models=(str(ids["b"]),)))
        assert {r.model_id for r in by_id.rows} == {ids["b"]}
        with pytest.raises(ReportError) as e:
            build_report(store, ReportSettings(estimators=("nope",)))
        assert e.value.usage and "nope" in str(e.value) and "hsic" in str(e.value)
        with pytest.raises(ReportError) as e:
            build_report(store, ReportSettings(sets=("nope",)))
        assert not e.value.usage
        with pytest.raises(ReportError) as e:
            build_report(store, ReportSettings(models=("nobody",)))
        assert e.value.usage
    finally:
        store.close()


def test_peak_rule_and_entropy_scope_are_used(report_db):
    path, _ = report_db
    store = Store.open(path, readonly=True)
    try:
        rep = build_report(store, ReportSettings(
            bootstrap=0, null=0, peaks=PeakRule("topk", 3),
            entropy=ov.EntropyRule("trace", 0.25), estimators=("hsic",), models=("model-A",)))
    finally:
        store.close()
    row = rows_of(rep)
    assert row.result.n_peaks == 3 * 12
    assert rep.models[0].threshold is None and rep.models[0].thresholds_median is not None


# ---------------------------------------------------------------------- formats
class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_escapes_model_text(full_report):
    page = render_html(full_report)
    parser = _Collect()
    parser.feed(page)
    assert "script" not in parser.tags and "b" not in parser.tags  # nothing injected
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the token, as text
    assert "model-&lt;b&gt;B&lt;/b&gt;" in page
    assert any(SCRIPT in t for t in parser.text)  # what a reader sees
    # matplotlib's inline SVG: the only addresses are the SVG and XLink namespaces
    assert parser.tags.count("svg") >= 4 and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace(
        '"-//W3C//DTD SVG 1.1//EN"', "").replace(
        '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd"', "")
    assert "<link" not in page and "src=" not in page
    assert f"forkview {full_report.version}" in page and "60 resamples" in page


def test_markdown_keeps_tags_inert(full_report):
    md = render_markdown(full_report)
    for line in md.splitlines():
        rest = line
        while SCRIPT in rest:  # only ever inside a code span
            before, rest = rest.split(SCRIPT, 1)
            assert before.endswith('`"'), line
    assert "model-&lt;b>B&lt;/b>" in md
    assert "| setting | value |" in md and "forkview version" in md
    assert "\\|E∩P\\|" in md  # pipes inside cells escaped, tables keep their columns
    # every table keeps its columns: each row has as many unescaped pipes as its header
    import re

    cols = None
    for line in md.splitlines():
        if not line.startswith("|"):
            cols = None
            continue
        n = len(re.findall(r"(?<!\\)\|", line))
        cols = cols or n
        assert n == cols, line


def test_json_and_csv_parse_and_carry_settings(full_report):
    data = json.loads(render_json(full_report))
    assert data["forkview_version"] == full_report.version
    assert data["settings"]["bootstrap"]["iterations"] == 60
    assert data["settings"]["peak_rule"] == {"name": "tukey", "param": 1.5,
                                             "definition": data["settings"]["peak_rule"][
                                                 "definition"]}
    assert len(data["rows"]) == len(full_report.rows)
    row = data["rows"][0]
    assert set(row["stats"]) == set(ov.STAT_NAMES)
    assert len(row["per_trace"]["trace_id"]) == row["n_traces"]
    rows = list(csv.DictReader(io.StringIO(render_csv(full_report))))
    assert len(rows) == len(full_report.rows)
    assert {r["forkview_version"] for r in rows} == {full_report.version}
    assert rows[0]["peak_rule"] == "tukey" and rows[0]["bootstrap"] == "60"
    assert float(rows[0]["precision"]) == pytest.approx(
        full_report.rows[0].result.stats["precision"].value)


# ---------------------------------------------------------------------- command line
def test_cli_report_formats_and_exit_codes(report_db, tmp_path, capsys):
    path, _ = report_db
    db = ["report", "--db", str(path), "--bootstrap", "20", "--null", "20"]
    for fmt in ("md", "html", "json", "csv"):
        out = tmp_path / f"r.{fmt}"
        assert main([*db, "--format", fmt, "-o", str(out)]) == 0
        assert out.stat().st_size > 100
    json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert main([*db, "--format", "csv", "--estimator", "hsic", "--by", "correct"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 2 * 3

    cases = [
        (["--rho", "1.5"], 2, "--rho"),
        (["--rho", "0"], 2, "--rho"),
        (["--estimator", "nope"], 2, "nope"),
        (["--model", "nobody"], 2, "nobody"),
        (["--peaks", "topk", "--peak-param", "2.5"], 2, "topk"),
        (["--set", "nope"], 1, "no finished traces"),
        (["-o", str(tmp_path / "missing" / "r.md")], 1, "does not exist"),
        (["-o", str(tmp_path)], 1, "is a directory"),
    ]
    for extra, code, text in cases:
        assert main([*db, *extra]) == code, extra
        err = capsys.readouterr().err
        assert err.startswith("forkview: error: ") and text in err, (extra, err)
        assert len(err.strip().splitlines()) == 1
    assert main(["report", "--db", str(tmp_path / "nope.db")]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*db, "--format", "pdf"])
    assert e.value.code == 2


def test_cli_report_loads_no_torch_and_no_textual(report_db, tmp_path):
    path, _ = report_db
    code = textwrap.dedent(f"""
        import json, sys
        from forkview.cli import main
        rc = main(["report", "--db", {str(path)!r}, "--bootstrap", "5", "--null", "5",
                   "--format", "json", "-o", {str(tmp_path / "r.json")!r}])
        print(json.dumps([rc] + [m for m in ("torch", "transformers", "textual")
                                 if m in sys.modules]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0]


def test_golden_report_on_sample_db(tmp_path):
    """The Markdown report of sample_db/arith.db with fixed settings, byte for byte.

    The sample is copied first (opening it, even read-only, upgrades an older schema in
    place). After sample_db/ or the report's layout changes on purpose, regenerate with
    FORKVIEW_UPDATE_GOLDEN=1 uv run pytest tests/test_report.py -k golden
    """
    sample = ROOT / "sample_db" / "arith.db"
    before = hashlib.sha256(sample.read_bytes()).hexdigest()
    copy = tmp_path / "arith.db"
    shutil.copyfile(sample, copy)
    out = tmp_path / "report.md"
    rc = main(["report", "--db", str(copy), "--bootstrap", "200", "--null", "200",
               "--seed", "0", "--format", "md", "-o", str(out)])
    assert rc == 0
    text = out.read_text(encoding="utf-8")
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == before
    if os.environ.get("FORKVIEW_UPDATE_GOLDEN"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


# ---------------------------------------------------------------------- the screen
def report_app(path: Path, settings: ReportSettings = FAST):
    from textual.app import App

    from forkview.ui.report_screen import ReportScreen

    class ReportApp(App[None]):
        def on_mount(self) -> None:
            self.push_screen(ReportScreen(path, settings=settings))

    return ReportApp()


async def settle(pilot) -> None:
    """Until the report is on screen and laid out. The summary table sizes its columns
    from its rows on a later refresh than the one that adds them, so a snapshot taken
    right after the rows arrive (as under load) can catch the header at its old widths:
    wait for the rows, then for the screen to be idle twice."""
    from textual.widgets import DataTable

    for _ in range(100):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        screen = pilot.app.screen
        if getattr(screen, "report", None) is not None and not pilot.app.workers._workers:
            table = screen.query(DataTable).first()
            if table.row_count:
                break
    for _ in range(2):
        await pilot.wait_for_scheduled_animations()
        await pilot.pause(0.05)


async def test_report_screen_shows_the_report_numbers_and_refilters(report_db):
    from textual.widgets import DataTable, Select

    path, ids = report_db
    app = report_app(path)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot)
        screen = app.screen
        store = Store.open(path, readonly=True)
        expected = build_report(store, FAST, database=path.name)
        store.close()
        assert screen.report.to_json() == expected.to_json()
        table = screen.query_one("#report-summary", DataTable)
        assert table.row_count == len(expected.rows)
        screen.query_one("#filter-model", Select).value = str(ids["a"])
        screen.query_one("#filter-estimator", Select).value = "hsic"
        await settle(pilot)
        assert [(r.model_id, r.estimator) for r in screen.report.rows] == [(ids["a"], "hsic")]
        assert table.row_count == 1
        screen.query_one("#filter-set", Select).value = "s2"
        await settle(pilot)
        assert screen.report.n_traces == 4
        await pilot.press("escape")


async def test_report_screen_can_share_the_apps_store(report_db):
    """The explorer passes its own (writable) store: reading in the worker's thread
    inside one read transaction must work and leave the store usable."""
    from textual.app import App

    from forkview.ui.report_screen import ReportScreen

    path, _ = report_db
    store = Store.open(path)

    class ReportApp(App[None]):
        def on_mount(self) -> None:
            self.push_screen(ReportScreen(path, settings=FAST, store=store))

    app = ReportApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.screen.report is not None and len(app.screen.report.rows) == 3
    assert store.count_traces() == 13
    store.close()


def test_terminal_plots():
    from forkview.ui.report_screen import column_chart, hbar

    assert hbar(1.0, 1.0, 4) == "████"
    assert hbar(0.5, 1.0, 3) == "█▌"
    assert hbar(0.0, 1.0, 3) == "" and hbar(float("nan"), 1.0, 3) == ""
    rows = column_chart([0, 4, 8], height=2)
    assert rows == ["  █", " ██"]
    assert column_chart([1, 2], height=1) == ["▄█"]


def test_snapshot_report_screen(snap_compare, report_db):
    path, _ = report_db
    assert snap_compare(report_app(path), run_before=settle, terminal_size=(80, 24))
