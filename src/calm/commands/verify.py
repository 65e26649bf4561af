"""`calm verify STORE [--repair]`: check a feature store; repair what can be repaired."""

from __future__ import annotations

import sys

import click

from calm._files import printable


@click.command()
@click.argument("store", type=click.Path(file_okay=False, exists=True))
@click.option("--key", default=None, help="Check only this extraction key (digest or folder name prefix).")
@click.option("--repair", is_flag=True, help="Move bad shards aside and drop the rows that cannot be used.")
@click.option("--full", is_flag=True, help="Also check each shard's sha256 (slower).")
def verify(store: str, key: str | None, repair: bool, full: bool) -> None:
    """Check every shard and index line of STORE; exit status 1 when a problem remains."""
    from calm.store import StoreError, verify_store

    try:
        reports = verify_store(store, key, repair=repair, full=full)
    except StoreError as exc:
        raise click.ClickException(printable(str(exc))) from None
    remaining = False
    for report in reports:
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"{printable(report.key_dir)}: {report.rows} rows in {report.shards} shards: {status}")
        for problem in report.problems:
            click.echo(f"  problem: {printable(problem)}")
        for fix in report.repaired:
            click.echo(f"  repaired: {printable(fix)}")
        if report.dropped and repair:
            click.echo(f"  {len(report.dropped)} clips will be extracted again by the next `calm extract`")
        remaining |= not report.ok
    if remaining and repair:  # what the repair could not fix
        remaining = not all(r.ok for r in verify_store(store, key, full=full))
    if remaining:
        click.echo(
            "problems remain" if repair else "run again with --repair to fix what can be fixed", err=True
        )
        sys.exit(1)
