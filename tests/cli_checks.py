"""What every command-line test checks of a refusal: one line on stderr, no traceback, exit 2."""

from __future__ import annotations

EVAL_FAST = ["--linear-epochs", "5", "--finetune-epochs", "1", "--device", "cpu", "--quiet"]
"""linear-probe flags for tests: short probes, the CPU, no progress bars."""


def assert_one_line_error(capsys, status: int, *fragments: str, prog: str = "linear-probe") -> str:
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith(f"{prog}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err
