"""ACME for the CertificateService: the global account, the protocol primitives, the errors.

- ``tasks.acme.account``: ``ensure_account`` (one account, created once under concurrency).
- ``tasks.acme.client``: ``build_client`` and the issuance primitives the flow journals.
- ``tasks.acme.errors``: ``classify`` and the errors it returns.

The SQL is in ``tasks.db.acme``.
"""

from __future__ import annotations

from tasks.acme.account import AcmeAccount, ensure_account
from tasks.acme.client import (
    answer,
    build_client,
    certificate_not_after,
    dns01_challenge,
    fetch_order,
    finalize,
    http01_challenge,
    new_order,
    new_private_key_and_csr,
    wait_valid,
)
from tasks.acme.errors import AcmeRefused, AuthorizationInvalid, RateLimited, classify

__all__ = [
    "AcmeAccount",
    "AcmeRefused",
    "AuthorizationInvalid",
    "RateLimited",
    "answer",
    "build_client",
    "certificate_not_after",
    "classify",
    "dns01_challenge",
    "ensure_account",
    "fetch_order",
    "finalize",
    "http01_challenge",
    "new_order",
    "new_private_key_and_csr",
    "wait_valid",
]
