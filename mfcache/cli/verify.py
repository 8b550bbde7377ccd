"""`mfcache verify`: read every chunk of a cache and check it against its index."""

from __future__ import annotations

import typer

from mfcache.cli.common import CacheArg, CacheOrOpt, JsonOpt, one_cache, print_json, user_errors
from mfcache.runtime import stdout


@user_errors
def command(cache: CacheArg = None, cache_opt: CacheOrOpt = None, as_json: JsonOpt = False):
    """Check a cache for damage; exits 1 listing every problem found.

    Checks index consistency, completion flags, that every chunk is readable, finite and
    matches its checksum, and that the fingerprint is well formed. The report goes to stdout
    (--json: {"path", "ok", "problems", "splits"}), with exit code 1 if anything is wrong.

    Example: mfcache verify caches/ddetr  (or: mfcache verify --cache caches/ddetr)
    """
    cache = one_cache(cache, cache_opt)
    import dataclasses

    from rich.table import Table

    from mfcache.cache.verify import verify

    report = verify(cache)
    if as_json:
        print_json(
            {
                "path": str(report.path),
                "ok": report.ok,
                "problems": report.problems,
                "splits": [dataclasses.asdict(s) for s in report.splits],
            }
        )
        if not report.ok:
            raise typer.Exit(1)
        return
    if not report.ok:
        stdout.print(
            f"[bold red]cache {report.path} is damaged[/bold red] ({len(report.problems)} problems):", highlight=False
        )
        for line in report.problems:
            stdout.print(f"  [red]-[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    table = Table(
        "split", "images", "written", "skipped", "pending", "chunks read", "bytes checked", title=f"{report.path}: OK"
    )
    for s in report.splits:
        table.add_row(
            s.name,
            str(s.num_rows),
            str(s.written),
            str(s.skipped),
            str(s.pending),
            str(s.chunks),
            f"{s.bytes / 2**20:.1f} MiB",
        )
    stdout.print(table)
    pending = sum(s.pending for s in report.splits)
    if pending:
        stdout.print(f"{pending} images not extracted yet: run the same `mfcache extract` command to finish")
