"""`calm predict`: label audio files with a classifier saved by `calm fit` (or `clf.save`)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click

from calm._files import printable


def rebuild_extractor(metadata: dict, device: str):
    """The extractor a saved classifier was fitted on, checked against the stored extraction key."""
    from calm.models import load_extractor

    model = metadata.get("model")
    if not model:
        raise click.ClickException("the classifier's metadata names no model (fit it with `calm fit`)")
    kwargs = {"heads": metadata.get("heads") or "all", "prompt": metadata.get("prompt"), "device": device}
    if metadata.get("layers") is not None:
        kwargs["layers"] = metadata["layers"]
    extractor = load_extractor(model, **kwargs, **(metadata.get("options") or {}))
    stored = (metadata.get("extraction_key") or {}).get("extractor")
    if stored is not None:
        now = json.loads(json.dumps(extractor.key))
        diff = sorted(k for k in set(stored) | set(now) if k != "dtype" and stored.get(k) != now.get(k))
        if diff:
            raise click.ClickException(
                f"the extractor differs from the one the classifier was fitted on in {diff}"
            )
    return extractor


@click.command()
@click.argument("model_path", metavar="MODEL.safetensors", type=click.Path(dir_okay=False, exists=True))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--csv", "csv_out", default=None, type=click.Path(dir_okay=False), help="Also write a CSV here."
)
@click.option(
    "--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write JSON here."
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
def predict(model_path, files, csv_out, json_out, device, batch_size):
    """Print the predicted label and its probability for each audio file."""
    import numpy as np

    import calm

    clf = calm.load(model_path)
    extractor = rebuild_extractor(dict(getattr(clf, "metadata_", {}) or {}), device)
    rows, loaded = [], []
    for f in files:
        try:
            loaded.append((f, extractor.load_input(f)))
        except (ValueError, OSError, RuntimeError) as exc:  # AudioError, missing files, decoder errors
            rows.append({"path": f, "label": None, "probability": None, "error": str(exc)})
    for i in range(0, len(loaded), batch_size):
        batch = loaded[i : i + batch_size]
        feats = np.asarray(extractor.extract([x for _, x in batch]), dtype=np.float32)
        proba = np.asarray(clf.predict_proba(feats))
        for (f, _), p in zip(batch, proba, strict=True):
            j = int(np.argmax(p))
            rows.append({"path": f, "label": str(clf.classes_[j]), "probability": float(p[j]), "error": None})
    order = {f: i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["path"]])
    for r in rows:
        if r["error"]:
            click.echo(f"{printable(r['path'])}\tERROR\t{printable(r['error'])}")
        else:
            click.echo(f"{printable(r['path'])}\t{r['label']}\t{r['probability']:.4f}")
    if csv_out:  # file names that are not valid UTF-8 are written with \xNN escapes
        with open(csv_out, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["path", "label", "probability", "error"])
            w.writeheader()
            w.writerows({k: printable(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows)
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1) + "\n")
    if any(r["error"] for r in rows):
        sys.exit(1)
