"""Names that explain themselves (issue 22): no two public classes of src/calm share a name, and no two
modules share one except where the name is the same thing seen from two places (listed, with why)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "calm"

# module stem -> why several modules may carry it
SHARED_MODULE_NAMES = {
    "__init__": "a package",
    "base": "a package's contract (models, data, classifiers)",
    "verify": "`calm verify` (commands/) fronts the store's verification (store/)",
    "prompts": "`calm prompts` (commands/) prints the prompt templates (calm/prompts.py)",
    "serve": "`calm serve` (commands/) starts the HTTP service (calm/serve/)",
    "folder": "the `folder:` dataset kind (data/, one module per kind) and a store's key folder (store/)",
}


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_two_public_classes_share_a_name():
    where = defaultdict(list)
    for path in _modules():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(SRC)))
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not shared, f"classes defined in several modules: {shared}"


def test_module_names_are_shared_only_where_listed():
    where = defaultdict(list)
    for path in _modules():
        where[path.stem].append(str(path.relative_to(SRC)))
    shared = {
        stem: paths for stem, paths in where.items() if len(paths) > 1 and stem not in SHARED_MODULE_NAMES
    }
    assert not shared, f"modules sharing a name (rename one, or list it with a reason): {shared}"
