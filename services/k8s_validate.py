"""Offline validation of Kubernetes manifests: core kinds, custom resources, Serve config.

Every document in every YAML file under a directory gets exactly one result:

- core kinds (Namespace, Service, StatefulSet, ...): `kubernetes-validate` in strict mode,
  which rejects unknown fields, against the bundled schemas of one Kubernetes version;
- custom resources (RayService, PodMonitor, PrometheusRule, ...): the `openAPIV3Schema`
  of the matching version in a CustomResourceDefinition from `crd_dir`. Unknown fields
  are errors, as with the API server's strict field validation, and `metadata` is
  checked against the core ObjectMeta schema;
- RayService additionally: `serveConfigV2` against Ray Serve's own `ServeDeploySchema`,
  unknown Serve options, and the fit between Serve deployments and worker groups;
- Kustomization files: a schema of the fields this project uses, and that every listed
  resource or patch file exists.

A document whose schema is not available is reported as not checked, which is a failure
unless the caller allows it. Files under `config/` are render inputs, not manifests, and
are reported as skipped.

NOTE: CEL rules (`x-kubernetes-validations`) of a CRD and the API server's defaulting are
not evaluated; a cluster may still reject a manifest that passes here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

__all__ = [
    "CheckResult",
    "CrdRegistry",
    "DEFAULT_KUBERNETES_VERSION",
    "ValidationSetupError",
    "load_crds",
    "validate_directory",
    "validate_document",
]

# The oldest Kubernetes minor version the manifests must be valid for (KubeRay 1.4 supports 1.25+).
DEFAULT_KUBERNETES_VERSION = "1.30"

OK = "ok"
INVALID = "invalid"
NOT_CHECKED = "not checked"
SKIPPED = "skipped"

RENDER_INPUT_DIR = "config"
_SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S = 20.0  # Ray 2.60 DeploymentConfig default
_POD_DEFAULT_GRACE_PERIOD_S = 30  # Kubernetes default terminationGracePeriodSeconds

KUSTOMIZATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "metadata": {"type": "object"},
        "namespace": {"type": "string"},
        "namePrefix": {"type": "string"},
        "resources": {"type": "array", "items": {"type": "string"}},
        "labels": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
            "pairs": {"type": "object", "additionalProperties": {"type": "string"}},
            "includeSelectors": {"type": "boolean"},
            "includeTemplates": {"type": "boolean"},
        }}},
        "images": {"type": "array", "items": {"type": "object", "additionalProperties": False, "required": ["name"],
                                               "properties": {"name": {"type": "string"},
                                                              "newName": {"type": "string"},
                                                              "newTag": {"type": "string"},
                                                              "digest": {"type": "string"}}}},
        "secretGenerator": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {"type": "string"}, "type": {"type": "string"},
                           "behavior": {"enum": ["create", "replace", "merge"]},
                           "literals": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.*$"}},
                           "files": {"type": "array", "items": {"type": "string"}},
                           "envs": {"type": "array", "items": {"type": "string"}}}}},
        "generatorOptions": {"type": "object", "additionalProperties": False, "properties": {
            "disableNameSuffixHash": {"type": "boolean"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        }},
        "patches": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"path": {"type": "string"}, "patch": {"type": "string"},
                           "target": {"type": "object", "additionalProperties": False, "properties": {
                               key: {"type": "string"} for key in
                               ("group", "version", "kind", "name", "namespace", "labelSelector",
                                "annotationSelector")}}}}},
    },
}


class ValidationSetupError(ValueError):
    """The validation itself cannot run: a missing directory or an unreadable CRD file."""


@dataclass
class CheckResult:
    """The outcome for one document (or one skipped file)."""

    file: str
    kind: str
    name: str
    check: str
    status: str
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CrdRegistry:
    """openAPIV3Schema by (group, version, kind), from CustomResourceDefinition files."""

    schemas: dict[tuple[str, str, str], dict[str, Any]]
    sources: dict[tuple[str, str, str], str]

    def find(self, api_version: str, kind: str) -> tuple[dict[str, Any], str] | None:
        group, _, version = api_version.rpartition("/")
        key = (group, version, kind)
        if key not in self.schemas:
            return None
        return self.schemas[key], self.sources[key]


def load_crds(crd_dir: str | Path | None) -> CrdRegistry:
    """Read every CustomResourceDefinition in `crd_dir` (YAML or JSON files).

    Raises:
        ValidationSetupError: the directory does not exist or a file is not YAML.
    """
    schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
    sources: dict[tuple[str, str, str], str] = {}
    if crd_dir is None:
        return CrdRegistry(schemas, sources)
    crd_dir = Path(crd_dir)
    if not crd_dir.is_dir():
        raise ValidationSetupError(f"CRD directory {crd_dir} not found; pass --crd-dir with the folder that "
                                   "contains the CustomResourceDefinition files")
    for path in sorted(crd_dir.iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json"):
            continue
        try:
            documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
        except yaml.YAMLError as error:
            raise ValidationSetupError(f"CRD file {path} is not valid YAML: {error}") from error
        for document in documents:
            if not isinstance(document, dict) or document.get("kind") != "CustomResourceDefinition":
                continue
            spec = document.get("spec", {})
            kind = spec.get("names", {}).get("kind")
            for version in spec.get("versions", []):
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if kind and schema:
                    key = (spec.get("group", ""), version["name"], kind)
                    schemas[key] = _strict_schema(schema)
                    sources[key] = path.name
    return CrdRegistry(schemas, sources)


def _strict_schema(schema: Any) -> Any:
    """Copy an OpenAPI v3 schema so that unknown fields are errors, as with kubectl's strict validation.

    An object schema that lists `properties` but neither allows additional ones nor sets
    `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`.
    """
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


# ---------------------------------------------------------------------------------------
# Per-document checks


def _format_errors(errors: Iterator[Any], prefix: str = "") -> list[str]:
    problems = []
    for error in sorted(errors, key=lambda error: [str(part) for part in error.absolute_path]):
        location = ".".join(str(part) for part in error.absolute_path) or "(document)"
        problems.append(f"{prefix}{location}: {error.message}")
    return problems


def _object_meta_errors(metadata: Any, kubernetes_version: str) -> list[str]:
    import jsonschema
    from kubernetes_validate.utils import all_versions, major_minor, schema_contents

    version = [known for known in all_versions() if major_minor(known) <= major_minor(kubernetes_version)][-1]
    definitions = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json",
                                  kubernetes_version)
    object_meta = {**definitions["$defs"]["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"],
                   "$defs": definitions["$defs"]}
    validator = jsonschema.Draft202012Validator(object_meta)
    return _format_errors(validator.iter_errors(metadata), prefix="metadata.")


def _check_core(document: dict[str, Any], kubernetes_version: str) -> tuple[str, str, list[str]]:
    from kubernetes_validate.utils import SchemaNotFoundError
    from kubernetes_validate.utils import ValidationError as KubeValidationError
    from kubernetes_validate.utils import validate as kube_validate

    check = f"kubernetes-validate {kubernetes_version} strict"
    try:
        kube_validate(document, kubernetes_version, strict=True)
    except SchemaNotFoundError as error:
        return check, NOT_CHECKED, [error.message]
    except KubeValidationError as error:
        location = ".".join(str(part) for part in error.absolute_path) or "(document)"
        return check, INVALID, [f"{location}: {error.message}"]
    return check, OK, []


def _check_custom(document: dict[str, Any], schema: dict[str, Any], source: str,
                  kubernetes_version: str) -> tuple[str, list[str]]:
    import jsonschema

    check = f"CRD {source}"
    body = {key: value for key, value in document.items() if key != "metadata"}
    problems = _format_errors(jsonschema.Draft7Validator(schema).iter_errors(body))
    problems += _object_meta_errors(document.get("metadata", {}), kubernetes_version)
    if document.get("kind") == "RayService" and document.get("apiVersion", "").startswith("ray.io/"):
        check += " + Ray ServeDeploySchema"
        problems += _check_rayservice(document)
    return check, problems


def _check_kustomization(document: dict[str, Any], path: Path) -> list[str]:
    import jsonschema

    problems = _format_errors(jsonschema.Draft7Validator(KUSTOMIZATION_SCHEMA).iter_errors(document))
    directory = path.parent
    for resource in document.get("resources", []) or []:
        target = directory / resource
        if target.is_dir():
            if not any((target / name).is_file() for name in ("kustomization.yaml", "kustomization.yml",
                                                               "Kustomization")):
                problems.append(f"resources: {resource} is a directory without a kustomization.yaml")
        elif not target.is_file():
            problems.append(f"resources: {resource} not found next to {path.name}")
    for patch in document.get("patches", []) or []:
        if isinstance(patch, dict) and "path" in patch and not (directory / patch["path"]).is_file():
            problems.append(f"patches: {patch['path']} not found next to {path.name}")
    listed = {Path(resource).name for resource in document.get("resources", []) or []}
    patch_files = {Path(patch["path"]).name for patch in document.get("patches", []) or []
                   if isinstance(patch, dict) and "path" in patch}
    for sibling in sorted(directory.glob("*.yaml")):
        if sibling.name != path.name and sibling.name not in listed | patch_files:
            problems.append(f"{sibling.name} is in the directory but not listed in resources, "
                            "so Kustomize would not apply it")
    return problems


# ---------------------------------------------------------------------------------------
# RayService: serveConfigV2 and the worker groups


def _unknown_keys(model: Any, data: Any, location: str) -> list[str]:
    """Keys of `data` that the pydantic `model` does not define; Serve ignores them silently."""
    if not isinstance(data, dict):
        return []
    known = set(model.model_fields) | {info.alias for info in model.model_fields.values() if info.alias}
    return [f"serveConfigV2.{location}{key}: unknown Serve option (ignored by Ray {_ray_version()})"
            for key in data if key not in known]


def _ray_version() -> str:
    import ray

    return ray.__version__


def _serve_config_problems(config: Any) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    if not isinstance(config, dict):
        return [f"serveConfigV2: must be a mapping, got {type(config).__name__}"]
    problems = []
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as error:
        for problem in error.errors():
            location = ".".join(str(part) for part in problem["loc"])
            problems.append(f"serveConfigV2.{location}: {problem['msg']}")
    problems += _unknown_keys(ServeDeploySchema, config, "")
    for app_index, application in enumerate(config.get("applications") or []):
        prefix = f"applications.{app_index}."
        problems += _unknown_keys(ServeApplicationSchema, application, prefix)
        if not isinstance(application, dict):
            continue
        for index, deployment in enumerate(application.get("deployments") or []):
            where = f"{prefix}deployments.{index}."
            problems += _unknown_keys(DeploymentSchema, deployment, where)
            if isinstance(deployment, dict):
                problems += _unknown_keys(AutoscalingConfig, deployment.get("autoscaling_config"),
                                          where + "autoscaling_config.")
                problems += _unknown_keys(RayActorOptionsSchema, deployment.get("ray_actor_options"),
                                          where + "ray_actor_options.")
    return problems


def _quantity_to_float(value: Any) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def _worker_groups(document: dict[str, Any]) -> list[dict[str, Any]]:
    groups = []
    for group in document["spec"].get("rayClusterConfig", {}).get("workerGroupSpecs", []) or []:
        pod = group.get("template", {}).get("spec", {})
        container = (pod.get("containers") or [{}])[0]
        limits = container.get("resources", {}).get("limits", {})
        start = group.get("rayStartParams", {}) or {}
        cpus = _quantity_to_float(start.get("num-cpus", limits.get("cpu", 0)))
        gpus = _quantity_to_float(start.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        groups.append({"name": group.get("groupName", "?"), "cpus": cpus, "gpus": gpus,
                       "grace_period_s": pod.get("terminationGracePeriodSeconds", _POD_DEFAULT_GRACE_PERIOD_S)})
    return groups


def _fit_problems(config: dict[str, Any], groups: list[dict[str, Any]]) -> list[str]:
    problems = []
    longest_shutdown_s = 0.0
    for application in config.get("applications") or []:
        for deployment in application.get("deployments") or []:
            name = deployment.get("name", "?")
            actor = deployment.get("ray_actor_options") or {}
            cpus, gpus = float(actor.get("num_cpus", 1.0)), float(actor.get("num_gpus", 0.0))
            if not any(cpus <= group["cpus"] and gpus <= group["gpus"] for group in groups):
                problems.append(f"deployment {name} needs {cpus:g} CPUs and {gpus:g} GPUs per replica, "
                                "but no worker group offers that; its replicas would never be scheduled")
            longest_shutdown_s = max(longest_shutdown_s, float(deployment.get(
                "graceful_shutdown_timeout_s", _SERVE_DEFAULT_GRACEFUL_SHUTDOWN_S)))
    for group in groups:
        if group["grace_period_s"] <= longest_shutdown_s:
            problems.append(
                f"worker group {group['name']}: terminationGracePeriodSeconds ({group['grace_period_s']}) must "
                f"exceed the longest graceful_shutdown_timeout_s ({longest_shutdown_s:g} s), or replicas are "
                f"killed before they drain; set it to at least {math.ceil(longest_shutdown_s) + 1}"
            )
    return problems


def _check_rayservice(document: dict[str, Any]) -> list[str]:
    spec = document.get("spec")
    if not isinstance(spec, dict):
        return []
    text = spec.get("serveConfigV2")
    if text is None:
        return ["spec.serveConfigV2: missing; a RayService without it deploys no application"]
    try:
        config = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError as error:
        return [f"spec.serveConfigV2: not valid YAML: {error}"]
    problems = _serve_config_problems(config)
    if not problems:
        problems += _settings_problems(config)
    if not problems:
        problems += _fit_problems(config, _worker_groups(document))
    return problems


# Import paths whose `args` are a Switchyard settings mapping.
SETTINGS_IMPORT_PATHS = ("services.app:app_builder", "services.app:supervisor_app_builder")


def _settings_problems(config: dict[str, Any]) -> list[str]:
    """Check each Switchyard application's `args` against the `Settings` model the app builder uses."""
    from pydantic import ValidationError

    from services.settings import Settings

    problems = []
    for index, application in enumerate(config.get("applications") or []):
        if application.get("import_path") not in SETTINGS_IMPORT_PATHS:
            continue
        try:
            Settings.model_validate(application.get("args") or {})
        except ValidationError as error:
            for problem in error.errors():
                location = ".".join(str(part) for part in problem["loc"])
                problems.append(f"spec.serveConfigV2.applications[{index}].args.{location}: {problem['msg']} "
                                f"(got {problem.get('input')!r})")
    return problems


# ---------------------------------------------------------------------------------------
# Directory walk


def _describe(document: Any) -> tuple[str, str]:
    if not isinstance(document, dict):
        return "?", "?"
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    return str(document.get("kind", "?")), str(metadata.get("name", "-"))


def validate_document(document: Any, path: Path, registry: CrdRegistry,
                      kubernetes_version: str = DEFAULT_KUBERNETES_VERSION, label: str | None = None) -> CheckResult:
    """Check one YAML document from `path` with the check that fits its kind."""
    label = label or str(path)
    kind, name = _describe(document)
    if not isinstance(document, dict) or not document.get("apiVersion") or not document.get("kind"):
        return CheckResult(label, kind, name, "-", INVALID,
                           ["not a Kubernetes object: apiVersion and kind are required"])
    api_version = str(document["apiVersion"])
    if kind == "Kustomization" and api_version.startswith("kustomize.config.k8s.io/"):
        problems = _check_kustomization(document, path)
        return CheckResult(label, kind, name, "kustomization fields and files", INVALID if problems else OK, problems)
    found = registry.find(api_version, kind)
    if found is not None:
        check, problems = _check_custom(document, found[0], found[1], kubernetes_version)
        return CheckResult(label, kind, name, check, INVALID if problems else OK, problems)
    check, status, problems = _check_core(document, kubernetes_version)
    if status == NOT_CHECKED and "/" in api_version and "." in api_version.split("/")[0]:
        problems = [f"no CustomResourceDefinition for {kind} ({api_version}) in the CRD directory; "
                    "pass --crd-dir with a folder that contains it"]
        check = "CRD"
    return CheckResult(label, kind, name, check, status, problems)


def _minor_version(version: str) -> tuple[int, int] | None:
    parts = version.lstrip("v").split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1])


def _check_kubernetes_version(kubernetes_version: str) -> None:
    from kubernetes_validate.utils import all_versions

    known = sorted({_minor_version(version) for version in all_versions()})
    requested = _minor_version(kubernetes_version)
    if requested is None or not known[0] <= requested <= known[-1]:
        first, last = (".".join(map(str, version)) for version in (known[0], known[-1]))
        raise ValidationSetupError(f"no schemas for Kubernetes {kubernetes_version!r} in kubernetes-validate; "
                                   f"choose a major.minor version from {first} to {last}")


def validate_directory(directory: str | Path, crd_dir: str | Path | None = None,
                       kubernetes_version: str = DEFAULT_KUBERNETES_VERSION) -> list[CheckResult]:
    """Check every document of every .yaml/.yml file under `directory`.

    Raises:
        ValidationSetupError: `directory` or `crd_dir` does not exist, or `directory` contains no YAML file.
    """
    directory = Path(directory)
    _check_kubernetes_version(kubernetes_version)
    if not directory.is_dir():
        raise ValidationSetupError(f"manifest directory {directory} not found; render it first with "
                                   f"`switchyard k8s render --out {directory}`")
    registry = load_crds(crd_dir)
    files = sorted(path for path in directory.rglob("*") if path.suffix in (".yaml", ".yml") and path.is_file())
    if not files:
        raise ValidationSetupError(f"no .yaml files under {directory}")
    results = []
    for path in files:
        label = str(path.relative_to(directory))
        if path.relative_to(directory).parts[0] == RENDER_INPUT_DIR:
            results.append(CheckResult(label, "-", "-", "render input", SKIPPED))
            continue
        try:
            documents = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
        except yaml.YAMLError as error:
            results.append(CheckResult(label, "?", "?", "YAML", INVALID, [f"not valid YAML: {error}"]))
            continue
        for document in documents:
            results.append(validate_document(document, path, registry, kubernetes_version, label=label))
    return results
