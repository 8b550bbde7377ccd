"""`mfcache heads`: the head presets, their size and what each one changes."""

from __future__ import annotations

from mfcache.cli.common import JsonOpt, print_json, user_errors
from mfcache.config import preset_names, resolve_run_config
from mfcache.runtime import stdout

# the demo detector's shape: the parameter counts below are for a cache it wrote
DEMO_SHAPE = {"d_model": 128, "c1_channels": 32, "num_levels": 4}


@user_errors
def command(as_json: JsonOpt = False):
    """List the head presets with their parameter counts.

    Use one with `mfcache train --head NAME`. Counts are for the demo detector's
    features (d_model 128, C1 32 channels, 4 levels). --json: {"detector_shape", "presets":
    [{"name", "params", "description"}]}.

    Example: mfcache heads
    """
    from rich.table import Table

    from mfcache.heads import build_head

    presets = []
    for name in preset_names():
        config = resolve_run_config(name).head
        params = sum(p.numel() for p in build_head(config, **DEMO_SHAPE).parameters())
        presets.append({"name": name, "params": params, "description": config.description})
    if as_json:
        print_json({"detector_shape": DEMO_SHAPE, "presets": presets})
        return
    table = Table(title="head presets (parameters for the demo detector)")
    table.add_column("name", style="bold")
    table.add_column("params", justify="right")
    table.add_column("description")
    for preset in presets:
        table.add_row(preset["name"], f"{preset['params']:,}", preset["description"])
    stdout.print(table)
