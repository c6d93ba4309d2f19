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
