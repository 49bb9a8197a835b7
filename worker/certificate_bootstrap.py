"""Startup bootstrap of the platform wildcard certificates (reference §1.2, the worker of the
``cabc2949a9`` era).

When ACME and Route53 (DNS-01) are enabled, the worker makes sure ``*.{UNKEY_DEFAULT_DOMAIN}``
and, when ``UNKEY_REGIONAL_APEX_DOMAIN`` is set, ``*.{region}.{apex}`` for each of
``UNKEY_AVAILABLE_REGIONS`` have a custom domain (workspace ``unkey_internal``, DNS-01) and a
``waiting`` challenge (created once, also with several workers starting together), then sends
the renewal sweep once per day (idempotency key ``cert-renewal-startup-<date>``), which issues
the waiting ones. A failure here is logged and never stops the worker: the daily cron picks
the rows up later.
"""

from __future__ import annotations

import asyncio
import logging

from tasks.db.renewals import ensure_platform_domain
from worker.kernel.clock import now
from worker.settings import Settings

__all__ = ["bootstrap_certificates", "platform_wildcards"]

log = logging.getLogger("ctrl.worker.certificates")


def platform_wildcards(settings: Settings) -> list[str]:
    """The platform's wildcard domains (empty unless ACME and Route53 are enabled).

    Args:
        settings: the worker's settings.

    Returns:
        ``*.{default}``, then ``*.{region}.{regional apex}`` per region when the apex is set.
    """
    if not (settings.acme_enabled and settings.acme_route53_enabled):
        return []
    domains = [f"*.{settings.default_domain}"] if settings.default_domain else []
    if settings.regional_apex_domain:
        domains += [
            f"*.{region}.{settings.regional_apex_domain}" for region in settings.available_regions
        ]
    return domains


async def bootstrap_certificates(settings: Settings) -> str | None:
    """Ensure the platform wildcards' rows and send today's startup sweep; never raises.

    Args:
        settings: the worker's settings.

    Returns:
        The sweep's flow run id, or None when nothing was sent (disabled, or a failure,
        which is logged).
    """
    domains = platform_wildcards(settings)
    if not domains:
        return None
    try:
        for domain in domains:
            if await asyncio.to_thread(ensure_platform_domain, domain):
                log.info("bootstrapped the platform certificate %s (challenge waiting)", domain)
        from worker.client import trigger

        run_id = await trigger(
            "renew_expiring_certificates",
            {},
            idempotency_key=f"cert-renewal-startup-{now():%Y-%m-%d}",
        )
    except Exception:
        log.exception("bootstrapping the platform certificates failed (the daily sweep retries)")
        return None
    return str(run_id)
