"""Checks shared by the command-line tests."""
from __future__ import annotations

from simclrv2.cli import main


def expect_one_line_error(capsys, args: list, *fragments: str) -> str:
    """Run ``simclrv2 *args``; assert exit code 2 and one stderr line (no traceback) naming every
    fragment; return that line."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err
