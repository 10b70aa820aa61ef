"""`switchyard bench`: the benchmark suite from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

__all__ = ["bench"]


def _format_table(report: dict[str, Any]) -> str:
    lines = [f"{'path':<9} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'/ceiling':>9}"]
    levels = report["levels"]
    for index, ceiling in enumerate(levels["ceiling"]):
        for name in ("ceiling", "dense", "moe"):
            level = levels[name][index]
            ratio = level["rps"] / ceiling["rps"] if ceiling["rps"] else 0.0
            lines.append(f"{name:<9} {level['concurrency']:>7} {level['rps']:>9.1f} {level['p50_ms']:>8.2f} "
                         f"{level['p99_ms']:>8.2f} {ratio:>9.2f}")
    rounds = ", ".join(f"{ratio:.2f}" for ratio in report.get("moe_to_ceiling_ratio_by_round", []))
    lines.append(f"mixture / ceiling at {report['concurrency']} clients: {report['moe_to_ceiling_ratio']} "
                 f"(rounds: {rounds})")
    if report.get("queue_rps") is not None:
        lines.append(f"queue path: {report['queue_rps']} req/s")
    costs = ", ".join(f"{cost:g} µs at batch {batch}" for batch, cost in report["gate_cost_us_per_example"].items())
    lines.append(f"gate cost per example: {costs}")
    pilot = report.get("pilot")
    if pilot:
        lines.append(
            f"pilot on {pilot['dataset']} ({pilot['seeds']} seeds): best dense {pilot['dense_best_accuracy']}, "
            f"mixture {pilot['moe_accuracy']} at {pilot['moe_flops']} FLOPs = {pilot['moe_flops_ratio']} of "
            f"the cheapest matching dense ({pilot['dense_match_flops']} FLOPs)"
        )
    return "\n".join(lines)


def bench(
    quick: bool = typer.Option(False, "--quick", help="Shorter runs and a small pilot (a few minutes on 2 cores)."),
    json_output: bool = typer.Option(False, "--json", help="Print the benchmark report as JSON on stdout."),
    out: Path = typer.Option(Path("bench-results"), envvar="SWITCHYARD_OUT", help="Output folder."),
    bundle: Path = typer.Option(Path(".switchyard/bundles/digits"), envvar="SWITCHYARD_BUNDLE",
                                help="Digits bundle; trained when missing."),
    config: Optional[Path] = typer.Option(None, envvar="SWITCHYARD_CONFIG", help="Settings file (YAML or JSON)."),
    pilot: bool = typer.Option(True, "--pilot/--no-pilot", help="Run the accuracy/compute pilot too."),
    seconds: Optional[float] = typer.Option(
        None, "--seconds", min=0.1,
        help="Measured seconds per path and concurrency level, split into 3 rounds (default 6 with --quick, else 15).",
    ),
) -> None:
    """Measure throughput and latency of every path against a no-op ceiling, plus the pilot."""
    from services.bench import run_bench
    from services.cli import _fail, _load_settings, _print_json, _stdout_to_stderr
    from services.cli_pilot import prepare_out_dir
    from services.runtime import ServeStartError
    from monitoring.logging import configure_logging, get_logger

    prepare_out_dir(out)
    configure_logging()
    log = get_logger("bench")
    settings = _load_settings(config, bundle=bundle, port=0)
    try:
        with _stdout_to_stderr():
            report = run_bench(settings, out, quick=quick, pilot=pilot, log=log, seconds=seconds)
    except ServeStartError as error:
        _fail(str(error))
    typer.echo(_format_table(report), err=True)
    if json_output:
        _print_json(report)
