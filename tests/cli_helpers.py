"""Calling the CLI in-process and checking its user-error contract."""

from saeuron_core.cli import main


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
