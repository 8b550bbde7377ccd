"""`mfcache heads`: the head presets, their size and what each one changes."""

from __future__ import annotations


from mfcache.cli.common import user_errors
from mfcache.config import preset_names, resolve_run_config
from mfcache.runtime import console

# the demo detector's shape: the parameter counts below are for a cache it wrote
DEMO_SHAPE = {"d_model": 128, "c1_channels": 32, "num_levels": 4}


@user_errors
def command():
    """List the head presets with their parameter counts.

    Use one with `mfcache train --head NAME`. Counts are for the demo detector's
    features (d_model 128, C1 32 channels, 4 levels).

    Example: mfcache heads
    """
    from rich.table import Table
    from mfcache.heads import build_head

    table = Table(title="head presets (parameters for the demo detector)")
    table.add_column("name", style="bold")
    table.add_column("params", justify="right")
    table.add_column("description")
    for name in preset_names():
        config = resolve_run_config(name).head
        params = sum(p.numel() for p in build_head(config, **DEMO_SHAPE).parameters())
        table.add_row(name, f"{params:,}", config.description)
    console.print(table)
