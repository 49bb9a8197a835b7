"""Vault: encryption of the secrets the worker must persist, as Prefect blocks.

ACME private keys and ClickHouse passwords are stored in the control-plane database, so they
are encrypted first, each under a *keyring* (a workspace id, or ``acme``). ``Vault`` is the
small interface the tasks use; two blocks implement it:

- ``LocalVault`` (the embedded default, SPEC §2.2): AES-256-GCM with a master key file under
  ``./.ctrl/``. Each keyring gets its own key, derived from the master key with HKDF-SHA256, and
  the keyring is also bound as associated data, so a ciphertext never decrypts under another
  keyring. The file holds versioned keys: the newest encrypts, all of them decrypt, and
  ``rotate()`` adds a version. A ciphertext reads ``v1.<key id>.<base64url(nonce || sealed)>``.
- ``RemoteVault``: the original's vault service (Connect JSON over HTTP, bearer token).

Why it is safe under concurrency: the master key file is created by linking a finished 0600
temporary file into place (``os.link`` fails if the name exists), so when several processes
start at once exactly one key wins and every process reads that one. Rotation rewrites the file
under an exclusive ``flock`` (no lost versions) and replaces it atomically.

Security: messages, reprs and exceptions name the keyring, the key id, the path or the HTTP
status, never a plaintext, a ciphertext, key bytes or the token; causes that could carry them
are suppressed (``from None``). A master key file readable by group or others is refused.

Error handling: a bad, tampered or foreign ciphertext, an unknown key id, a bad key file and a
refused request (4xx) are terminal; network errors, timeouts, 408, 429 and 5xx are retryable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr, SecretStr

from worker.kernel.errors import ConfigError, InvalidParameterError, RetryableError, TerminalError
from worker.settings import Settings, env_name

__all__ = [
    "EncryptResult",
    "LocalVault",
    "RemoteVault",
    "Vault",
    "VaultDecryptError",
    "VaultKeyFileError",
    "VaultRequestError",
    "VaultUnavailableError",
    "vault_from_settings",
]

_FORMAT = "v1"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEY_BYTES = 32
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONNECT_CODE = re.compile(r"[a-z_]{1,40}")


class VaultDecryptError(TerminalError):
    """A ciphertext cannot be decrypted: malformed, tampered, another keyring or unknown key."""


class VaultKeyFileError(ConfigError):
    """The local master key file is unsafe (group/world readable) or unreadable."""


class VaultRequestError(TerminalError):
    """The remote vault refused the request (4xx other than 408/429)."""


class VaultUnavailableError(RetryableError):
    """The remote vault could not answer now (network, timeout, 408, 429, 5xx, bad reply)."""


@dataclass(frozen=True)
class EncryptResult:
    """A ciphertext and the id of the key version that sealed it."""

    encrypted: str
    key_id: str


@runtime_checkable
class Vault(Protocol):
    """What tasks need from a vault (sync: tasks call it from worker threads)."""

    def encrypt(self, keyring: str, plaintext: str) -> EncryptResult:
        """Encrypt ``plaintext`` under ``keyring``."""
        ...

    def decrypt(self, keyring: str, encrypted: str) -> str:
        """Decrypt a ciphertext made by ``encrypt`` under the same ``keyring``."""
        ...


class _Runtime:
    # Per-instance state that is not configuration (caches, a client, a lock). A copied or
    # unpickled block starts with a fresh one: locks and sockets cannot travel.
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: tuple[_MasterKey, ...] | None = None
        self.client: httpx.Client | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Runtime:
        return _Runtime()

    def __reduce__(self) -> tuple[type[_Runtime], tuple[()]]:
        return (_Runtime, ())

    def __repr__(self) -> str:
        return "_Runtime()"


def _check_keyring(keyring: str) -> None:
    if not isinstance(keyring, str) or not keyring:
        raise InvalidParameterError("keyring", "must be a non-empty string")


# -- the local vault ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _MasterKey:
    id: str
    key: bytes = field(repr=False)
    created_at: str

    def cipher(self, keyring: str) -> AESGCM:
        info = b"ctrl-vault:" + keyring.encode("utf-8")
        hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info)
        return AESGCM(hkdf.derive(self.key))


def _new_key(key_id: str) -> _MasterKey:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return _MasterKey(id=key_id, key=os.urandom(_KEY_BYTES), created_at=now)


def _dump_keys(keys: tuple[_MasterKey, ...]) -> bytes:
    rows = [
        {"id": k.id, "key": base64.b64encode(k.key).decode("ascii"), "created_at": k.created_at}
        for k in keys
    ]
    return (json.dumps({"keys": rows}, indent=2) + "\n").encode("utf-8")


def _parse_keys(path: Path, raw: bytes) -> tuple[_MasterKey, ...]:
    def bad(why: str) -> VaultKeyFileError:
        return VaultKeyFileError(f"vault master key file {path} is invalid: {why}")

    try:
        rows = json.loads(raw)["keys"]
    except (ValueError, KeyError, TypeError):
        raise bad('expected JSON {"keys": [...]}') from None
    if not isinstance(rows, list) or not rows:
        raise bad("it holds no key")
    keys = []
    for index, row in enumerate(rows):
        try:
            key_id, key = str(row["id"]), base64.b64decode(row["key"], validate=True)
            created_at = str(row.get("created_at", ""))
        except (KeyError, TypeError, AttributeError, binascii.Error):
            raise bad(f"key #{index + 1} needs an id and a base64 key") from None
        if not _KEY_ID.fullmatch(key_id) or len(key) != _KEY_BYTES:
            raise bad(f"key #{index + 1} needs an id [A-Za-z0-9_-] and {_KEY_BYTES} key bytes")
        keys.append(_MasterKey(id=key_id, key=key, created_at=created_at))
    if len({k.id for k in keys}) != len(keys):
        raise bad("two keys share an id")
    return tuple(keys)


def _read_keys(path: Path) -> tuple[_MasterKey, ...]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise VaultKeyFileError(
            f"cannot open vault master key file {path}: {exc.strerror}"
        ) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise VaultKeyFileError(f"vault master key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            # A key readable by others is as good as leaked: refuse it rather than use it.
            raise VaultKeyFileError(
                f"vault master key file {path} has mode {mode:04o}; it must not be accessible "
                f"by group or others (chmod 600 {path})"
            )
        raw = handle.read()
    return _parse_keys(path, raw)


def _write_private_temp(directory: Path, data: bytes) -> str:
    # mkstemp creates the file with O_EXCL and mode 0600; fchmod guards against odd umasks.
    fd, name = tempfile.mkstemp(dir=directory, prefix=".vault-key-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return name


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = _write_private_temp(path.parent, _dump_keys((_new_key("k1"),)))
    try:
        # link() publishes a complete file or fails if another process published first.
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
            _fsync_dir(path.parent)
    finally:
        os.unlink(temp)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _next_key_id(keys: tuple[_MasterKey, ...]) -> str:
    numbers = [int(k.id[1:]) for k in keys if re.fullmatch(r"k\d+", k.id)]
    return f"k{max(numbers, default=0) + 1}"


class LocalVault(Block):
    """AES-256-GCM vault with a local, versioned master key file (created 0600 on first use).

    Args:
        master_key_file: path of the master key file; created with a first key when missing.
    """

    _block_type_name = "Ctrl Local Vault"

    master_key_file: str = Field(description="Path of the master key file (mode 0600).")
    _runtime: _Runtime = PrivateAttr(default_factory=_Runtime)

    def encrypt(self, keyring: str, plaintext: str) -> EncryptResult:
        """Encrypt ``plaintext`` under ``keyring`` with the newest key (random nonce).

        Raises:
            InvalidParameterError: the keyring is empty.
            VaultKeyFileError: the master key file is unsafe or invalid.
        """
        _check_keyring(keyring)
        key = self._keys()[-1]
        nonce = os.urandom(_NONCE_BYTES)
        sealed = key.cipher(keyring).encrypt(nonce, plaintext.encode("utf-8"), keyring.encode())
        data = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
        return EncryptResult(encrypted=f"{_FORMAT}.{key.id}.{data}", key_id=key.id)

    def decrypt(self, keyring: str, encrypted: str) -> str:
        """Decrypt a ciphertext of ``encrypt`` under the same keyring, with any key version.

        Raises:
            VaultDecryptError: malformed, tampered, another keyring's, or an unknown key id.
            VaultKeyFileError: the master key file is unsafe or invalid.
        """
        _check_keyring(keyring)
        key_id, blob = _split_ciphertext(keyring, encrypted)
        key = self._key(key_id, keyring)
        nonce, sealed = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        try:
            plain = key.cipher(keyring).decrypt(nonce, sealed, keyring.encode())
            return plain.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise VaultDecryptError(
                f"cannot decrypt under keyring '{keyring}' with key '{key_id}': the ciphertext "
                "was altered or was made under another keyring"
            ) from None

    def rotate(self) -> str:
        """Add a new key version, which encrypts from now on; older versions still decrypt.

        Returns:
            The new key id.
        """
        path = self._path()
        with self._runtime.lock:
            if not path.exists():
                _create_key_file(path)
            with _exclusive(path):
                keys = _read_keys(path)
                keys = (*keys, _new_key(_next_key_id(keys)))
                temp = _write_private_temp(path.parent, _dump_keys(keys))
                os.replace(temp, path)
                _fsync_dir(path.parent)
            self._runtime.keys = keys
        return keys[-1].id

    def _path(self) -> Path:
        return Path(self.master_key_file).expanduser()

    def _keys(self) -> tuple[_MasterKey, ...]:
        with self._runtime.lock:
            if self._runtime.keys is None:
                path = self._path()
                if not path.exists():
                    _create_key_file(path)
                self._runtime.keys = _read_keys(path)
            return self._runtime.keys

    def _key(self, key_id: str, keyring: str) -> _MasterKey:
        found = {k.id: k for k in self._keys()}.get(key_id)
        if found is None:
            # Another process may have rotated since this one read the file: read it again
            # (never re-create it here: a missing file must not silently become a new key).
            with self._runtime.lock:
                self._runtime.keys = _read_keys(self._path())
                found = {k.id: k for k in self._runtime.keys}.get(key_id)
        if found is None:
            raise VaultDecryptError(
                f"cannot decrypt under keyring '{keyring}': key '{key_id}' is not in the vault "
                f"master key file {self._path()}"
            )
        return found


def _split_ciphertext(keyring: str, encrypted: str) -> tuple[str, bytes]:
    malformed = VaultDecryptError(
        f"cannot decrypt under keyring '{keyring}': not a vault ciphertext "
        f"(expected {_FORMAT}.<key id>.<base64url data>)"
    )
    parts = encrypted.split(".") if isinstance(encrypted, str) else []
    if len(parts) != 3 or parts[0] != _FORMAT or not _KEY_ID.fullmatch(parts[1]):
        raise malformed
    data = parts[2]
    try:
        blob = base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise malformed from None
    if len(blob) < _NONCE_BYTES + _TAG_BYTES:
        raise malformed
    return parts[1], blob


# -- the remote vault --------------------------------------------------------------------------


class RemoteVault(Block):
    """The original's vault service: Connect JSON over HTTP with a bearer token.

    Args:
        url: base URL of the vault service (``https://vault.example``).
        token: bearer token sent as ``Authorization: Bearer <token>``.
        timeout_seconds: timeout of each request (connect, read, write, pool).
    """

    _block_type_name = "Ctrl Remote Vault"

    url: str = Field(description="Base URL of the vault service.")
    token: SecretStr = Field(description="Bearer token of the vault service.")
    timeout_seconds: float = Field(default=10, gt=0, description="Timeout of each request.")
    _runtime: _Runtime = PrivateAttr(default_factory=_Runtime)

    def encrypt(self, keyring: str, plaintext: str) -> EncryptResult:
        """Encrypt ``plaintext`` under ``keyring`` (``POST …/vault.v1.VaultService/Encrypt``).

        Raises:
            VaultRequestError: the vault refused the request (4xx).
            VaultUnavailableError: network error, timeout, 408, 429, 5xx or a malformed reply.
        """
        _check_keyring(keyring)
        body = self._call("Encrypt", keyring, {"keyring": keyring, "data": plaintext})
        # proto3 JSON omits empty fields, so a missing keyId is an empty one.
        encrypted, key_id = body.get("encrypted"), body.get("keyId", "")
        if not isinstance(encrypted, str) or not encrypted or not isinstance(key_id, str):
            raise VaultUnavailableError(
                f"vault Encrypt (keyring '{keyring}') returned no ciphertext"
            )
        return EncryptResult(encrypted=encrypted, key_id=key_id)

    def decrypt(self, keyring: str, encrypted: str) -> str:
        """Decrypt a ciphertext under ``keyring`` (``POST …/vault.v1.VaultService/Decrypt``).

        Raises:
            VaultRequestError: the vault refused the request (4xx).
            VaultUnavailableError: network error, timeout, 408, 429, 5xx or a malformed reply.
        """
        _check_keyring(keyring)
        body = self._call("Decrypt", keyring, {"keyring": keyring, "encrypted": encrypted})
        plaintext = body.get("plaintext", "")  # proto3 JSON omits an empty plaintext
        if not isinstance(plaintext, str):
            raise VaultUnavailableError(
                f"vault Decrypt (keyring '{keyring}') returned no plaintext"
            )
        return plaintext

    def close(self) -> None:
        """Close the HTTP client (a later call opens a new one)."""
        with self._runtime.lock:
            client, self._runtime.client = self._runtime.client, None
        if client is not None:
            client.close()

    def _client(self) -> httpx.Client:
        with self._runtime.lock:
            if self._runtime.client is None:
                self._runtime.client = httpx.Client(
                    base_url=self.url.rstrip("/"), timeout=self.timeout_seconds
                )
            return self._runtime.client

    def _call(self, method: str, keyring: str, payload: dict[str, str]) -> dict[str, Any]:
        what = f"vault {method} (keyring '{keyring}')"
        headers = {
            "Authorization": f"Bearer {self.token.get_secret_value()}",
            "Content-Type": "application/json",
            "Connect-Protocol-Version": "1",
        }
        try:
            response = self._client().post(
                f"/vault.v1.VaultService/{method}", json=payload, headers=headers
            )
        except httpx.TimeoutException:
            raise VaultUnavailableError(
                f"{what} timed out after {self.timeout_seconds:g} s"
            ) from None
        except httpx.UnsupportedProtocol:
            raise VaultRequestError(f"{what}: the vault URL must be http(s)") from None
        except httpx.TransportError as exc:
            # Only a connect error's text is the OS's; others may quote a header (the token).
            detail = f": {exc}" if isinstance(exc, httpx.ConnectError) else ""
            raise VaultUnavailableError(f"{what} failed: {type(exc).__name__}{detail}") from None
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise VaultUnavailableError(f"{what} failed: HTTP {status}{_connect_code(response)}")
        if not 200 <= status < 300:
            raise VaultRequestError(f"{what} refused: HTTP {status}{_connect_code(response)}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise VaultUnavailableError(f"{what} returned HTTP {status} without a JSON object")
        return body


def _connect_code(response: httpx.Response) -> str:
    # Only the Connect error *code* ("unauthenticated"): its message may quote the request.
    try:
        code = response.json().get("code")
    except (ValueError, AttributeError):
        return ""
    return f" ({code})" if isinstance(code, str) and _CONNECT_CODE.fullmatch(code) else ""


def vault_from_settings(settings: Settings) -> LocalVault | RemoteVault:
    """The vault the settings configure: remote when ``UNKEY_VAULT_URL`` is set, else local.

    Raises:
        ConfigError: ``UNKEY_VAULT_URL`` is set without ``UNKEY_VAULT_TOKEN``.
    """
    if settings.vault_url:
        token = settings.vault_token
        if token is None or not token.get_secret_value():
            raise ConfigError(
                f"{env_name('vault_token')} is required when {env_name('vault_url')} is set"
            )
        return RemoteVault(url=settings.vault_url, token=token)
    return LocalVault(master_key_file=str(settings.master_key_path()))
