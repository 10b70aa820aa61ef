"""`switchyard k8s`: render the KubeRay manifests from the settings, and validate them offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

__all__ = ["k8s_app"]

k8s_app = typer.Typer(
    no_args_is_help=True,
    help="Kubernetes manifests (KubeRay RayService) from the same settings that `serve` uses.",
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@k8s_app.command()
def render(
    out: Path = typer.Option(Path("k8s"), help="Directory that receives base/ and overlays/."),
    config: Optional[Path] = typer.Option(
        None, envvar="SWITCHYARD_CONFIG",
        help="Settings file (as for `switchyard serve --config`) for every rendered overlay; "
             "unset uses each overlay's own settings file from the cluster file.",
    ),
    cluster: Path = typer.Option(Path("k8s/config/cluster.yaml"), envvar="SWITCHYARD_CLUSTER",
                                 help="Cluster file: image, worker groups, GPUs, overlays."),
    overlay: Optional[list[str]] = typer.Option(
        None, "--overlay", help="Name of an overlay to render (repeat the option for several); all overlays when unset."),
) -> None:
    """Write the Kustomize base and overlays, with a RayService rendered from the settings."""
    from services.k8s import RenderError, render_manifests, write_manifests

    try:
        files = render_manifests(cluster, config=config, overlays=overlay or None)
    except RenderError as error:
        _fail(str(error))
    for path in write_manifests(files, out):
        typer.echo(f"wrote {path}", err=True)


@k8s_app.command()
def validate(
    directory: Path = typer.Argument(Path("k8s"), help="Directory with the rendered manifests."),
    crd_dir: Optional[Path] = typer.Option(
        None, envvar="SWITCHYARD_CRD_DIR",
        help="Directory with CustomResourceDefinition files (KubeRay, Prometheus operator) for custom resources.",
    ),
    kubernetes_version: str = typer.Option(
        "1.30", help="Kubernetes version (major.minor) whose core schemas check the built-in kinds."),
    allow_unchecked: bool = typer.Option(
        False, "--allow-unchecked", help="Exit 0 even when some documents could not be checked (no schema)."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
) -> None:
    """Check every manifest offline; exit 1 when one is invalid or could not be checked."""
    try:
        import jsonschema  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError as error:
        _fail(f"{error.name} is not installed; install the k8s extra with `pip install 'switchyard[k8s]'`")
    from services.k8s_validate import INVALID, NOT_CHECKED, OK, ValidationSetupError, validate_directory

    try:
        results = validate_directory(directory, crd_dir=crd_dir, kubernetes_version=kubernetes_version)
    except ValidationSetupError as error:
        _fail(str(error))
    counts = {status: sum(result.status == status for result in results) for status in (OK, INVALID, NOT_CHECKED)}
    passed = counts[INVALID] == 0 and (counts[NOT_CHECKED] == 0 or allow_unchecked)
    if json_output:
        summary = {"ok": passed, "checked": counts[OK] + counts[INVALID], "invalid": counts[INVALID],
                   "not_checked": counts[NOT_CHECKED], "results": [result.to_dict() for result in results]}
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_table(results)
        typer.echo(f"{counts[OK]} valid, {counts[INVALID]} invalid, {counts[NOT_CHECKED]} not checked")
        if counts[NOT_CHECKED] and not allow_unchecked:
            typer.echo("documents without a schema count as failures; pass --crd-dir with their "
                       "CustomResourceDefinitions, or --allow-unchecked", err=True)
    if not passed:
        raise typer.Exit(1)


def _print_table(results) -> None:
    headers = ("FILE", "KIND", "NAME", "CHECK", "RESULT")
    rows = [(result.file, result.kind, result.name, result.check, result.status) for result in results]
    widths = [max(len(str(row[column])) for row in [headers, *rows]) for column in range(len(headers))]
    typer.echo("  ".join(header.ljust(width) for header, width in zip(headers, widths)).rstrip())
    for result, row in zip(results, rows):
        typer.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        for problem in result.problems:
            typer.echo(f"    - {problem}")
