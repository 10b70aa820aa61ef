"""`switchyard submit`: send examples through the Redis Streams queue and wait for every result."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from monitoring.logging import configure_logging, get_logger

__all__ = ["register"]


def _env(option: str) -> str:
    return f"SWITCHYARD_{option.upper()}"


def submit(
    dataset: str = typer.Option("digits", envvar=_env("dataset"), help="Built-in data set: digits or mnist5k."),
    data: Optional[Path] = typer.Option(None, envvar=_env("data"), help="User data file (.npz, .csv or .parquet)."),
    label_column: Optional[str] = typer.Option(None, envvar=_env("label_column"),
                                               help="Label column of a .csv or .parquet file."),
    limit: Optional[int] = typer.Option(None, envvar=_env("limit"), min=1,
                                        help="Send at most this many examples; unset sends the whole test split."),
    seed: int = typer.Option(0, envvar=_env("seed"), help="Seed of the split; use the one the bundle was trained with."),
    redis_url: Optional[str] = typer.Option(None, envvar=_env("redis_url"),
                                            help="Redis URL; unset uses redis_url from the running server's runtime.json."),
    config: Optional[Path] = typer.Option(None, envvar=_env("config"),
                                          help="Settings file of the server, for the key prefix and queue bounds."),
    timeout_s: float = typer.Option(300.0, envvar=_env("timeout_s"), min=1,
                                    help="Seconds to wait for all results after the last request is sent."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Send each held-out test example as one queue request and wait for every result.

    Accuracy counts unanswered examples as wrong. The exit code is 1 when any request was lost or dead-lettered.
    """
    from experts.data import DatasetError, load_dataset, load_file
    from services.queue import QueueFullError, QueueStreams, submit_and_wait
    from services.redis_setup import create_async_client
    from services.runtime import read_runtime, state_dir
    from services.settings import SettingsError, load_settings

    configure_logging()
    log = get_logger("cli")
    if redis_url is None:
        runtime = read_runtime() or {}
        redis_url = runtime.get("redis_url")
        if redis_url is None:
            _fail(f"no --redis-url given and no running server found in {state_dir() / 'runtime.json'}; "
                  "start `switchyard serve` or pass --redis-url")
    try:
        settings = load_settings(config, redis_url=redis_url)
    except SettingsError as error:
        _fail(str(error))
    try:
        loaded = load_file(data, label_column, seed=seed) if data else load_dataset(dataset, seed=seed)
    except DatasetError as error:
        _fail(str(error))
    test = loaded.test
    rows, labels = test.x[:limit], test.y[:limit]
    streams = QueueStreams.from_prefix(settings.redis.key_prefix)
    log.info("submitting", dataset=loaded.name, requests=len(rows), stream=streams.requests)

    async def run() -> Any:
        client = create_async_client(settings.redis)
        try:
            with typer.progressbar(length=len(rows), label="results", file=sys.stderr) as progress:
                return await submit_and_wait(client, streams, rows, labels=labels,
                                             max_length=settings.queue.max_length, timeout_s=timeout_s,
                                             block_ms=settings.redis.block_ms, on_done=progress.update)
        finally:
            await client.aclose()

    from redis.exceptions import RedisError

    try:
        report = asyncio.run(run())
    except QueueFullError as error:
        _fail(str(error), code=1)
    except (RedisError, OSError) as error:
        _fail(f"Redis at {redis_url} failed: {error}; check that `switchyard serve` is running", code=1)
    summary = report.to_dict()
    if json_output:
        sys.stdout.write(_json_line(summary))
        sys.stdout.flush()
    else:
        accuracy = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.4f}"
        typer.echo(f"sent {summary['sent']}, answered {summary['answered']}, dead-lettered "
                   f"{summary['dead_lettered']}, lost {summary['lost']}; accuracy {accuracy}")
    _log_dead_letters(log, report)
    if summary["lost"] or summary["dead_lettered"]:
        raise typer.Exit(1)


def _log_dead_letters(log, report) -> None:
    for request_id, dead in list(report.results.dead.items())[:10]:
        log.warning("dead_lettered", request_id=request_id, reason=dead["reason"], error=dead["error"])


def _json_line(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data) + "\n"


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the `submit` command to the `switchyard` application."""
    app.command(name="submit")(submit)
