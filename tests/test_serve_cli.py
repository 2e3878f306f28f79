"""``gradcam serve`` and ``gradcam study`` on the command line: one-line errors, the optional extra."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import run_gradcam

WITHOUT_SERVE_EXTRA = (
    "import sys\n"
    "for name in ('sqlalchemy', 'fastapi', 'uvicorn', 'starlette'):\n"
    "    sys.modules[name] = None  # as if the serve extra were not installed\n"
    "from gradcam.cli import main\n"
    "sys.argv = ['gradcam', *sys.argv[1:]]\n"
    "main()\n"
)


@pytest.mark.parametrize("command", [["serve"], ["study", "list"], ["study"]])
def test_without_the_serve_extra_the_commands_say_what_to_install(command):
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVE_EXTRA, *command], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'gradcam[serve]'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    explain = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVE_EXTRA, "methods"], capture_output=True, text=True, timeout=120
    )
    assert explain.returncode == 0 and "gradcam" in explain.stdout  # the rest of the CLI still works


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--model", "nope"], "--model 'nope' not found"),
        (["--admin-token", "short"], "at least 16 characters"),
        (["--study-images", "/no/such/folder"], "not a folder"),
        (["--port", "70000"], "--port"),
        (["--device", "gpu"], "--device"),
    ],
)
def test_bad_options_are_one_line_errors(options, words):
    result = run_gradcam("serve", *options)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    database = f"sqlite:///{tmp_path / 'study.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_gradcam(
            "serve", "--port", str(port), "--admin-token", "x" * 20, "--random-weights", "--db", database
        )
    assert result.returncode == 2 and f"--port {port}: cannot listen there" in result.stderr
    assert "Traceback" not in result.stderr
