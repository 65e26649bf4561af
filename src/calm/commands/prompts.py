"""`calm prompts`: show the prompt templates, optionally rendered for given class names."""

from __future__ import annotations

import warnings

import click
from rich.console import Console
from rich.table import Table

from calm.errors import CalmError
from calm.prompts import DEFAULT_TEMPLATE, TEMPLATES, LabelLeakWarning, render_prompt


def _split_classes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    classes = [c.strip() for c in value.split(",") if c.strip()]
    if not classes:
        raise click.BadParameter("no class names given", param_hint="--classes")
    return classes


def _example(name: str, classes: list[str] | None) -> str:
    template = TEMPLATES[name]
    if template.options in ("classes", "true-plus-distractors") and not classes:
        return "(pass --classes to render)"
    true_class = classes[0] if template.leaks_labels and classes else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelLeakWarning)
        try:
            return render_prompt(template, classes, true_class=true_class).text
        except CalmError as err:
            return f"(cannot render: {err})"


@click.command()
@click.option("--classes", help="Comma-separated class names to render the templates with.")
@click.option("--template", "name", type=click.Choice(sorted(TEMPLATES)), help="Show only this template.")
def prompts(classes: str | None, name: str | None) -> None:
    """Show the prompt templates (the text that follows the audio in the user turn)."""
    class_list = _split_classes(classes)
    console = Console()
    table = Table(show_lines=True)
    for column in ("name", "description", "example"):
        table.add_column(column, overflow="fold")
    for template_name in [name] if name else list(TEMPLATES):
        template = TEMPLATES[template_name]
        label = template_name + (" (default)" if template_name == DEFAULT_TEMPLATE else "")
        style = "bold red" if template.leaks_labels else None
        table.add_row(label, template.description, _example(template_name, class_list), style=style)
    console.print(table)
    if any(TEMPLATES[n].leaks_labels for n in ([name] if name else TEMPLATES)):
        console.print(
            "[bold red]warning:[/] paper-4way puts each clip's true class into its prompt; "
            "features of test clips then carry the label. Use it only to reproduce the paper."
        )
