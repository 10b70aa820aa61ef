"""`switchyard pilot`: the accuracy/compute sweep of the mixture against dense MLPs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from monitoring.logging import configure_logging, get_logger

__all__ = ["format_pilot", "pilot", "register"]


def pilot(
    dataset: str = typer.Option("mnist5k", envvar="SWITCHYARD_DATASET",
                                help="Built-in data set: mnist5k or digits."),
    seeds: int = typer.Option(3, envvar="SWITCHYARD_SEEDS", min=1, max=20,
                              help="Number of seeds (0 .. N-1); each sets the split and the weights."),
    quick: bool = typer.Option(False, "--quick", help="Sweep fewer models and routing settings (a few minutes)."),
    out: Path = typer.Option(Path("bench-results/pilot"), envvar="SWITCHYARD_OUT",
                             help="Output directory for pilot.json and the PNG plots."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
) -> None:
    """Train dense MLPs and mixtures over several seeds; report where the mixture matches dense."""
    from experts.data import BUILTIN_DATASETS, DatasetError
    from services.pilot import run_pilot

    if dataset not in BUILTIN_DATASETS:
        _usage_error(f"invalid value for --dataset: unknown dataset {dataset!r}; "
                     f"use one of {', '.join(BUILTIN_DATASETS)}")
    prepare_out_dir(out)
    configure_logging()
    log = get_logger("cli")
    try:
        report = run_pilot(dataset=dataset, seeds=seeds, quick=quick, out=out, log=log)
    except DatasetError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if json_output:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    typer.echo(format_pilot(report))


def _usage_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def prepare_out_dir(out: Path) -> None:
    """Create the output directory, or exit with status 2 and a message naming --out."""
    if out.exists() and not out.is_dir():
        _usage_error(f"invalid value for --out: {str(out)!r} is a file; pass a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _usage_error(f"invalid value for --out: cannot create directory {str(out)!r} ({error.strerror}); "
                     "pass a writable directory path")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_pilot(report: dict[str, Any]) -> str:
    """Format a pilot report as a few human-readable lines."""
    seeds = report["seeds"]
    lines = [
        f"Pilot on {report['dataset']}, mean of {seeds} seed{'s' if seeds != 1 else ''} "
        f"(chosen on validation, reported on test), {report['seconds']} s",
        f"  best dense      {report['dense_best_label']}: {_percent(report['dense_best_accuracy'])} "
        f"at {report['dense_best_flops']:,.0f} FLOPs",
        f"  matching dense  {report['dense_match_label']}: {_percent(report['dense_match_accuracy'])} "
        f"at {report['dense_match_flops']:,.0f} FLOPs",
    ]
    setting = report["moe_setting"]
    if setting is None:
        closest = report["moe_max_accuracy_setting"]
        lines.append(f"  mixture         no setting within {100 * report['match_tolerance']:g} point of the best "
                     f"dense model; the most accurate reached {_percent(closest['test_accuracy'])} at "
                     f"{closest['flops']:,.0f} FLOPs ({closest['label']})")
    else:
        lines += [
            f"  mixture         {setting['label']}",
            f"                  {_percent(report['moe_accuracy'])} at {report['moe_flops']:,.0f} FLOPs, "
            f"{report['mean_experts_per_request']:.2f} experts and {report['remote_calls_per_request']:.2f} "
            f"remote calls per request, {setting['dense_fraction']:.1%} of rows to dense",
            f"  FLOPs ratio     {report['moe_flops_ratio']:.3f} (target <= {report['target_flops_ratio']:g}: "
            f"{'met' if report['meets_target'] else 'not met'}, matched on validation)",
            f"  on test         {_test_gap(report)}",
        ]
    lines.append(f"  plots           {', '.join(report['plots'])}")
    return "\n".join(lines)


def _test_gap(report: dict[str, Any]) -> str:
    gap = 100 * (report["dense_best_accuracy"] - report["moe_accuracy"])
    band = 100 * report["match_tolerance"]
    where = "within" if report["moe_matches_on_test"] else "outside"
    relation = f"{gap:.2f} point under" if gap > 0 else f"{-gap:.2f} point over"
    return f"the mixture is {relation} the best dense model, {where} the {band:g}-point band"


def register(app: typer.Typer) -> None:
    """Add the `pilot` command to the `switchyard` application."""
    app.command("pilot")(pilot)
