"""The `calm` command line: a thin group; each command lives in `calm.commands.<name>`."""

from __future__ import annotations

import importlib

import click

from calm import __version__

# command name -> "module:attribute"; imported only when the command runs (keeps `calm --help` fast).
COMMANDS = {
    "extract": "calm.commands.extract:extract",
    "prompts": "calm.commands.prompts:prompts",
    "evaluate": "calm.commands.evaluate:evaluate",
    "fit": "calm.commands.fit:fit",
    "predict": "calm.commands.predict:predict",
    "serve": "calm.commands.serve:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="calm")
def main() -> None:
    """Few-shot audio classification from frozen audio-language models (CALM, SAV)."""


if __name__ == "__main__":  # pragma: no cover
    main()
