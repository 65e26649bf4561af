"""`calm evaluate`: few-shot episodes over a dataset (or an existing feature store), tables and figures."""

from __future__ import annotations

import time
from pathlib import Path

import click

from calm.commands.extract import extractor_kwargs, model_options
from calm.evaluate import FEWSHOT_METHODS, LALM_METHODS


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers", param_hint=what) from None
    if not values or any(v < 0 for v in values):
        raise click.BadParameter(f"{text!r}: expected non-negative integers", param_hint=what)
    return values


def parse_seeds(text: str) -> list[int]:
    """`10` -> seeds 0..9; `3,7,11` -> those seeds."""
    values = parse_int_list(text, "--seeds")
    if "," not in text:
        if values[0] < 1:
            raise click.BadParameter("need at least one seed", param_hint="--seeds")
        return list(range(values[0]))
    return values


def parse_k(text: str) -> float | int:
    """`0.25` -> a fraction of the heads; `18` -> a head count."""
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: a fraction in (0, 1] or a head count", param_hint="--k"
        ) from None
    if value <= 0:
        raise click.BadParameter("k must be positive", param_hint="--k")
    return value if value <= 1 and "." in text else int(value)


def classifier_options(command):
    """The classifiers' hyper-parameters and their options beyond the paper (shared by evaluate and fit)."""
    for option in reversed(
        [
            click.option(
                "--k",
                "k",
                default="0.25",
                show_default=True,
                help="Heads kept by CALM/CALM-global: fraction or count.",
            ),
            click.option(
                "--tau-p",
                type=float,
                default=0.03,
                show_default=True,
                help="Head posterior temperature (Eq. 5).",
            ),
            click.option(
                "--tau-w",
                type=float,
                default=0.5,
                show_default=True,
                help="Head weight temperature (Eq. 8 / 12).",
            ),
            click.option(
                "--sav-tie-break",
                type=click.Choice(["index", "margin"]),
                default="index",
                show_default=True,
                help="SAV heads of equal support accuracy: lower index (paper) or larger mean margin.",
            ),
            click.option(
                "--normalization",
                type=click.Choice(["softmax", "power"]),
                default="softmax",
                show_default=True,
                help="CALM weights: softmax(r / tau_w) (paper) or r^(1/tau_w) / sum (authors' code).",
            ),
            click.option(
                "--reliability",
                type=click.Choice(["in-sample", "leave-one-out"]),
                default="in-sample",
                show_default=True,
                help="CALM margins on the support clips (paper) or each clip against its "
                "class centroid without it.",
            ),
        ]
    ):
        command = option(command)
    return command


def _progress(enabled: bool):
    from calm.commands._progress import progress_bar

    return progress_bar(enabled)


def _features_from_data(model, data_spec, store, extractor_kw, batch_size, progress, echo):
    from calm.data import load_dataset
    from calm.models import load_extractor
    from calm.store import extract_to_store, load_features, store_path

    dataset = load_dataset(data_spec)
    echo(f"dataset {data_spec}: {len(dataset.clips)} clips, {len(dataset.classes)} classes")
    extractor = load_extractor(model, **extractor_kw)
    echo(f"model {model}: {len(extractor.head_names)} heads; feature store {store}")
    from calm.commands._progress import extraction_progress

    with extraction_progress(progress) as bar:
        report = extract_to_store(extractor, dataset, store, batch_size=batch_size, progress=bar)
    echo(report.summary())
    X, y, meta = load_features(store, key=report.digest)
    import numpy as np

    wanted = {store_path(c.path) for c in dataset.clips}  # the store's own path normalisation
    keep = meta["path"].astype(str).isin(wanted).to_numpy()
    if not keep.all():  # the store may hold other clips extracted with the same key
        rows = np.flatnonzero(keep)
        X, y = X[rows], np.asarray(y)[rows]
        attrs = dict(meta.attrs)
        meta = meta[keep].reset_index(drop=True)
        meta.attrs.update(attrs)
    failed = [{"path": p, "reason": r} for p, r in report.failed]
    return (
        X,
        y,
        meta,
        extractor,
        {
            "stored": report.stored,
            "skipped": report.skipped,
            "failed": failed,
            "seconds": round(report.seconds, 1),
            "digest": report.digest,
        },
    )


def _lalm_skip_reason(extractor) -> str | None:
    """Why zero-shot / pseudo-labels cannot run with this extractor, or None when they can."""
    if extractor is None:
        return "no model loaded (--features): zero-shot and pseudo-labels need the model itself"
    from calm.zeroshot import as_chat_lm

    try:
        as_chat_lm(extractor)
    except (TypeError, ValueError) as exc:  # not an LALM (Whisper), or loaded without its LM head
        return str(exc)
    return None


def _lalm_runs(
    ev,
    X,
    y,
    meta,
    extractor,
    methods,
    classes,
    *,
    shots,
    seeds,
    test_fold,
    tune,
    registry,
    out,
    zero_shot_mode,
    pl_rollouts,
    pl_pool,
    pl_seed,
    batch_size,
    bar,
):
    """Runs of zero-shot / sav+pl / calm+pl, and what results.json reports about them."""
    import numpy as np

    from calm.baselines import pseudo_label_clips, zero_shot_clips

    paths = meta["path"].astype(str).to_numpy()
    info: dict = {}

    def step(description):
        task = bar.add_task(description, total=None)
        return lambda done, total: bar.update(task, completed=done, total=total)

    def zero_shot(rows):
        res = zero_shot_clips(
            extractor,
            list(paths[rows]),
            classes,
            mode=zero_shot_mode,
            batch_size=batch_size,
            cache=out / "zero_shot.json",
            progress=step("zero-shot answers"),
        )
        info["zero_shot"] = {
            "mode": zero_shot_mode,
            "prompt": res.prompt,
            "clips": len(rows),
            "n_unparsed": res.n_unparsed,
            "cache": str(out / "zero_shot.json"),
        }
        return res.predictions, res.scores

    def pseudo_label(rows):
        res = pseudo_label_clips(
            extractor,
            list(paths[rows]),
            classes,
            rollouts=pl_rollouts,
            seed=pl_seed,
            batch_size=batch_size,
            cache=out / "pseudo_labels.json",
            progress=step("pseudo-labels"),
        )
        info["pseudo_labels"] = {
            "rollouts": pl_rollouts,
            "temperature_range": [1.0, 2.5],
            "min_agreement": 0.5,
            "seed": pl_seed,
            "pool": pl_pool if pl_pool is not None else "shots x classes",
            "clips": len(rows),
            "kept": int(np.sum(res.kept)),
            "answers_unparsed": res.n_unparsed,
            "cache": str(out / "pseudo_labels.json"),
        }
        return res

    n_eps = len(shots) * len(seeds) * len(ev.make_parts(meta, test_fold)[0])
    task = bar.add_task(
        "zero-shot / pseudo-label episodes",
        total=n_eps * (("zero-shot" in methods) + any(m in ev.PL_BASES for m in methods)),
    )
    res = ev.run_lalm_protocol(
        X,
        y,
        meta,
        methods=methods,
        shots=shots,
        seeds=seeds,
        test_fold=test_fold,
        zero_shot=zero_shot,
        zero_shot_params={"mode": zero_shot_mode},
        pseudo_label=pseudo_label,
        fewshot=registry,
        pl_pool_size=pl_pool,
        do_tune=tune,
        progress=lambda msg: bar.update(task, advance=1),
    )
    return res.runs, info, res.warnings


@click.command()
@model_options
@click.option(
    "--data", "data_spec", default=None, help="Dataset KIND:ROOT (e.g. esc10:PATH, csv:MANIFEST, esc50)."
)
@click.option(
    "--features",
    "features",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="Evaluate an existing feature store instead of extracting (--model/--data unused).",
)
@click.option("--key", default=None, help="Extraction key digest, when --features holds several.")
@click.option(
    "--store",
    default=None,
    type=click.Path(file_okay=False),
    help="Feature store (cache) to extract into [default: RUN_DIR/features].",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory RUN_DIR.")
@click.option("--shots", default="1,5,10", show_default=True, help="Shots per class, comma-separated.")
@click.option("--seeds", default="10", show_default=True, help="N (seeds 0..N-1) or a list like 0,4,7.")
@click.option(
    "--methods",
    default="sav,calm-global,calm,linear-probe",
    show_default=True,
    help=f"Comma-separated: {', '.join(FEWSHOT_METHODS + LALM_METHODS)}.",
)
@click.option(
    "--test-fold", default="5", show_default=True, help="Folded data (ESC): test fold, or 'all' to rotate."
)
@click.option(
    "--tune", is_flag=True, help="Choose hyper-parameters by cross-validation inside each support set."
)
@classifier_options
@click.option("--sav-k", default=None, help="Heads kept by SAV [default: --k].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--figures/--no-figures", default=True, show_default=True, help="Write figures/ (Fig. 3-6).")
@click.option(
    "--sweep-seeds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Seeds of the heads-kept sweep behind Fig. 4 and 5.",
)
@click.option(
    "--zero-shot-mode",
    type=click.Choice(["letters", "likelihood", "generate"]),
    default="letters",
    show_default=True,
    help="zero-shot: option-letter logits, class-name likelihood, or a generated answer.",
)
@click.option(
    "--pl-rollouts",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="sav+pl / calm+pl: sampled answers M per unlabelled clip (temperatures U(1, 2.5)).",
)
@click.option(
    "--pl-pool",
    type=click.IntRange(min=1),
    default=None,
    help="sav+pl / calm+pl: unlabelled clips drawn per episode [default: shots x classes].",
)
@click.option("--pl-seed", type=int, default=0, show_default=True, help="Seed of the pseudo-label sampling.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def evaluate(
    model,
    data_spec,
    features,
    key,
    store,
    out,
    shots,
    seeds,
    methods,
    test_fold,
    tune,
    k,
    tau_p,
    tau_w,
    sav_tie_break,
    normalization,
    reliability,
    sav_k,
    model_dtype,
    layers,
    attn_implementation,
    heads,
    prompt,
    device,
    batch_size,
    figures,
    sweep_seeds,
    options,
    zero_shot_mode,
    pl_rollouts,
    pl_pool,
    pl_seed,
    progress,
):
    """Few-shot evaluation: episodes of n shots per class, several seeds, every method on the same
    support sets; writes RUN_DIR/results.json, results.md and figures/, and prints the table.

    \b
    Methods that need the audio-language model to answer (skipped with the
    reason for models that cannot, e.g. Whisper, and with --features):
      zero-shot  the model answers the multiple-choice question itself
                 (--zero-shot-mode); each seed scores its own queries;
                 answers cached in RUN_DIR/zero_shot.json.
      sav+pl,    per episode, --pl-pool unlabelled training clips are
      calm+pl    pseudo-labelled (--pl-rollouts sampled answers at
                 temperatures U(1, 2.5), majority vote, kept at >= 50 %
                 agreement) and SAV / CALM is fitted on the kept clips; a
                 class with no kept clip cannot be predicted and its
                 queries count as wrong. Cached in RUN_DIR/pseudo_labels.json.
    """
    from calm import __version__
    from calm import evaluate as ev
    from calm.data.base import DatasetError

    t0 = time.perf_counter()
    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731
    out = Path(out)
    shot_list = parse_int_list(shots, "--shots")
    seed_list = parse_seeds(seeds)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in method_list if m not in FEWSHOT_METHODS + LALM_METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {unknown}", param_hint="--methods")
    if (features is None) == (data_spec is None):
        raise click.UsageError("give exactly one of --data (extract, then evaluate) or --features STORE")
    k_value = parse_k(k)
    sav_k_value = parse_k(sav_k) if sav_k is not None else k_value
    extractor = None
    extraction = None
    try:
        if features is not None:
            from calm.store import load_features

            X, y, meta = load_features(features, key=key)
        else:
            store_dir = Path(store) if store is not None else out / "features"
            X, y, meta, extractor, extraction = _features_from_data(
                model,
                data_spec,
                store_dir,
                extractor_kwargs(heads, prompt, device, model_dtype, layers, attn_implementation, options),
                batch_size,
                progress,
                echo,
            )
    except (DatasetError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    key_info = dict(meta.attrs.get("key") or {})
    extractor_key = key_info.get("extractor", key_info)
    head_names = [tuple(h) for h in meta.attrs.get("head_names", [])]
    echo(f"{len(y)} clips, features {tuple(X.shape[1:])}")

    registry = ev.fewshot_methods(
        k=k_value,
        tau_p=tau_p,
        tau_w=tau_w,
        sav_k=sav_k_value,
        sav_tie_break=sav_tie_break,
        normalization=normalization,
        reliability=reliability,
    )
    chosen = {m: registry[m] for m in method_list if m in registry}
    skipped = {}
    lalm = [m for m in method_list if m in LALM_METHODS]
    reason = _lalm_skip_reason(extractor) if lalm else None
    if reason is not None:
        for m in lalm:
            skipped[m] = reason
            echo(f"skipping {m}: {reason}")
        lalm = []
    if not chosen and not lalm:
        raise click.ClickException("no method left to run")

    max_shots = max(shot_list)
    need_fits = figures and "calm" in chosen
    try:
        parts, _ = ev.make_parts(meta, test_fold)
        n_total = len(shot_list) * len(seed_list) * len(parts) * len(chosen)
        with _progress(progress) as bar:
            task = bar.add_task("episodes", total=n_total)
            result = ev.run_protocol(
                X,
                y,
                meta,
                methods=chosen,
                shots=shot_list,
                seeds=seed_list,
                test_fold=test_fold,
                do_tune=tune,
                keep_fits=(lambda m, n, s, p: need_fits and m == "calm" and n == max_shots),
                progress=lambda msg: bar.update(task, advance=1, description=f"episodes: {msg}"),
            )
            sweep = []
            sweep_methods = {m: chosen[m] for m in ("calm", "calm-global") if m in chosen}
            if figures and sweep_methods:
                n_sweep = (
                    len(ev.SWEEP_FRACTIONS) * len(shot_list) * min(sweep_seeds, len(seed_list)) * len(parts)
                )
                task2 = bar.add_task("heads-kept sweep", total=n_sweep * len(sweep_methods))
                sweep = ev.k_sweep(
                    X,
                    y,
                    meta,
                    methods=sweep_methods,
                    shots=shot_list,
                    seeds=seed_list[:sweep_seeds],
                    test_fold=test_fold,
                    progress=lambda msg: bar.update(task2, advance=1),
                )
            lalm_info, warnings = {}, []
            if lalm:
                try:
                    lalm_runs, lalm_info, warnings = _lalm_runs(
                        ev,
                        X,
                        y,
                        meta,
                        extractor,
                        lalm,
                        result.classes,
                        shots=shot_list,
                        seeds=seed_list,
                        test_fold=test_fold,
                        tune=tune,
                        registry=registry,
                        out=out,
                        zero_shot_mode=zero_shot_mode,
                        pl_rollouts=pl_rollouts,
                        pl_pool=pl_pool,
                        pl_seed=pl_seed,
                        batch_size=batch_size,
                        bar=bar,
                    )
                except ValueError as exc:  # e.g. option labels that are not single tokens, a pool too large
                    raise click.ClickException(f"{', '.join(lalm)}: {exc}") from None
                result.runs = ev.order_runs(result.runs + lalm_runs, method_list)
    except ev.ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    for w in warnings:
        echo(f"warning: {w}")

    analyses: dict = {"k_sweep": sweep}
    weights = counts = None
    if result.fits:
        from calm.figures import top_head_counts

        fits = list(result.fits.values())
        weights = fits[0].weights_
        counts = top_head_counts([f.weights_ for f in fits], X.shape[1])
        if head_names:
            analyses["top_heads"] = [
                {"layer": h[0], "head": h[1], "source": h[2] if len(h) > 2 else "decoder", "count": int(c)}
                for h, c in sorted(zip(head_names, counts, strict=True), key=lambda t: -t[1])
                if c > 0
            ]
    config = {
        "model": (extractor_key.get("model") or extractor_key.get("model_id"))
        if features is not None
        else model,
        "prompt": extractor_key.get("prompt", prompt),
        "head_source": extractor_key.get("heads", heads),
        "extraction_key": key_info,
        "dataset": data_spec or str(features),
        "features": str(features) if features else None,
        "n_clips": int(len(y)),
        "n_heads": int(X.shape[1]),
        "head_dim": int(X.shape[2]),
        "shots": shot_list,
        "seeds": seed_list,
        "n_seeds": len(seed_list),
        "methods": [m for m in method_list if m in chosen or m in lalm],
        "test_fold": test_fold,
        "tune": tune,
        "defaults": {
            **{name: dict(m.defaults) for name, m in chosen.items()},
            **{m: dict(registry[ev.PL_BASES[m]].defaults) for m in lalm if m in ev.PL_BASES},
        },
        **lalm_info,
        "package": "calm-audio",
        "version": __version__,
        "extraction": extraction,
    }
    results = ev.build_results(result, config, analyses=analyses, skipped_methods=skipped, warnings=warnings)
    results["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    js, md = ev.write_results(out, results)
    if figures:
        from calm.figures import make_figures

        made = make_figures(
            out / "figures",
            results,
            weights=weights,
            classes=[str(c) for c in result.fits[next(iter(result.fits))].classes_] if result.fits else None,
            counts=counts,
            head_names=head_names or None,
        )
        echo(f"figures: {', '.join(str(p) for p in made.values())}")
    click.echo(ev.results_markdown(results))
    echo(f"wrote {js} and {md} in {time.perf_counter() - t0:.0f} s")
