"""`calm.commands.options.given_options` / `given_command`: the options a command line gave, read
from the context passed in (not only the current one)."""

from __future__ import annotations

import click

from calm.commands.options import given_command, given_options


@click.command("demo")
@click.option("--seeds", default="0")
@click.option("--name", default="a")
@click.option("--tag", multiple=True)
def demo(**_: object) -> None:
    pass


def _context(args: list[str]) -> click.Context:
    return demo.make_context("demo", args)  # parsed, never made the current context


def test_given_command_reads_the_context_it_is_given():
    ctx = _context(["--name", "b c", "--tag", "x", "--tag", "y"])
    assert given_command(ctx) == "calm demo --name 'b c' --tag x --tag y"


def test_given_options_of_a_context_leave_the_defaults_out():
    ctx = _context(["--seeds", "1,2"])
    assert given_options(["seeds", "name", "tag", "nothing"], ctx) == ["seeds"]
    with ctx:  # the current context by default
        assert given_options(["seeds", "name"]) == ["seeds"]
