"""Tests of blocks/vault.py: the local AES-256-GCM vault and the remote vault client.

The local vault runs for real (real files, real processes racing on the master key file). The
remote vault talks to a ``pytest_httpserver`` stand-in that speaks the vault service's Connect
JSON protocol: Unkey's own vault service cannot run here, so these tests pin the wire format
(paths, bodies, bearer header) and the mapping of its answers to our error tree.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import stat
import threading
import time
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from blocks.vault import (
    EncryptResult,
    LocalVault,
    RemoteVault,
    Vault,
    VaultDecryptError,
    VaultKeyFileError,
    VaultRequestError,
    VaultUnavailableError,
    vault_from_settings,
)
from worker.kernel.errors import ConfigError, RetryableError, TerminalError
from worker.settings import Settings

PLAINTEXT = "-----BEGIN EC PRIVATE KEY-----PLAINTEXT-SENTINEL-7f3a-----END EC PRIVATE KEY-----"
TOKEN = "TOKEN-SENTINEL-91c2"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "vault-master.key"


@pytest.fixture
def vault(key_path: Path) -> LocalVault:
    return LocalVault(master_key_file=str(key_path))


def _key_bytes(path: Path) -> list[str]:
    return [row["key"] for row in json.loads(path.read_text())["keys"]]


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert PLAINTEXT not in text
        assert "PLAINTEXT-SENTINEL" not in text
        assert TOKEN not in text


# -- local vault ---------------------------------------------------------------------------------


def test_round_trip_on_several_keyrings(vault: LocalVault) -> None:
    """Whatever is encrypted under a keyring decrypts to the same text under that keyring."""
    assert isinstance(vault, Vault)
    for keyring in ("acme", "ws_1", "ws_2", "ws_ünïcode"):
        for plaintext in (PLAINTEXT, "", "ü€😀" * 100):
            result = vault.encrypt(keyring, plaintext)
            assert result.key_id == "k1"
            assert result.encrypted.startswith("v1.k1.")
            assert PLAINTEXT not in result.encrypted
            assert vault.decrypt(keyring, result.encrypted) == plaintext


def test_same_plaintext_encrypts_differently_each_time(vault: LocalVault) -> None:
    """A random nonce per call: equal secrets cannot be spotted by equal ciphertexts."""
    seen = {vault.encrypt("ws_1", PLAINTEXT).encrypted for _ in range(20)}
    assert len(seen) == 20
    assert all(vault.decrypt("ws_1", encrypted) == PLAINTEXT for encrypted in seen)


def test_decrypt_under_another_keyring_fails_terminally(vault: LocalVault) -> None:
    """A workspace's ciphertext never decrypts under another workspace's keyring."""
    encrypted = vault.encrypt("ws_1", PLAINTEXT).encrypted
    with pytest.raises(VaultDecryptError) as caught:
        vault.decrypt("ws_2", encrypted)
    assert isinstance(caught.value, TerminalError)
    message = str(caught.value)
    assert "'ws_2'" in message and "'k1'" in message
    assert encrypted not in message and encrypted.split(".")[2] not in message
    _assert_no_secret(message, repr(caught.value))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c[:-2] + ("A" if c[-2] != "A" else "B") + c[-1],  # flip a byte of the tag
        lambda c: c[:12] + ("A" if c[12] != "A" else "B") + c[13:],  # flip a byte of the nonce
        lambda c: c + "AAAA",  # extended
        lambda c: c[:20],  # truncated
        lambda c: c.replace("v1.", "v2.", 1),  # unknown format version
        lambda c: c.replace(".k1.", ".k9.", 1),  # unknown key id
        lambda c: c.replace(".k1.", ".k1", 1),  # no separator
        lambda c: c + "!",  # not base64url
        lambda c: PLAINTEXT,  # not a ciphertext at all
    ],
)
def test_tampered_ciphertext_fails_terminally(vault: LocalVault, tamper) -> None:
    """Any change to a ciphertext is detected (GCM tag) and never yields wrong plaintext."""
    encrypted = vault.encrypt("ws_1", PLAINTEXT).encrypted
    bad = tamper(encrypted)
    with pytest.raises(VaultDecryptError) as caught:
        vault.decrypt("ws_1", bad)
    assert isinstance(caught.value, TerminalError)
    assert "'ws_1'" in str(caught.value)
    assert caught.value.__cause__ is None
    assert encrypted.split(".")[2] not in str(caught.value)
    _assert_no_secret(str(caught.value), repr(caught.value))


def test_master_key_file_is_created_0600_and_reused(key_path: Path) -> None:
    """The master key is generated once, private to its owner, and every instance reuses it."""
    assert not key_path.parent.exists()
    first = LocalVault(master_key_file=str(key_path))
    encrypted = first.encrypt("acme", PLAINTEXT).encrypted
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    keys = _key_bytes(key_path)
    assert len(keys) == 1

    second = LocalVault(master_key_file=str(key_path))
    assert second.decrypt("acme", encrypted) == PLAINTEXT
    assert second.encrypt("acme", "x").key_id == "k1"
    assert _key_bytes(key_path) == keys
    assert [p.name for p in key_path.parent.iterdir()] == [key_path.name]  # no temp files left


def _encrypt_in_child(path: str, index: int, barrier, results) -> None:
    barrier.wait()  # every process reaches the missing key file at the same moment
    encrypted = LocalVault(master_key_file=path).encrypt("race", f"secret-{index}")
    results.put((index, encrypted.encrypted))


def test_processes_starting_at_once_share_one_master_key(key_path: Path) -> None:
    """Eight processes creating the key file at once end with one key that all of them used."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(8), context.Queue()
    processes = [
        context.Process(target=_encrypt_in_child, args=(str(key_path), i, barrier, results))
        for i in range(8)
    ]
    for process in processes:
        process.start()
    outputs = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert len(_key_bytes(key_path)) == 1
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    parent = LocalVault(master_key_file=str(key_path))
    for index, encrypted in outputs.items():
        assert parent.decrypt("race", encrypted) == f"secret-{index}"


def test_rotation_keeps_old_ciphertext_readable(vault: LocalVault, key_path: Path) -> None:
    """After rotate(), old ciphertexts still decrypt and new ones use the new key version."""
    before = vault.encrypt("ws_1", PLAINTEXT)
    other_process = LocalVault(master_key_file=str(key_path))
    assert other_process.decrypt("ws_1", before.encrypted) == PLAINTEXT  # caches k1 only

    assert vault.rotate() == "k2"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    after = vault.encrypt("ws_1", PLAINTEXT)
    assert after.key_id == "k2" and after.encrypted.startswith("v1.k2.")
    assert vault.decrypt("ws_1", before.encrypted) == PLAINTEXT
    assert vault.decrypt("ws_1", after.encrypted) == PLAINTEXT
    # An instance that read the file before the rotation finds the new key on a miss.
    assert other_process.decrypt("ws_1", after.encrypted) == PLAINTEXT
    assert vault.rotate() == "k3"
    assert len(_key_bytes(key_path)) == 3


def test_group_or_world_readable_master_key_is_refused(vault: LocalVault, key_path: Path) -> None:
    """A master key file others can read counts as leaked: the vault refuses to use it."""
    vault.encrypt("acme", PLAINTEXT)
    for mode in (0o644, 0o640, 0o604):
        os.chmod(key_path, mode)
        with pytest.raises(VaultKeyFileError) as caught:
            LocalVault(master_key_file=str(key_path)).encrypt("acme", PLAINTEXT)
        assert isinstance(caught.value, TerminalError)
        assert str(key_path) in str(caught.value) and f"{mode:04o}" in str(caught.value)
        for key in _key_bytes(key_path):
            assert key not in str(caught.value)


def test_local_vault_repr_and_pickle_hold_no_key(vault: LocalVault, key_path: Path) -> None:
    """Key bytes never show in a block's repr, and a pickled block carries no key cache."""
    encrypted = vault.encrypt("acme", PLAINTEXT).encrypted
    (key,) = _key_bytes(key_path)
    assert key not in repr(vault) and key not in str(vault)
    copy = pickle.loads(pickle.dumps(vault))
    assert key.encode() not in pickle.dumps(vault)
    assert copy.decrypt("acme", encrypted) == PLAINTEXT


def test_vault_from_settings_picks_local_or_remote(tmp_path: Path) -> None:
    """No vault URL means the local vault under the state dir; a URL means the remote one."""
    local = vault_from_settings(Settings(_env_file=None, state_dir=tmp_path))
    assert isinstance(local, LocalVault)
    assert local.master_key_file == str(tmp_path.resolve() / "vault-master.key")

    remote = vault_from_settings(
        Settings(_env_file=None, vault_url="http://vault.test", vault_token=TOKEN)
    )
    assert isinstance(remote, RemoteVault)
    assert remote.url == "http://vault.test"
    assert remote.token.get_secret_value() == TOKEN
    with pytest.raises(ConfigError, match="UNKEY_VAULT_TOKEN"):
        vault_from_settings(Settings(_env_file=None, vault_url="http://vault.test"))


# -- remote vault --------------------------------------------------------------------------------


@pytest.fixture
def remote(httpserver: HTTPServer):
    block = RemoteVault(url=httpserver.url_for("/"), token=TOKEN, timeout_seconds=2)
    yield block
    block.close()


def _expect(httpserver: HTTPServer, method: str, body: dict[str, str]):
    return httpserver.expect_request(
        f"/vault.v1.VaultService/{method}",
        method="POST",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )


def test_remote_vault_speaks_the_connect_protocol(httpserver: HTTPServer, remote) -> None:
    """Encrypt and Decrypt hit the vault service's paths with its JSON bodies and the token."""
    _expect(httpserver, "Encrypt", {"keyring": "ws_1", "data": PLAINTEXT}).respond_with_json(
        {"encrypted": "CIPHERTEXT", "keyId": "key_2"}
    )
    _expect(
        httpserver, "Decrypt", {"keyring": "ws_1", "encrypted": "CIPHERTEXT"}
    ).respond_with_json({"plaintext": PLAINTEXT})
    assert remote.encrypt("ws_1", PLAINTEXT) == EncryptResult(
        encrypted="CIPHERTEXT", key_id="key_2"
    )
    assert remote.decrypt("ws_1", "CIPHERTEXT") == PLAINTEXT
    httpserver.check_assertions()
    assert isinstance(remote, Vault)


def test_remote_vault_reads_omitted_empty_plaintext(httpserver: HTTPServer, remote) -> None:
    """proto3 JSON omits empty fields: a Decrypt reply of {} is the empty plaintext."""
    _expect(httpserver, "Decrypt", {"keyring": "ws_1", "encrypted": "C"}).respond_with_json({})
    assert remote.decrypt("ws_1", "C") == ""


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_remote_vault_unavailable_is_retryable(httpserver: HTTPServer, remote, status) -> None:
    """A vault that is down, overloaded or rate-limiting is retried, not given up on."""
    httpserver.expect_request("/vault.v1.VaultService/Encrypt").respond_with_json(
        {"code": "unavailable", "message": f"echo {PLAINTEXT} {TOKEN}"}, status=status
    )
    with pytest.raises(VaultUnavailableError) as caught:
        remote.encrypt("ws_1", PLAINTEXT)
    assert isinstance(caught.value, RetryableError)
    assert f"HTTP {status} (unavailable)" in str(caught.value)
    _assert_no_secret(str(caught.value), repr(caught.value))


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "unauthenticated"), (403, "permission_denied"), (400, "invalid_argument"), (404, None)],
)
def test_remote_vault_refusal_is_terminal(httpserver: HTTPServer, remote, status, code) -> None:
    """A refused request (bad token, bad input) fails at once and names status and code."""
    reply = {"message": f"echo {PLAINTEXT} {TOKEN}"} | ({"code": code} if code else {})
    httpserver.expect_request("/vault.v1.VaultService/Decrypt").respond_with_json(
        reply, status=status
    )
    with pytest.raises(VaultRequestError) as caught:
        remote.decrypt("ws_1", "CIPHERTEXT-SENTINEL")
    assert isinstance(caught.value, TerminalError)
    message = str(caught.value)
    assert f"HTTP {status}" in message and "'ws_1'" in message
    assert (f"({code})" in message) if code else "(" not in message.split("HTTP")[1]
    assert "CIPHERTEXT-SENTINEL" not in message
    _assert_no_secret(message, repr(caught.value))


def test_remote_vault_timeout_is_retryable(httpserver: HTTPServer) -> None:
    """A vault that does not answer in time is retried later (the call never hangs)."""

    client_gave_up = threading.Event()

    def slow(request: Request) -> Response:
        client_gave_up.wait(timeout=10)  # answers only after the client stopped waiting
        return Response(json.dumps({"plaintext": PLAINTEXT}), content_type="application/json")

    httpserver.expect_request("/vault.v1.VaultService/Decrypt").respond_with_handler(slow)
    block = RemoteVault(url=httpserver.url_for("/"), token=TOKEN, timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(VaultUnavailableError, match="timed out") as caught:
        block.decrypt("ws_1", "C")
    client_gave_up.set()
    assert time.monotonic() - started < 5
    assert caught.value.__cause__ is None
    _assert_no_secret(str(caught.value), repr(caught.value))
    block.close()


def test_remote_vault_unreachable_is_retryable() -> None:
    """A vault that cannot be reached is a retryable error that names no secret."""
    block = RemoteVault(url="http://127.0.0.1:9", token=TOKEN, timeout_seconds=2)
    with pytest.raises(VaultUnavailableError, match="ConnectError") as caught:
        block.encrypt("ws_1", PLAINTEXT)
    _assert_no_secret(str(caught.value), repr(caught.value))


def test_remote_vault_malformed_reply_is_retryable(httpserver: HTTPServer, remote) -> None:
    """A 200 that is not the vault's JSON (a proxy page) is retried, without echoing it."""
    httpserver.expect_request("/vault.v1.VaultService/Decrypt").respond_with_data(
        f"<html>{PLAINTEXT}</html>", content_type="text/html"
    )
    with pytest.raises(VaultUnavailableError) as caught:
        remote.decrypt("ws_1", "C")
    _assert_no_secret(str(caught.value), repr(caught.value))


def test_remote_vault_token_never_shows(httpserver: HTTPServer, remote) -> None:
    """The bearer token is hidden from the block's repr, str and dumps."""
    for text in (repr(remote), str(remote), str(remote.model_dump())):
        _assert_no_secret(text)
    assert "**********" in repr(remote)
