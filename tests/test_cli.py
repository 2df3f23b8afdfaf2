"""The command line as a user meets it: one clear line for every mistake, text alone on stdout."""

from __future__ import annotations

import subprocess
import sys

import pytest


def tpi(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "tpi_node.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'"),
        (["generate", "--model", "/nonexistent/dir", "--prompt", "hi"], "not found"),
        (["generate", "--prompt", "hi", "--max-tokens", "abc"], "'abc' is not a whole number"),
        (["generate", "--prompt", "hi", "--max-tokens", "0"], "must be at least 1"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "must be >= 0"),
        (["generate", "--prompt", "hi", "--top-p", "2"], "must be in (0, 1]"),
        (["synth", "--preset", "nope", "--out", "/tmp/x"], "unknown preset 'nope'"),
        (["generate", "--prompt", "hi", "--memory-budget", "lots"], "memory"),
        (["join", "--master", "127.0.0.1:1", "--dial-timeout", "0"], "must be a number > 0"),
        # nothing listens there: it gives up after its --dial-timeout, saying why
        (
            ["join", "--master", "127.0.0.1:1", "--dial-timeout", "0.5"],
            "cannot reach the master at 127.0.0.1:1 within 0.5 s",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, needle):
    r = tpi(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_dir_without_config(tmp_path):
    r = tpi("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_generate_prints_only_the_text(smollm2_dir):
    r = tpi(
        "generate",
        "--model",
        str(smollm2_dir),
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-tokens",
        "12",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "[tpi-node]" not in r.stdout and "INFO" not in r.stdout  # logs go to stderr
    assert "tokens/s" in r.stderr


def test_run_starts_no_more_local_nodes_than_cores_but_always_a_cluster():
    from tpi_node.commands.run import default_nodes

    assert [default_nodes(c) for c in (1, 2, 3, 64)] == [2, 2, 3, 3]
