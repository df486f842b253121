"""The command line, run as a user would: a real subprocess."""

import subprocess
import sys


def _tokenmill(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_prints_completions(tiny_models):
    folder = str(tiny_models["llama"][0])
    result = _tokenmill(
        "generate", "--model", folder, "--max-tokens", "5", "--threads", "1", "Hello", "World"
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) >= 1


def test_chat_reads_turns_from_stdin_and_answers_each(tiny_models):
    folder = str(tiny_models["qwen3"][0])
    result = _tokenmill("chat", "--model", folder, "--max-tokens", "4", stdin="hi\nand again\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") >= 2  # one answer line per turn


def test_bad_model_path_is_a_clear_error_not_a_traceback(tmp_path):
    result = _tokenmill("generate", "--model", str(tmp_path / "missing.gguf"), "Hi")
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr
