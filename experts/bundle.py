"""Model bundle: a directory with `manifest.json` and one safetensors file per module.

Layout:
    manifest.json          format version, architectures, input shape, class names,
                           routing defaults, metrics and the SHA-256 of every weight file
    weights/<name>.safetensors

The bundle format knows nothing of routing: callers put whatever descriptive fields
they need in the manifest and get them back unchanged. Loading verifies the format
version and every hash before any weight is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "Bundle",
    "BundleError",
    "load_bundle",
    "save_bundle",
]

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_DIR = "weights"


class BundleError(RuntimeError):
    """A bundle that is missing, of another format version, or corrupted."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        """Short content hash of all weight files: changes whenever any weight changes."""
        digest = hashlib.sha256()
        for name, file_hash in sorted(self.manifest["files"].items()):
            digest.update(f"{name}={file_hash};".encode())
        return digest.hexdigest()[:12]

    def weights_path(self, module: str) -> Path:
        if module not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} has no weights for {module!r}; "
                              f"it has {sorted(self.manifest['files'])}")
        return self.path / WEIGHTS_DIR / f"{module}.safetensors"

    def load_state_dict(self, module: str, device: str = "cpu") -> dict:
        """Read one module's tensors (torch) from its verified safetensors file."""
        from safetensors.torch import load_file

        return load_file(self.weights_path(module), device=device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(path: str | Path, manifest: dict[str, Any], state_dicts: dict[str, dict]) -> Bundle:
    """Write weights and a manifest with their hashes; replaces an existing bundle at `path`.

    The manifest is written last, through a rename, so a crash mid-save leaves no
    manifest that points at half-written weights.
    """
    from safetensors.torch import save_file

    path = Path(path)
    weights_dir = path / WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for name, state in state_dicts.items():
        target = weights_dir / f"{name}.safetensors"
        tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        save_file(tensors, target)
        files[name] = _sha256(target)

    full_manifest = {**manifest, "format_version": BUNDLE_FORMAT_VERSION, "files": files}
    with tempfile.NamedTemporaryFile("w", dir=path, delete=False, suffix=".tmp") as handle:
        json.dump(full_manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(handle.name, path / MANIFEST_NAME)
    return Bundle(path=path, manifest=full_manifest)


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle.

    Raises:
        BundleError: no manifest, unreadable manifest, another format version, a weight
            file missing, or a weight file whose SHA-256 differs from the manifest.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"no model bundle at {path}: {MANIFEST_NAME} not found; "
                          "create one with `switchyard train --out DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise BundleError(f"cannot read {manifest_path}: {error}") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{manifest_path} is not a bundle manifest (no 'files' map)")

    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle {path} has format version {version!r}, this Switchyard reads version "
            f"{BUNDLE_FORMAT_VERSION}; retrain it with `switchyard train --out {path}`"
        )

    for name, expected in manifest["files"].items():
        weights = path / WEIGHTS_DIR / f"{name}.safetensors"
        if not weights.is_file():
            raise BundleError(f"bundle {path} is incomplete: {weights} not found")
        actual = _sha256(weights)
        if actual != expected:
            raise BundleError(
                f"bundle {path} is corrupted: {weights.name} has SHA-256 {actual[:16]}…, "
                f"the manifest expects {expected[:16]}…; retrain or restore the bundle"
            )
    return Bundle(path=path, manifest=manifest)
