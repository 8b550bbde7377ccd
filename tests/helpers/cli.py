"""The one assertion every user-error test makes about a CLI result."""


def one_error_line(result, *needles):
    """``result`` (typer's CliRunner) exited 1 with one ``error:`` message and no traceback;
    the message (rich may wrap it) contains every ``needle``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and text.count("error:") == 1, result.output
    for needle in needles:
        assert needle in text, text
