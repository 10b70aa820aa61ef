"""`switchyard` command line. Logs go to stderr; `--json` prints one JSON object on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import typer

from monitoring.logging import configure_logging, get_logger

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Adaptive mixture-of-experts serving on Ray Serve.",
    pretty_exceptions_enable=False,
)

DEFAULT_BUNDLE = Path(".switchyard/bundles/digits")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to file descriptor 1 to stderr, so `--json` output stays clean.

    Ray prints some messages of its background processes straight to the driver's stdout.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _env(option: str) -> str:
    return f"SWITCHYARD_{option.upper()}"


@app.command()
def train(
    dataset: str = typer.Option("digits", envvar=_env("dataset"), help="Built-in data set: digits or mnist5k."),
    data: Optional[Path] = typer.Option(None, envvar=_env("data"), help="User data file (.npz, .csv or .parquet)."),
    label_column: Optional[str] = typer.Option(None, envvar=_env("label_column"),
                                               help="Label column of a .csv or .parquet file."),
    out: Optional[Path] = typer.Option(None, envvar=_env("out"),
                                       help="Bundle directory [default: .switchyard/bundles/<dataset>]."),
    experts: int = typer.Option(4, envvar=_env("experts"), min=1, max=64, help="Number of experts."),
    seed: int = typer.Option(0, envvar=_env("seed"), min=0, max=2**32 - 1, help="Seed of the split and of training."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train the gate, the experts and the dense model on one split; write a model bundle."""
    from dataclasses import replace

    from experts.data import DatasetError, load_dataset, load_file
    from services.train import DEFAULT_MIXTURE, train_bundle

    configure_logging()
    log = get_logger("cli")
    if data is None and label_column is not None:
        _fail("--label-column applies to --data FILE only; pass the file with --data")
    if data is not None and dataset != "digits":
        _fail("pass either --dataset or --data, not both")
    try:
        loaded = load_file(data, label_column, seed=seed) if data else load_dataset(dataset, seed=seed)
    except DatasetError as error:
        _fail(str(error))
    out = out or Path(".switchyard/bundles") / loaded.name
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; pass a directory for the bundle")
    log.info("training", dataset=loaded.name, train=len(loaded.train), experts=experts, out=str(out))
    try:
        _, report = train_bundle(loaded, out, mixture=replace(DEFAULT_MIXTURE, num_experts=experts), seed=seed)
    except OSError as error:
        _fail(f"cannot write the bundle to {out}: {error.strerror or error}")
    if json_output:
        _print_json(report)
        return
    typer.echo(f"bundle {report['bundle']} (version {report['model_version']}) in {report['seconds']} s")
    typer.echo(f"{'module':<10} {'layers':<18} {'params':>9} {'FLOPs/example':>14}")
    for row in report["modules"]:
        typer.echo(f"{row['module']:<10} {row['layers']:<18} {row['params']:>9} {row['flops']:>14}")
    selection = report["routing_selection"]
    if selection is not None:
        typer.echo(f"routing, chosen on validation from {selection['candidates']} candidates "
                   "(the cheapest that is at least as accurate as the configured one):")
        for name in ("configured", "chosen"):
            entry = selection[name]
            routing = entry["routing"]
            typer.echo(f"  {name:<10} top_p {routing['top_p']}, k {routing['min_k']}-{routing['max_k']}, "
                       f"confidence floor {routing['confidence_floor']}, escalate below {routing['escalate_below']}: "
                       f"accuracy {entry['validation_accuracy']:.4f}, {entry['flops_per_example']:,.0f} FLOPs/example, "
                       f"to dense {entry['dense_fraction']:.1%}")
    test = report["metrics"]["test"]
    typer.echo(f"test accuracy: mixture {test['moe_accuracy']:.4f}, dense {test['dense_accuracy']:.4f}; "
               f"experts per request {test['mean_experts_per_request']:.2f}; "
               f"to dense {test['dense_fraction']:.1%}; compute ratio {test['compute_ratio']:.3f}")


def _load_settings(config: Optional[Path], **overrides: Any):
    from services.settings import SettingsError, load_settings

    try:
        return load_settings(config, **overrides)
    except SettingsError as error:
        _fail(str(error))


@app.command()
def serve(
    bundle: Path = typer.Option(DEFAULT_BUNDLE, envvar=_env("bundle"), help="Model bundle directory."),
    config: Optional[Path] = typer.Option(None, envvar=_env("config"), help="Settings file (YAML or JSON)."),
    redis_url: Optional[str] = typer.Option(None, envvar=_env("redis_url"),
                                            help="Redis URL; an embedded redis-server starts when unset."),
    host: Optional[str] = typer.Option(None, envvar=_env("host"), help="HTTP bind address [default: 127.0.0.1]."),
    port: Optional[int] = typer.Option(None, envvar=_env("port"), help="HTTP port [default: 8000]."),
    metrics_port: Optional[int] = typer.Option(None, envvar=_env("metrics_port"),
                                               help="Prometheus export port of Ray [default: a free port]."),
) -> None:
    """Run the whole application locally until interrupted."""
    from experts.bundle import BundleError
    from services.runtime import LocalServe, ServeStartError, check_port_free, running_server, state_dir

    configure_logging()
    log = get_logger("cli")
    settings = _load_settings(config, redis_url=redis_url, bundle=bundle, host=host, port=port)
    running = running_server()
    if running is not None:
        _fail(f"another switchyard serve (pid {running['pid']}) is running at {running.get('http_url')} with "
              f"state directory {state_dir()}; stop it first, or set SWITCHYARD_STATE_DIR for a second instance")
    stop = threading.Event()
    try:
        if settings.port:
            check_port_free(settings.host, settings.port)
        with LocalServe(settings, metrics_port=metrics_port) as server:
            # Registered after Ray starts, because ray.init installs its own SIGTERM handler.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            runtime = json.loads(server.write_runtime().read_text())
            token_source = runtime["admin_token_file"] or "SWITCHYARD_ADMIN_TOKEN"
            log.info("serving", http_url=server.http_url, metrics_url=server.metrics_url,
                     admin_token_file=runtime["admin_token_file"])
            typer.echo(f"Switchyard is serving at {server.http_url} (metrics: {server.metrics_url}); "
                       f"supervisor admin token in {token_source}; press Ctrl+C to stop", err=True)
            try:
                stop.wait()
            finally:
                LocalServe.remove_runtime()
                log.info("stopping")
    except (BundleError, ServeStartError, ValueError) as error:
        _fail(str(error))


@app.command()
def demo(
    bundle: Path = typer.Option(DEFAULT_BUNDLE, envvar=_env("bundle"), help="Digits bundle; trained when missing."),
    config: Optional[Path] = typer.Option(None, envvar=_env("config"), help="Settings file (YAML or JSON)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train (if needed), serve, send every held-out digits example over HTTP, report."""
    from experts.bundle import BundleError
    from services.demo import run_demo
    from services.runtime import ServeStartError

    configure_logging()
    log = get_logger("cli")
    settings = _load_settings(config, bundle=bundle, port=0)
    try:
        with _stdout_to_stderr():
            report = run_demo(settings, log=log)
    except (BundleError, ServeStartError, ValueError) as error:
        _fail(str(error))
    if json_output:
        _print_json(report)
        return
    _print_demo_report(report)


def _print_demo_report(report: dict[str, Any]) -> None:
    accuracy = report["accuracy"]
    model = report["model"]
    lines = [
        f"Switchyard demo on {report['dataset']}: {report['requests']} requests over HTTP ({report['encoding']}), "
        f"{report['failed']} failed",
        f"  accuracy        mixture {accuracy['moe']:.4f}   dense {accuracy['dense']:.4f}",
        f"  experts/request {report['mean_experts_per_request']:.2f}   histogram {report['experts_histogram']}",
        f"  paths           {report['paths']}   reasons {report['reasons']}",
        f"  compute ratio   {report['compute_ratio']:.3f} (mixture FLOPs incl. gate / dense FLOPs)",
        f"  latency         p50 {report['latency_ms']['p50']:.1f} ms   p99 {report['latency_ms']['p99']:.1f} ms",
        f"  model           {model['experts']} experts of {model['expert_params']} parameters, "
        f"dense {model['dense_params']}, gate {model['gate_params']}",
    ]
    typer.echo("\n".join(lines))


# Command groups defined in their own modules register here.
from services.cli_k8s import k8s_app  # noqa: E402

app.add_typer(k8s_app, name="k8s")

from services.cli_pilot import register as register_pilot_command  # noqa: E402

register_pilot_command(app)

from services.cli_queue import register as register_queue_commands  # noqa: E402

register_queue_commands(app)

from services.cli_bench import bench as bench_command  # noqa: E402

app.command(name="bench")(bench_command)

from services.cli_supervisor import register as register_supervisor_commands  # noqa: E402

register_supervisor_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
