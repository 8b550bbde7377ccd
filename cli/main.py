"""The `mfcache` command: a thin Typer app over the library."""

from __future__ import annotations

import typer

from mfcache.cli import data, demo, evaluate, extract, heads, inspect, predict, sweep, train, verify

app = typer.Typer(
    name="mfcache",
    help="Mask Frozen-DETR with a feature cache: extract a frozen detector once, train many mask heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
