"""Kubernetes manifests: rendering from the settings, reproducibility and offline validation."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.k8s import RenderError, render_manifests, write_manifests
from services.k8s_validate import INVALID, NOT_CHECKED, OK, SKIPPED, validate_directory
from services.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "k8s-schemas"
CLUSTER_FILE = REPO / "k8s" / "config" / "cluster.yaml"
ALERTS_FILE = REPO / "monitoring" / "prometheus" / "alerts.yaml"

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"CustomResourceDefinitions not found at {CRD_DIR}")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifests")
    write_manifests(render_manifests(CLUSTER_FILE, alerts_file=ALERTS_FILE), out)
    return out


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _rayservice(directory: Path, overlay: str) -> dict:
    (document,) = _documents(directory / "overlays" / overlay / "rayservice.yaml")
    return document


def _serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _deployments(rayservice: dict, application_index: int = 0) -> dict[str, dict]:
    application = _serve_config(rayservice)["applications"][application_index]
    return {deployment["name"]: deployment for deployment in application["deployments"]}


def _copy(rendered: Path, tmp_path: Path) -> Path:
    target = tmp_path / "manifests"
    shutil.copytree(rendered, target)
    return target


def _rewrite(path: Path, change) -> None:
    documents = _documents(path)
    change(documents)
    path.write_text("---\n".join(yaml.safe_dump(document, sort_keys=False) for document in documents))


def _results_by_status(results, status):
    return [result for result in results if result.status == status]


# ---------------------------------------------------------------------------------------
# Rendering


def test_committed_manifests_match_render(rendered):
    """The files under k8s/ are exactly what `switchyard k8s render` produces now."""
    produced = sorted(path.relative_to(rendered) for path in rendered.rglob("*.yaml"))
    committed_files = sorted(path.relative_to(REPO / "k8s") for folder in ("base", "overlays")
                             for path in (REPO / "k8s" / folder).rglob("*.yaml"))
    assert produced, "render wrote no files"
    assert committed_files == produced, "k8s/base or k8s/overlays contains files that render no longer writes"
    for relative in produced:
        committed = REPO / "k8s" / relative
        assert committed.is_file(), f"k8s/{relative} is missing; run `switchyard k8s render`"
        assert committed.read_text() == (rendered / relative).read_text(), (
            f"k8s/{relative} differs from a fresh render; run `switchyard k8s render` and commit the result")


def test_serve_config_runs_app_builder_with_settings(rendered):
    rayservice = _rayservice(rendered, "prod-gpu")
    (application, supervisor) = _serve_config(rayservice)["applications"]
    settings = load_settings(REPO / "k8s" / "config" / "production.yaml")

    assert application["import_path"] == "services.app:app_builder"
    assert application["name"] == settings.app_name
    assert application["route_prefix"] == "/"
    assert application["args"] == settings.model_dump(mode="json")
    assert supervisor["import_path"] == "services.app:supervisor_app_builder"
    assert supervisor["name"] == f"{settings.app_name}-supervisor"
    assert supervisor["route_prefix"] == "/v1/supervisor"
    assert supervisor["args"] == settings.model_dump(mode="json")


def test_pods_get_secrets_from_env(rendered):
    cluster = _rayservice(rendered, "prod-gpu")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]

    for pod in pods:
        env = {entry["name"]: entry.get("valueFrom", {}).get("secretKeyRef")
               for entry in pod["spec"]["containers"][0]["env"]}
        assert env["REDIS_PASSWORD"] == {"name": "switchyard-redis", "key": "password"}
        assert env["SWITCHYARD_ADMIN_TOKEN"] == {"name": "switchyard-admin", "key": "token"}


def test_pods_get_serve_env(rendered):
    from services.ray_env import SERVE_ENV

    cluster = _rayservice(rendered, "prod-gpu")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]

    for pod in pods:
        env = {entry["name"]: entry.get("value") for entry in pod["spec"]["containers"][0]["env"]}
        for name, value in SERVE_ENV.items():
            assert env[name] == value


def test_prod_experts_have_own_gpu_autoscaling(rendered):
    settings = load_settings(REPO / "k8s" / "config" / "production.yaml")
    deployments = _deployments(_rayservice(rendered, "prod-gpu"))
    model_names = [f"expert-{i}" for i in range(4)] + ["dense"]

    for name in model_names:
        assert name in deployments, f"{name} missing from serveConfigV2"
        assert deployments[name]["ray_actor_options"]["num_gpus"] > 0, name
        assert "autoscaling_config" in deployments[name], name
        assert "num_replicas" not in deployments[name], name
    assert deployments["expert-0"]["autoscaling_config"] == settings.experts.autoscaling.to_serve()
    assert deployments["dense"]["autoscaling_config"] == settings.dense.autoscaling.to_serve()


def test_expert_override_reaches_one_expert(tmp_path):
    production = yaml.safe_load((REPO / "k8s" / "config" / "production.yaml").read_text())
    production["expert_overrides"] = {2: {"autoscaling": {"max_replicas": 3}}}
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(production))

    files = render_manifests(CLUSTER_FILE, config=config, overlays=["prod-gpu"], alerts_file=ALERTS_FILE)
    write_manifests(files, tmp_path / "out")
    deployments = _deployments(_rayservice(tmp_path / "out", "prod-gpu"))

    assert deployments["expert-2"]["autoscaling_config"]["max_replicas"] == 3
    assert deployments["expert-1"]["autoscaling_config"]["max_replicas"] == 8


def test_prod_gpu_worker_group(rendered):
    cluster = _rayservice(rendered, "prod-gpu")["spec"]["rayClusterConfig"]
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    container = gpu["template"]["spec"]["containers"][0]

    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"][
        "tolerations"]
    assert gpu["maxReplicas"] > gpu["minReplicas"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_workers_ready_on_readyz_and_drain(rendered):
    rayservice = _rayservice(rendered, "prod-gpu")
    longest_shutdown_s = max(deployment.get("graceful_shutdown_timeout_s", 20.0)
                             for deployment in _deployments(rayservice).values())

    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        probe = pod["containers"][0]["readinessProbe"]["httpGet"]
        assert probe == {"path": "/readyz", "port": 8000}, group["groupName"]
        assert pod["terminationGracePeriodSeconds"] > longest_shutdown_s, group["groupName"]


def test_gcs_fault_tolerance_uses_redis_secret(rendered):
    cluster = _rayservice(rendered, "prod-gpu")["spec"]["rayClusterConfig"]
    options = cluster["gcsFaultToleranceOptions"]
    (redis_service, statefulset) = _documents(rendered / "base" / "redis.yaml")

    assert options["redisAddress"] == f"{redis_service['metadata']['name']}:6379"
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "switchyard-redis", "key": "password"}
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    redis_env = statefulset["spec"]["template"]["spec"]["containers"][0]["env"]
    assert redis_env[0]["valueFrom"]["secretKeyRef"]["name"] == "switchyard-redis"


def test_prometheus_rule_matches_alert_file(rendered):
    documents = _documents(rendered / "base" / "monitoring.yaml")
    kinds = [document["kind"] for document in documents]
    (rule,) = [document for document in documents if document["kind"] == "PrometheusRule"]
    alerts = yaml.safe_load(ALERTS_FILE.read_text())

    assert kinds.count("PodMonitor") == 2
    assert rule["spec"]["groups"] == alerts["groups"]
    alert_names = {entry["alert"] for group in alerts["groups"] for entry in group["rules"]}
    assert {"SwitchyardTrafficOnDense", "SwitchyardAgreementLow", "SwitchyardDeadLettersGrowing",
            "SwitchyardExpertErrors"} <= alert_names


def test_render_rejects_gpu_settings_on_cpu_overlay():
    with pytest.raises(RenderError, match="deployment expert-0 needs 1 CPUs and 0.25 GPUs.*no worker group"):
        render_manifests(CLUSTER_FILE, config=REPO / "k8s" / "config" / "production.yaml", overlays=["dev-cpu"],
                         alerts_file=ALERTS_FILE)


def test_render_rejects_missing_redis_url(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("port: 8000\n")

    with pytest.raises(RenderError, match="redis.url is not set"):
        render_manifests(CLUSTER_FILE, config=config, overlays=["dev-cpu"], alerts_file=ALERTS_FILE)


def test_render_rejects_free_port(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("port: 0\nredis: {url: 'redis://switchyard-redis:6379/0', password_env: REDIS_PASSWORD}\n")

    with pytest.raises(RenderError, match="port is 0"):
        render_manifests(CLUSTER_FILE, config=config, overlays=["dev-cpu"], alerts_file=ALERTS_FILE)


def test_render_rejects_unknown_overlay():
    with pytest.raises(RenderError, match=r"unknown overlays \['staging'\]"):
        render_manifests(CLUSTER_FILE, overlays=["staging"], alerts_file=ALERTS_FILE)


# ---------------------------------------------------------------------------------------
# Validation


@needs_crds
def test_rendered_manifests_all_checked(rendered):
    results = validate_directory(rendered, crd_dir=CRD_DIR)
    kinds = {result.kind for result in results}

    assert _results_by_status(results, INVALID) == []
    assert _results_by_status(results, NOT_CHECKED) == []
    assert {"RayService", "PodMonitor", "PrometheusRule", "StatefulSet", "Service", "Namespace",
            "Kustomization"} <= kinds
    assert all(result.status == OK for result in results)


@needs_crds
def test_repository_k8s_dir_validates():
    results = validate_directory(REPO / "k8s", crd_dir=CRD_DIR)

    assert _results_by_status(results, INVALID) == []
    assert _results_by_status(results, NOT_CHECKED) == []
    assert {result.file for result in _results_by_status(results, SKIPPED)} == {
        "config/cluster.yaml", "config/development.yaml", "config/production.yaml"}


def test_custom_resources_unchecked_without_crds(rendered):
    results = validate_directory(rendered, crd_dir=None)
    unchecked = {result.kind for result in _results_by_status(results, NOT_CHECKED)}

    assert unchecked == {"RayService", "PodMonitor", "PrometheusRule"}
    assert all("--crd-dir" in result.problems[0] for result in _results_by_status(results, NOT_CHECKED))


@needs_crds
def test_validate_rejects_unknown_rayservice_field(rendered, tmp_path):
    manifests = _copy(rendered, tmp_path)
    path = manifests / "overlays" / "prod-gpu" / "rayservice.yaml"
    _rewrite(path, lambda documents: documents[0]["spec"]["rayClusterConfig"].update(enableAutoscaling=True))

    results = validate_directory(manifests, crd_dir=CRD_DIR)
    (invalid,) = _results_by_status(results, INVALID)

    assert invalid.kind == "RayService"
    assert any("enableAutoscaling" in problem for problem in invalid.problems)


@needs_crds
def test_validate_rejects_bad_serve_config(rendered, tmp_path):
    manifests = _copy(rendered, tmp_path)
    path = manifests / "overlays" / "prod-gpu" / "rayservice.yaml"

    def break_serve_config(documents):
        config = yaml.safe_load(documents[0]["spec"]["serveConfigV2"])
        deployment = config["applications"][0]["deployments"][1]
        deployment["autoscaling_config"]["min_replica"] = 1
        deployment["max_ongoing_requests"] = 0
        documents[0]["spec"]["serveConfigV2"] = yaml.safe_dump(config)

    _rewrite(path, break_serve_config)
    (invalid,) = _results_by_status(validate_directory(manifests, crd_dir=CRD_DIR), INVALID)

    assert any("max_ongoing_requests" in problem for problem in invalid.problems), invalid.problems
    assert any("min_replica: unknown Serve option" in problem for problem in invalid.problems), invalid.problems


@needs_crds
def test_validate_rejects_invalid_switchyard_settings(rendered, tmp_path):
    manifests = _copy(rendered, tmp_path)
    path = manifests / "overlays" / "prod-gpu" / "rayservice.yaml"

    def break_settings(documents):
        config = yaml.safe_load(documents[0]["spec"]["serveConfigV2"])
        config["applications"][0]["args"]["router"]["replica"]["num_cpus"] = "lots"
        documents[0]["spec"]["serveConfigV2"] = yaml.safe_dump(config)

    _rewrite(path, break_settings)
    (invalid,) = _results_by_status(validate_directory(manifests, crd_dir=CRD_DIR), INVALID)

    assert any("args.router.replica.num_cpus" in problem for problem in invalid.problems), invalid.problems


@needs_crds
def test_validate_rejects_short_grace_period(rendered, tmp_path):
    manifests = _copy(rendered, tmp_path)
    path = manifests / "overlays" / "prod-gpu" / "rayservice.yaml"

    def shorten(documents):
        group = documents[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
        group["template"]["spec"]["terminationGracePeriodSeconds"] = 10

    _rewrite(path, shorten)
    (invalid,) = _results_by_status(validate_directory(manifests, crd_dir=CRD_DIR), INVALID)

    assert any("worker group gpu: terminationGracePeriodSeconds (10)" in problem for problem in invalid.problems)


@needs_crds
def test_validate_rejects_gpu_deployment_without_gpu_group(rendered, tmp_path):
    manifests = _copy(rendered, tmp_path)
    path = manifests / "overlays" / "prod-gpu" / "rayservice.yaml"

    def drop_gpu_group(documents):
        groups = documents[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        groups[:] = [group for group in groups if group["groupName"] != "gpu"]

    _rewrite(path, drop_gpu_group)
    (invalid,) = _results_by_status(validate_directory(manifests, crd_dir=CRD_DIR), INVALID)

    assert any("deployment expert-0 needs 1 CPUs and 0.25 GPUs" in problem for problem in invalid.problems)


def test_validate_rejects_unknown_core_field(rendered, tmp_path):
    manifests = _copy(rendered, tmp_path)
    _rewrite(manifests / "base" / "redis.yaml",
             lambda documents: documents[1]["spec"].update(replicaCount=1))

    invalid = _results_by_status(validate_directory(manifests, crd_dir=None), INVALID)

    assert [result.kind for result in invalid] == ["StatefulSet"]
    assert "replicaCount" in invalid[0].problems[0]


def test_validate_rejects_missing_kustomize_resource(rendered, tmp_path):
    manifests = _copy(rendered, tmp_path)
    (manifests / "base" / "redis.yaml").unlink()

    invalid = _results_by_status(validate_directory(manifests, crd_dir=None), INVALID)

    assert [result.file for result in invalid] == ["base/kustomization.yaml"]
    assert invalid[0].problems == ["resources: redis.yaml not found next to kustomization.yaml"]


def test_validate_rejects_document_without_kind(tmp_path):
    (tmp_path / "broken.yaml").write_text("apiVersion: v1\nmetadata: {name: x}\n")

    (result,) = validate_directory(tmp_path)

    assert result.status == INVALID
    assert result.problems == ["not a Kubernetes object: apiVersion and kind are required"]


def test_validate_reports_unknown_kind_unchecked(tmp_path):
    document = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    (tmp_path / "widget.yaml").write_text(yaml.safe_dump(document))

    (result,) = validate_directory(tmp_path, crd_dir=CRD_DIR if CRD_DIR.is_dir() else None)

    assert result.status == NOT_CHECKED
    assert "no CustomResourceDefinition for Widget (example.com/v1)" in result.problems[0]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@needs_crds
@pytest.mark.parametrize("overlay", ["dev-cpu", "prod-gpu"])
def test_kustomize_build_validates(rendered, tmp_path, overlay):
    """`kubectl kustomize` builds each overlay, and every built object passes validation."""
    built = subprocess.run(["kubectl", "kustomize", str(rendered / "overlays" / overlay)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (tmp_path / "built.yaml").write_text(built.stdout)

    results = validate_directory(tmp_path, crd_dir=CRD_DIR)
    kinds = [result.kind for result in results]

    assert [result for result in results if result.status != OK] == []
    assert all(document["metadata"]["namespace"] == "switchyard"
               for document in _documents(tmp_path / "built.yaml") if document["kind"] != "Namespace")
    assert kinds.count("RayService") == 1
    assert kinds.count("Secret") == (2 if overlay == "dev-cpu" else 0)


# ---------------------------------------------------------------------------------------
# Command line


@needs_crds
def test_cli_render_then_validate(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    runner = CliRunner()
    out = tmp_path / "out"

    rendered = runner.invoke(cli_app, ["k8s", "render", "--out", str(out)])
    validated = runner.invoke(cli_app, ["k8s", "validate", str(out), "--crd-dir", str(CRD_DIR)])

    assert rendered.exit_code == 0, rendered.output
    assert validated.exit_code == 0, validated.output
    assert "0 invalid, 0 not checked" in validated.output


def test_cli_validate_fails_when_unchecked(rendered):
    runner = CliRunner()

    strict = runner.invoke(cli_app, ["k8s", "validate", str(rendered), "--json"])
    allowed = runner.invoke(cli_app, ["k8s", "validate", str(rendered), "--allow-unchecked"])

    assert strict.exit_code == 1
    assert "\"not_checked\": 5" in strict.stdout
    assert allowed.exit_code == 0, allowed.output


def test_cli_validate_rejects_unknown_kubernetes_version(rendered):
    result = CliRunner().invoke(cli_app, ["k8s", "validate", str(rendered), "--kubernetes-version", "1.9"])

    assert result.exit_code == 2
    assert "no schemas for Kubernetes '1.9'" in result.output


def test_cli_validate_missing_directory(tmp_path):
    result = CliRunner().invoke(cli_app, ["k8s", "validate", str(tmp_path / "absent")])

    assert result.exit_code == 2
    assert "manifest directory" in result.output
    assert "not found" in result.output


def test_cli_render_reports_invalid_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = tmp_path / "settings.yaml"
    config.write_text("experts: {num_cpus: -1}\n")

    result = CliRunner().invoke(cli_app, ["k8s", "render", "--out", str(tmp_path / "out"), "--config", str(config)])

    assert result.exit_code == 2
    assert "experts.num_cpus" in result.output
    assert not (tmp_path / "out").exists()

