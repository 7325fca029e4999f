"""Calling the CLI in-process and checking its user-error contract."""

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
from pathlib import Path

from saeuron_cli import main


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``saeuron ARGV``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, pattern):
    """Exit status 2 and exactly one line ``error: ...`` containing ``pattern``, no traceback."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


@functools.cache
def tiny_model() -> str:
    """A folder holding the tiny random pipeline (seed 0) for ``--model``, written once per test session."""
    from saeuron_core.hosts.tiny_pipeline import make_tiny_pipeline

    folder = Path(tempfile.mkdtemp(prefix="saeuron-tiny-model-"))
    atexit.register(shutil.rmtree, folder, True)
    with contextlib.redirect_stderr(io.StringIO()):  # the savers' progress bars, which tests read stderr beside
        make_tiny_pipeline(0).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)
