import json

import pytest

from llama_tasks import registry
from llama_tasks.errors import ModelFileMissing, ModelHashMismatch, UnknownModel


def test_default_model_is_the_bundled_smollm2_and_its_hash_is_its_id():
    spec = registry.builtin_models()["smollm2"]
    assert spec.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    registry.verify(spec)
    assert spec.model_id == registry.SMOLLM2_SHA256


def test_users_add_their_own_gguf_by_name(tmp_path):
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    models_file = tmp_path / "models.json"
    spec = registry.add_model(models_file, "mine", gguf)
    assert registry.lookup(models_file, "mine") == spec
    assert json.loads(models_file.read_text())["mine"]["sha256"] == registry.file_sha256(gguf)
    assert "smollm2" in registry.load_registry(models_file)


def test_missing_file_and_changed_bytes_are_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    models_file = tmp_path / "models.json"
    spec = registry.add_model(models_file, "m", gguf)
    gguf.write_bytes(b"two")
    with pytest.raises(ModelHashMismatch) as info:
        registry.verify(spec)
    assert info.value.expected == spec.sha256
    gguf.unlink()
    with pytest.raises(ModelFileMissing):
        registry.verify(spec)
    with pytest.raises(ModelFileMissing):
        registry.add_model(models_file, "gone", gguf)


def test_unknown_model_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownModel) as info:
        registry.lookup(tmp_path / "models.json", "nope")
    assert "smollm2" in info.value.known
