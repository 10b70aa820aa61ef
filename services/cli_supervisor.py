"""`switchyard supervisor ...` (the supervisor API from the shell) and `switchyard drill`.

Both find the running server through `runtime.json` in the state directory unless
options point elsewhere: `supervisor` takes the HTTP address and the admin-token file,
and `drill` takes the Ray address and the settings that `serve` deployed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import httpx
import typer

__all__ = ["apply_faults", "drill", "register", "supervisor_app"]

supervisor_app = typer.Typer(no_args_is_help=True, help="Supervisor status, events and manual policy changes.")

_URL_HELP = "Base URL of the server [default: http_url from runtime.json]."
_TOKEN_HELP = "Admin token [default: the admin-token file named in runtime.json]."


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _runtime() -> dict[str, Any]:
    from services.runtime import read_runtime, state_dir

    runtime = read_runtime()
    if runtime is None:
        _fail(f"no runtime.json in {state_dir()}; start `switchyard serve` first, set SWITCHYARD_STATE_DIR to "
              "its state directory, or pass --url")
    return runtime


def _base_url(url: str | None) -> str:
    return (url or _runtime()["http_url"]).rstrip("/")


def _token(token: str | None) -> str:
    from services.runtime import read_runtime, state_dir

    if token:
        return token
    runtime = read_runtime()
    if runtime is None:
        _fail(f"no admin token: pass --token or set SWITCHYARD_ADMIN_TOKEN (no runtime.json in {state_dir()} "
              "to read the token file from)")
    token_file = runtime.get("admin_token_file")
    if not token_file:
        _fail("no admin token: the server takes it from SWITCHYARD_ADMIN_TOKEN, so set that variable or pass --token")
    try:
        return Path(token_file).read_text().strip()
    except OSError as error:
        _fail(f"cannot read the admin token file {token_file}: {error.strerror}; pass --token")


def _call(method: str, url: str, path: str, token: str | None = None, body: dict[str, Any] | None = None,
          params: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, f"{url}/v1/supervisor/{path}", json=body, params=params, headers=headers,
                                 timeout=10.0)
    except httpx.HTTPError as error:
        _fail(f"cannot reach the supervisor at {url}: {error!r}; is `switchyard serve` running?")
    try:
        document = response.json()
    except ValueError:
        _fail(f"HTTP {response.status_code} from {url}: {response.text[:300]}")
    if response.status_code != 200:
        problem = document.get("error", {}) if isinstance(document, dict) else {}
        _fail(f"HTTP {response.status_code} {problem.get('code', '')}: {problem.get('message', document)}", code=1)
    return document


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def _format_time(unix_s: float | None) -> str:
    if not unix_s:
        return "-"
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _format_event(event: dict[str, Any]) -> str:
    return (f"{_format_time(event['time'])}  v{event['policy_version']:<4} {event['actor']:<9} "
            f"{event['from']} -> {event['to']} ({event['moe_percent']:g}% mixture): {event['reason']}")


def _format_status(status: dict[str, Any]) -> str:
    lines = [
        f"state          {status['state']} ({status['moe_percent']:g}% of traffic to the mixture), "
        f"policy version {status['policy_version']}",
        f"window         {status['verdict'] or 'none yet'}: {status['verdict_reason']} "
        f"(every {status['interval_s']:g} s)",
    ]
    for name, check in status["window"].items():
        value = "-" if check["value"] is None else f"{check['value']:.4g}"
        threshold = "-" if check["threshold"] is None else f"{check['threshold']:g}"
        ok = {True: "ok", False: "FAIL", None: "not checked"}[check["ok"]]
        lines.append(f"  {name:<14} {value:>8}  limit {threshold:>6}  {ok:<11} {check['samples']} samples")
    if status.get("cooldown_remaining_s") is not None:
        lines.append(f"cooldown       {status['cooldown_remaining_s']:g} s left before the ramp-back")
    if status.get("paused_from"):
        lines.append(f"paused         automatic changes held; resume returns to {status['paused_from']}")
    last_event = status.get("last_event")
    lines.append(f"last event     {_format_event(last_event) if last_event else 'none'}")
    return "\n".join(lines)


def _report(result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        _print_json(result)
        return
    if "changed" in result:
        typer.echo(_format_event(result["event"]) if result["changed"] else f"unchanged: {result['reason']}")
    typer.echo(_format_status(result.get("status", result)))


@supervisor_app.command()
def status(
    url: Optional[str] = typer.Option(None, envvar="SWITCHYARD_URL", help=_URL_HELP),
    token: Optional[str] = typer.Option(None, help="Admin token; reads need none, so it is only passed on."),
    json_output: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Show the state, the traffic split and the last window against its thresholds."""
    _report(_call("GET", _base_url(url), "status", token=token), json_output)


@supervisor_app.command()
def events(
    limit: int = typer.Option(20, min=1, max=1000, help="Number of newest events to show."),
    url: Optional[str] = typer.Option(None, envvar="SWITCHYARD_URL", help=_URL_HELP),
    token: Optional[str] = typer.Option(None, help="Admin token; reads need none, so it is only passed on."),
    json_output: bool = typer.Option(False, "--json", help="Print the events as JSON."),
) -> None:
    """List the newest policy changes, oldest first."""
    result = _call("GET", _base_url(url), "events", token=token, params={"limit": limit})
    if json_output:
        _print_json(result)
        return
    if not result["events"]:
        typer.echo("no events yet")
    for event in result["events"]:
        typer.echo(_format_event(event))


def _mutation(action: str, method: str = "POST", extra: dict[str, Any] | None = None):
    def command(
        reason: Optional[str] = typer.Option(None, help="Reason stored with the event."),
        url: Optional[str] = typer.Option(None, envvar="SWITCHYARD_URL", help=_URL_HELP),
        token: Optional[str] = typer.Option(None, envvar="SWITCHYARD_ADMIN_TOKEN", help=_TOKEN_HELP),
        json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        body = {**(extra or {}), **({"reason": reason} if reason else {})}
        _report(_call(method, _base_url(url), action, token=_token(token), body=body), json_output)

    return command


supervisor_app.command("rollback", help="Send all traffic to dense now (the ramp-back follows after the cooldown)."
                       )(_mutation("rollback"))
supervisor_app.command("promote", help="Send all traffic to the mixture now.")(_mutation("promote"))
supervisor_app.command("pause", help="Hold automatic changes; manual ones still apply.")(_mutation("pause"))
supervisor_app.command("resume", help="Let the supervisor change the policy again.")(_mutation("resume"))


@supervisor_app.command()
def weight(
    moe_percent: float = typer.Argument(..., min=0, max=100, help="Share of traffic to the mixture, 0 to 100."),
    reason: Optional[str] = typer.Option(None, help="Reason stored with the event."),
    url: Optional[str] = typer.Option(None, envvar="SWITCHYARD_URL", help=_URL_HELP),
    token: Optional[str] = typer.Option(None, envvar="SWITCHYARD_ADMIN_TOKEN", help=_TOKEN_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Set the share of traffic sent to the mixture."""
    body = {"moe_percent": moe_percent, **({"reason": reason} if reason else {})}
    _report(_call("PUT", _base_url(url), "weight", token=_token(token), body=body), json_output)


# --- drill ---------------------------------------------------------------------------------


def apply_faults(settings, faults: dict[str, dict[str, Any]]) -> None:
    """Redeploy the application with these faults in the model deployments' `user_config`.

    Ray must already be connected to the cluster that runs the application. Deployment
    versions are stable (`services.app`), so Serve only reconfigures the replicas whose
    `user_config` changed, without restarting any replica.
    """
    from ray import serve

    from services.app import build_app

    serve.run(build_app(settings, faults=faults), name=settings.app_name, route_prefix="/", blocking=False)


def _connect_ray(address: str) -> None:
    """Join the running local Ray instance as a driver, over loopback only."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except (OSError, ValueError) as error:
        _fail(f"cannot reach Ray at {address} (from runtime.json): {error}; is `switchyard serve` still running?")
    import ray

    # Without _node_ip_address, Ray replaces 127.0.0.1 in `address` with the machine's
    # outward-facing address, where the loopback-only GCS does not listen.
    ray.init(address=address, namespace="switchyard", log_to_driver=False, logging_level="warning",
             _node_ip_address="127.0.0.1")


def drill(
    expert: Optional[int] = typer.Option(None, min=0, help="Expert id to inject the fault into."),
    fault: Optional[str] = typer.Option(None, help="Fault kind: error (calls raise), slow (added latency) or "
                                                   "noise (confident, silently wrong answers)."),
    duration_s: Optional[float] = typer.Option(None, min=0, help="Seconds until the fault ends by itself; "
                                                                 "unset lasts until --clear."),
    latency_s: float = typer.Option(2.5, min=0, help="Seconds added to each batch by the slow fault."),
    noise_scale: float = typer.Option(2.0, min=0, help="Probability mass the noise fault adds to one random "
                                                         "class per row, before renormalising."),
    clear: bool = typer.Option(False, "--clear", help="Remove the fault of --expert, or of every expert."),
    json_output: bool = typer.Option(False, "--json", help="Print the faults now in force as JSON."),
) -> None:
    """Inject a fault into one running expert, or clear faults, for game days."""
    from services.loopback import loopback_environment

    if not clear and (expert is None or fault is None):
        _fail("pass --expert ID and --fault KIND to inject a fault, or --clear to remove faults")
    if clear and fault is not None:
        _fail("--clear removes faults and takes no --fault; pass one or the other")
    if duration_s is not None and duration_s <= 0:
        _fail(f"--duration-s must be greater than 0, got {duration_s}; leave it out for a fault that lasts "
              "until --clear")
    runtime = _runtime()
    # Ray reads these when it is first imported, which the imports below do. Ray 2.60
    # sends its token (~/.ray/auth_token) to an explicit address only in token mode.
    os.environ.update(loopback_environment())
    if runtime.get("ray_auth_mode"):
        os.environ["RAY_AUTH_MODE"] = runtime["ray_auth_mode"]
    from services.app import expert_deployment_name
    from services.faults import FAULT_KINDS
    from services.runtime import FAULTS_FILE, state_dir
    from services.settings import Settings

    if not clear and fault not in FAULT_KINDS:
        _fail(f"--fault must be one of {', '.join(FAULT_KINDS)}, got {fault!r}")
    if not runtime.get("ray_address") or not runtime.get("settings_file"):
        _fail("runtime.json has no ray_address or settings_file; restart `switchyard serve` with this version")
    settings = Settings.model_validate_json(Path(runtime["settings_file"]).read_text())
    num_experts = _expert_count(settings)
    if expert is not None and expert >= num_experts:
        _fail(f"--expert {expert} does not exist; the bundle has experts 0..{num_experts - 1}")

    faults_path = state_dir() / FAULTS_FILE
    faults = _read_faults(faults_path)
    if clear:
        faults = {} if expert is None else {name: value for name, value in faults.items()
                                            if name != expert_deployment_name(expert)}
    else:
        faults[expert_deployment_name(expert)] = {
            "kind": fault, "until": None if duration_s is None else time.time() + duration_s,
            "latency_s": latency_s, "noise_scale": noise_scale,
        }

    from services.cli import _stdout_to_stderr

    with _stdout_to_stderr():
        _connect_ray(runtime["ray_address"])
        apply_faults(settings, faults)
    faults_path.write_text(json.dumps(faults, indent=2) + "\n")
    if json_output:
        _print_json({"faults": faults})
        return
    if not faults:
        typer.echo("no faults in force")
    for name, value in sorted(faults.items()):
        until = "until cleared" if value["until"] is None else f"until {_format_time(value['until'])}"
        typer.echo(f"{name}: {value['kind']} fault {until}")


def _expert_count(settings) -> int:
    from experts.bundle import load_bundle

    return len(load_bundle(settings.bundle).manifest["experts"])


def _read_faults(path: Path) -> dict[str, dict[str, Any]]:
    try:
        faults = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return faults if isinstance(faults, dict) else {}


def register(app: typer.Typer) -> None:
    """Add `supervisor` and `drill` to the `switchyard` command."""
    app.add_typer(supervisor_app, name="supervisor")
    app.command(name="drill")(drill)
