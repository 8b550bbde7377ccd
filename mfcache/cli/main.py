"""The `mfcache` command: a thin Typer app over the library."""

from __future__ import annotations

from typing import Annotated

import typer

from mfcache.cli import data, demo, evaluate, extract, heads, inspect, predict, sweep, train, verify

app = typer.Typer(
    name="mfcache",
    help="Mask Frozen-DETR with a feature cache: extract a frozen detector once, train many mask heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)
app.command("demo")(demo.command)
app.add_typer(data.app, name="data")
app.command("extract")(extract.command)
app.command("train")(train.command)
app.command("eval")(evaluate.command)
app.command("inspect")(inspect.command)
app.command("verify")(verify.command)
app.command("predict")(predict.command)
app.command("heads")(heads.command)
app.command("sweep")(sweep.command)


def version() -> str:
    """The installed package's version (its metadata; the source tree's ``__version__`` when
    mfcache runs uninstalled)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("mfcache")
    except PackageNotFoundError:
        from mfcache import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mfcache {version()}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
