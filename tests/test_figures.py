"""Paper-ready output of the report: matplotlib figures as PDF and SVG files (fonts
embedded), inline SVG in the HTML, LaTeX booktabs tables."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from forkview.analysis import overlap as ov
from forkview.cli import main
from tests.test_report import build_db


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("figures") / "report.db"
    build_db(path)
    return path


def test_report_figures_are_valid_pdf_and_svg_files(db, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["report", "--db", str(db), "--bootstrap", "30", "--null", "30",
                 "--figures", str(out), "-o", str(tmp_path / "r.md")]) == 0
    pdfs, svgs = sorted(out.glob("*.pdf")), sorted(out.glob("*.svg"))
    assert len(pdfs) == len(svgs) >= 10
    assert {p.stem for p in pdfs} == {p.stem for p in svgs}
    assert any(p.stem.startswith("forest") for p in pdfs)
    assert any(p.stem.startswith("roc-") for p in pdfs)
    assert any(p.stem.startswith("null-") for p in pdfs)
    assert any(p.stem.startswith("position-") for p in pdfs)
    for p in pdfs:
        data = p.read_bytes()
        assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
        assert b"/FontFile2" in data  # TrueType fonts embedded
        assert b"CreationDate" not in data  # the same report gives the same file
    for p in svgs:
        root = ET.parse(p).getroot()
        assert root.tag.endswith("svg")
        assert b"<text" not in p.read_bytes()  # glyphs as paths: looks the same anywhere
    assert "figure files" in capsys.readouterr().err


def test_figures_into_a_file_is_a_one_line_error(db, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main(["report", "--db", str(db), "--figures", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


def test_latex_tables_use_booktabs_and_escape_text(db, capsys):
    assert main(["report", "--db", str(db), "--bootstrap", "30", "--null", "30",
                 "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert tex.count(r"\begin{tabular}") == tex.count(r"\bottomrule") >= 2
    assert r"\toprule" in tex and r"\midrule" in tex and r"\label{tab:primary}" in tex
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert "<b>" not in body and "_" not in body.replace(r"\_", "")
    assert "model-$<$b>B$<$/b>" in body  # the model's name as text


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.exponential(1, 500), 2)  # ties
    labels = rng.random(500) < scores / scores.max()
    got = ov.roc_curve(scores, labels, points=10_000)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(got["fpr"], fpr) and np.allclose(got["tpr"], tpr)
    assert np.trapezoid(got["tpr"], got["fpr"]) == pytest.approx(
        roc_auc_score(labels, scores))
    thin = ov.roc_curve(scores, labels, points=50)
    assert len(thin["fpr"]) <= 50 and thin["fpr"][-1] == 1.0
