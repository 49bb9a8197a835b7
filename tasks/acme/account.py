"""The one global ACME account (reference §6.2): loaded, or created and registered once.

Guarantees:

- One account, even when many first issuances race (SPEC §4: "created once even under
  concurrent first use"). ``acme_users.workspace_id`` has no unique constraint (kept from the
  original schema, so the worker runs on an existing Unkey database), so the database cannot
  refuse a second row. Check-then-create therefore runs under the per-key lock
  ``certificate:acme-account`` (``worker.kernel.locks.key_lock``): one Prefect concurrency
  slot shared by every worker process and machine, with a lease, so a holder killed mid-way
  frees it within the lease. The fast path (an account that is registered already) reads
  without the lock.
- Resumable: the row is inserted before registration, and an existing row without a
  ``registration_uri`` is registered on the next use with its stored key. The CA answers a
  second registration of the same key with the existing account's URL, so a crash between
  registration and recording its URL never makes a second account.

Security: the account key (an ECDSA P-256 key, PEM ``EC PRIVATE KEY`` as the original stores
it) is only persisted encrypted with the vault keyring ``acme``; ``AcmeAccount``'s repr leaves
it out. It is never logged, returned from a step or put into an exception.

Error handling: the vault's and the database's errors pass through (their own kinds); ACME
failures are turned into the worker's tree by ``tasks.acme.errors.classify``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import josepy as jose
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from blocks.vault import Vault, vault_from_settings
from tasks.acme.client import build_client
from tasks.acme.errors import classify
from tasks.db import acme as acme_db
from worker.kernel.clock import new_id
from worker.kernel.locks import key_lock
from worker.settings import Settings, worker_settings

__all__ = [
    "ACCOUNT_KEYRING",
    "ACCOUNT_LOCK_KEY",
    "ACCOUNT_WORKSPACE",
    "AcmeAccount",
    "account_email",
    "ensure_account",
]

ACCOUNT_WORKSPACE = "acme"
"""``acme_users.workspace_id`` of the global account (the original's ``WorkspaceID``)."""
ACCOUNT_KEYRING = "acme"
"""The vault keyring the account key is encrypted with."""
ACCOUNT_LOCK_KEY = "certificate:acme-account"
"""The per-key lock around check-then-create."""


@dataclass(frozen=True)
class AcmeAccount:
    """The registered account: its row id, its URL at the CA, and its key (secret).

    Attributes:
        id: the ``acme_users`` id.
        registration_uri: the account URL.
        key: the account key (kept out of the repr).
    """

    id: str
    registration_uri: str
    key: jose.JWKEC = field(repr=False)

    def client(self, settings: Settings | None = None) -> acme_client.ClientV2:
        """A client for the configured CA that signs as this account.

        Args:
            settings: the worker settings (default: this process's).

        Returns:
            The client.

        Raises:
            RetryableError | TerminalError: the CA's directory could not be fetched.
        """
        try:
            return build_client(settings or worker_settings(), self.key, self.registration_uri)
        except Exception as exc:
            raise classify(exc) from None


def account_email(settings: Settings) -> str:
    """The account's contact: ``acme@<UNKEY_ACME_EMAIL_DOMAIN>``."""
    return f"acme@{settings.acme_email_domain}"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # "EC PRIVATE KEY", as the original
        serialization.NoEncryption(),
    ).decode()


def _load_key(vault: Vault, row: acme_db.AcmeUserRow) -> jose.JWKEC:
    pem = vault.decrypt(ACCOUNT_KEYRING, row.encrypted_key)
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"acme account '{row.id}': the stored key is not an EC key")
    return jose.JWKEC(key=key)


def _register(settings: Settings, user_id: str, key: jose.JWKEC) -> str:
    """Register ``key`` at the CA (TOS agreed) and record the account URL; return it."""
    try:
        client = build_client(settings, key)
        registration = messages.NewRegistration.from_data(
            email=account_email(settings), terms_of_service_agreed=True
        )
        try:
            uri = client.new_account(registration).uri
        except acme_errors.ConflictError as existing:
            # The key is registered already (a crash after registering): that account.
            uri = existing.location
    except Exception as exc:
        raise classify(exc) from None
    acme_db.set_registration_uri(user_id, str(uri))
    return str(uri)


def _load_or_create(settings: Settings, vault: Vault) -> AcmeAccount:
    """Check-then-create; the caller holds ``ACCOUNT_LOCK_KEY``."""
    row = acme_db.find_acme_user(ACCOUNT_WORKSPACE)
    if row is None:
        private_key = ec.generate_private_key(ec.SECP256R1())
        encrypted = vault.encrypt(ACCOUNT_KEYRING, _key_pem(private_key)).encrypted
        user_id = new_id("acme")
        acme_db.insert_acme_user(user_id, ACCOUNT_WORKSPACE, encrypted)
        key = jose.JWKEC(key=private_key)
    else:
        user_id, key = row.id, _load_key(vault, row)
        if row.registration_uri:
            return AcmeAccount(user_id, row.registration_uri, key)
    return AcmeAccount(user_id, _register(settings, user_id, key), key)


async def ensure_account(
    settings: Settings | None = None, vault: Vault | None = None
) -> AcmeAccount:
    """The global ACME account: the stored one, or a new one created and registered once.

    Args:
        settings: the worker settings (default: this process's).
        vault: the vault (default: the one the settings configure).

    Returns:
        The registered account.

    Raises:
        RetryableError | TerminalError: the CA refused or failed the registration (classified),
            or the vault failed.
        KeyLostError: the account lock's lease was lost while creating the account.
    """
    settings = settings or worker_settings()
    vault = vault or vault_from_settings(settings)
    row = await asyncio.to_thread(acme_db.find_acme_user, ACCOUNT_WORKSPACE)
    if row is not None and row.registration_uri:
        key = await asyncio.to_thread(_load_key, vault, row)
        return AcmeAccount(row.id, row.registration_uri, key)
    async with key_lock(ACCOUNT_LOCK_KEY):
        return await asyncio.to_thread(_load_or_create, settings, vault)
