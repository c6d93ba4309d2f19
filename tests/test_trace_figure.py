"""`forkview figure --trace ID`: one trace as an SVG, its tokens on the explorer's
colours (forkview/ui/scale.py), on a small store built here (no model needed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from forkview.cli import main
from forkview.ui.scale import VIRIDIS, entropy_style, overlay_style
from models.types import GenerationParams, TokenStep
from store import Store
from tests.conftest import db_content

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"

# token texts and entropies (nats): "Calm" lowest (bin 0), "Wild" highest (bin 8)
TOKENS = [("Calm", 0.001), ("_words", 0.05), ("\n", 0.3), ("Wild", 5.0), ("_guess", 1.2),
          ("_ends", 0.6)]
PROMPT = "Pick_a_word_please."


def _steps(start: int = 0) -> list[TokenStep]:
    return [TokenStep(position=i, token_id=10 + i, text=t, logprob=-0.5, rank=1, entropy=h,
                      sampling_entropy=h, top=[])
            for i, (t, h) in enumerate(TOKENS) if i >= start]


def _mi_run(store: Store, tid: int, estimator: str, params: dict,
            values: dict[int, float | None], status: str = "complete") -> int:
    run, _ = store.open_mi_run(tid, estimator, params)
    store.add_mi_values(run, [(p, v, None) for p, v in values.items()])
    store.finish_mi_run(run, status)
    return run


@pytest.fixture
def small_db(db_path: Path) -> dict:
    store = Store.open(db_path)
    model = store.upsert_model(name="alpha-model", spec="/models/alpha", kind="dir",
                               dtype="float32", device="cpu", content_hash="a")
    prompt = store.add_prompt(PROMPT, reference_answer="8")
    root = store.start_trace(model_id=model, prompt_id=prompt, prompt_token_ids=[1, 2],
                             params=GenerationParams(max_new_tokens=6))
    with store.writer(root) as w:
        w.add_all(_steps())
        w.finish("complete", "length")
    store.set_answer(root, None, "cut_off", None)
    # hsic: an older run, then the latest complete one ("Calm" high, "Wild" low, "_ends"
    # without a value), then runs the figure must not pick (stopped, control, other model)
    _mi_run(store, root, "hsic", {"sigma": 1}, {i: 1.0 for i in range(6)})
    latest = _mi_run(store, root, "hsic", {"sigma": 2},
                     {0: 9.0, 1: 5.0, 2: 5.0, 3: 1.0, 4: 5.0, 5: None})
    _mi_run(store, root, "hsic", {"sigma": 4}, {i: 7.0 for i in range(6)}, status="stopped")
    _mi_run(store, root, "hsic", {"sigma": 2, "control": "bandwidth"}, {0: 1.0, 3: 9.0})
    _mi_run(store, root, "hsic", {"sigma": 2, "model": "other"}, {0: 1.0, 3: 9.0})
    _mi_run(store, root, "answer-gain", {}, {1: 0.5})
    branch = store.start_trace(model_id=model, prompt_id=prompt, prompt_token_ids=[1, 2],
                               params=GenerationParams(max_new_tokens=6),
                               parent_trace_id=root, fork_position=3, forced_token_ids=[13],
                               origin="fork")
    with store.writer(branch) as w:
        w.add_all(_steps(start=3))
        w.finish("complete", "eos")
    info = store.trace(root)
    store.close()
    return {"db": db_path, "root": root, "branch": branch, "uid": info.uid, "run": latest}


def _figure(db: Path, *args: str, out: Path | None = None) -> int:
    argv = ["figure", "--db", str(db), *args]
    if out is not None:
        argv += ["-o", str(out)]
    return main(argv)


def _texts(root: ET.Element) -> list[tuple[float, float, str, str]]:
    """(x, y, text, class) of every text element of the terminal matrix."""
    return [(float(t.get("x", 0)), float(t.get("y", 0)), (t.text or "").replace("\xa0", " "),
             t.get("class", "")) for t in root.iter(SVG + "text")]


def _background(root: ET.Element, token: str) -> str | None:
    """The fill of the background under the text element holding `token` (None: none)."""
    hits = [(x, y) for x, y, text, _ in _texts(root) if token in text]
    assert hits, f"{token!r} not in the figure"
    x, y = hits[0]
    for r in root.iter(SVG + "rect"):
        if r.get("fill") is None or r.get("x") is None or r.get("height") is None:
            continue
        rx, ry, rh = float(r.get("x")), float(r.get("y")), float(r.get("height"))
        if abs(rx - x) < 1e-6 and ry < y <= ry + rh:
            return r.get("fill").lower()
    return None


def _hex(style) -> str:
    return style.bgcolor.triplet.hex.lower()


def test_entropy_figure_colours_tokens_as_the_explorer(small_db, tmp_path, capsys):
    before = db_content(small_db["db"])
    out = tmp_path / "trace.svg"
    assert _figure(small_db["db"], "--trace", str(small_db["root"]), out=out) == 0
    root = ET.parse(out).getroot()  # well-formed XML
    assert root.tag == SVG + "svg"
    everything = "\n".join(t for _, _, t, _ in _texts(root))
    for token in ("Calm", "_words", "Wild", "_guess", "_ends", PROMPT):
        assert token in everything
    title = next(t for t in root.iter(SVG + "text") if "title" in t.get("class", ""))
    assert small_db["uid"] in title.text and "alpha-model" in title.text
    assert "nats" in everything and "no answer (cut off)" in everything
    # The explorer's colours: the lowest and the highest entropy step, as its trace
    # view draws them (overlay_style, entropy view).
    low, high = _background(root, "Calm"), _background(root, "Wild")
    assert low == _hex(entropy_style(0.001)) == VIRIDIS[0]
    assert high == _hex(entropy_style(5.0)) == VIRIDIS[-1]
    assert low != high
    assert _hex(overlay_style("entropy", 8, None, False, True, False, False)) == high
    # The prompt is dimmed: its text is not in the theme's foreground colour.
    styles = "".join(s.text or "" for s in root.iter(SVG + "style"))
    fills = dict(re.findall(r"\.(terminal-\d+-r\d+) \{ fill: (#[0-9a-f]{6})", styles))
    prompt_class = next(c for _, _, t, c in _texts(root) if PROMPT in t)
    assert fills[prompt_class] != "#000000"
    # Self-contained: no web fonts to fetch.
    assert "url(\"http" not in out.read_text(encoding="utf-8")
    assert db_content(small_db["db"]) == before
    assert capsys.readouterr().err == ""


def test_mi_figure_uses_the_latest_complete_run(small_db, tmp_path):
    before = db_content(small_db["db"])
    out = tmp_path / "mi.svg"
    assert _figure(small_db["db"], "--trace", str(small_db["root"]), "--by", "mi",
                   "--estimator", "hsic", out=out) == 0
    root = ET.parse(out).getroot()
    # The latest complete hsic run (not the stopped, control or other model's run):
    # "Calm" is its highest value, "Wild" its lowest; "_ends" has no value (no
    # background, grey text as in the explorer's MI view).
    assert _background(root, "Calm") == VIRIDIS[-1]
    assert _background(root, "Wild") == VIRIDIS[0]
    assert _background(root, "_ends") is None
    everything = "\n".join(t for _, _, t, _ in _texts(root))
    assert "hsic" in everything and f"run {small_db['run']}" in everything
    assert "peaks" in everything
    assert db_content(small_db["db"]) == before


def test_branch_figure_fades_the_inherited_prefix(small_db, capsys):
    assert _figure(small_db["db"], "--trace", str(small_db["branch"]), "--width", "60") == 0
    svg = capsys.readouterr().out
    root = ET.fromstring(svg)  # to stdout without -o
    everything = "\n".join(t for _, _, t, _ in _texts(root))
    assert "Calm" in everything and "Wild" in everything
    assert "fork branch at 3" in everything and "inherited" in everything


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["--trace", "999"], 1, "no trace with id 999"),
    (["--trace", "{root}", "--by", "mi"], 2, "--estimator"),  # two estimators: choose
    (["--trace", "{root}", "--by", "mi", "--estimator", "rollout"], 2, "no complete rollout"),
    (["--trace", "{root}", "--by", "mi", "--estimator", "nope"], 2, "unknown estimator"),
    (["--trace", "{root}", "--estimator", "hsic"], 2, "goes with --by mi"),
    (["--trace", "{root}", "-o", "{tmp}/x.pdf"], 2, "SVG"),
    (["--trace", "{root}", "--width", "10"], 2, "at least 40"),
    (["--trace", "{root}", "--by", "colour"], 2, "invalid choice"),
])
def test_bad_requests_are_one_line(small_db, tmp_path, capsys, args, code, needle):
    before = db_content(small_db["db"])
    args = [a.format(root=small_db["root"], tmp=tmp_path) for a in args]
    try:
        rc = _figure(small_db["db"], *args)
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    assert rc == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert err.startswith("forkview")
    assert not list(tmp_path.glob("*.pdf")) and not list(tmp_path.glob("*.svg"))
    assert db_content(small_db["db"]) == before


def test_a_missing_database_is_not_created(tmp_path, capsys):
    db = tmp_path / "none.db"
    assert _figure(db, "--trace", "1") == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not db.exists()


def test_the_figure_never_imports_textual_or_torch():
    code = ("import json, sys, forkview.trace_figure; "
            "print(json.dumps([m for m in ('textual', 'torch', 'transformers') "
            "if m in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
