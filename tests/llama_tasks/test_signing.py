import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import signing
from llama_tasks.errors import BadSignature, UnknownSigner, Unsigned


def test_signed_payload_verifies_and_round_trips():
    key = Ed25519PrivateKey.generate()
    env = signing.sign({"job_id": "a", "max_tokens": 5, "prompt": "héllo"}, key)
    assert signing.verify(env, key.public_key()) == {"job_id": "a", "max_tokens": 5, "prompt": "héllo"}


def test_any_change_to_the_payload_breaks_the_signature():
    key = Ed25519PrivateKey.generate()
    env = signing.sign({"job_id": "a", "max_tokens": 5}, key)
    env["payload"]["max_tokens"] = 500
    with pytest.raises(BadSignature):
        signing.verify(env, key.public_key())


def test_envelope_from_another_key_is_refused_by_key_id_and_by_signature():
    herder, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = signing.sign({"job_id": "a"}, other)
    with pytest.raises(UnknownSigner):
        signing.verify(env, herder.public_key())
    # Forging the key id does not help: the signature still fails.
    env["key_id"] = signing.key_id(herder.public_key())
    with pytest.raises(BadSignature):
        signing.verify(env, herder.public_key())


@pytest.mark.parametrize("envelope", [None, "text", {}, {"payload": {"a": 1}}, {"payload": "x", "sig": "y"}])
def test_missing_signature_is_unsigned(envelope):
    with pytest.raises(Unsigned):
        signing.verify(envelope, Ed25519PrivateKey.generate().public_key())


def test_keypair_files(tmp_path):
    key_file, pub_file = signing.generate_keypair(tmp_path)
    assert key_file.stat().st_mode & 0o777 == 0o600
    private = signing.load_private(key_file)
    public = signing.load_public("", pub_file)
    assert signing.key_id(public) == signing.key_id(private.public_key())
    assert signing.key_id(signing.load_public(pub_file.read_text(), tmp_path / "absent")) == signing.key_id(public)
