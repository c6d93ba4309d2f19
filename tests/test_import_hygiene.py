"""The layers import only what they need, checked in fresh interpreters.

The store and the plain types are what `forkview browse` and the exporters use: they
must open instantly, so they never pull in torch, transformers or Textual. The model
layer never draws on the screen, so it never imports Textual or rich.live.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def loaded_after(imports: str, watch: list[str]) -> list[str]:
    """Which of `watch` are in sys.modules after `imports`, in a new interpreter."""
    code = textwrap.dedent(f"""
        import json, sys
        {imports}
        print(json.dumps([m for m in {watch!r} if m in sys.modules]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_store_and_types_are_light() -> None:
    heavy = ["torch", "transformers", "textual", "numpy", "safetensors", "gguf",
             "models.loading", "models.generate"]
    imports = "import store, store.db, store.schema, store.errors, models.types, models.errors"
    assert loaded_after(imports, heavy) == []


def test_model_layer_never_imports_the_ui() -> None:
    ui = ["textual", "rich.live", "forkview.app", "forkview.cli"]
    imports = "import models.loading, models.generate"
    assert loaded_after(imports, [*ui, "torch"]) == ["torch"]  # torch: it did load


# ---------------------------------------------------------------- every module, statically
LAYERS = {
    # package prefix: module prefixes it must never import (at any depth of the file:
    # function-level imports count too)
    "store": ("torch", "transformers", "textual", "rich", "models.loading", "models.generate",
              "forkview"),
    "models": ("textual", "rich.live", "forkview"),
    "forkview.analysis": ("textual", "torch", "transformers", "forkview.ui", "forkview.app",
                          "forkview.cli", "models.loading", "models.generate"),
    # the services under the UI: data flows model -> trace -> store -> report -> screen
    "forkview.mi": ("textual", "forkview.ui", "forkview.app"),
    "forkview.forks": ("textual", "forkview.ui", "forkview.app"),
    "forkview.batch": ("textual", "forkview.ui", "forkview.app"),
    "forkview.pipeline": ("textual", "forkview.ui", "forkview.app"),
    "forkview.rescore": ("textual", "forkview.ui", "forkview.app"),
    "forkview.prompt_sets": ("textual", "forkview.ui", "forkview.app"),
    # the command line: `forkview --help` and the read-only commands never load torch or
    # Textual at import (each command imports what it needs when it runs)
    "forkview.cli": ("textual", "torch", "transformers", "numpy"),
    "forkview.errors": ("textual", "torch", "models", "store", "forkview.cli"),
    "forkview.trace_json": ("textual", "torch", "numpy", "forkview.cli"),
    "forkview.text": ("textual", "torch", "numpy"),
    # `forkview figure`: rich alone draws it, with the explorer's colours from the scale,
    # which is pure Rich (the one definition of the colours, shared with the explorer)
    "forkview.trace_figure": ("textual", "torch", "transformers", "forkview.app",
                              "forkview.cli", "forkview.ui.trace_view", "forkview.ui.explorer",
                              "forkview.ui.status", "models.loading", "models.generate"),
    "forkview.ui.scale": ("textual", "torch", "numpy"),
    # the tree opens the compare view; the compare view never imports the tree (what
    # both show lives in family_text): no cycle between screens
    "forkview.ui.compare": ("forkview.ui.tree",),
    "forkview.ui.family_text": ("textual", "forkview.ui.tree", "forkview.ui.compare"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for root in ("store", "models", "forkview"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_every_module_keeps_to_its_layer() -> None:
    """Each module of store/, models/ and forkview/ is checked against the layering
    rules above: no contract is about only the modules someone remembered to list."""
    bad = []
    modules = _modules()
    for module, path in modules.items():
        for layer, banned in LAYERS.items():
            if module != layer and not module.startswith(layer + "."):
                continue
            for name in _imports(path, module):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    bad.append(f"{module} imports {name} ({layer} must not)")
    assert not bad, "\n".join(bad)
    assert {"store.db", "models.rollout", "forkview.analysis.report"} <= set(modules)
