"""VersioningService: strictly increasing versions per region.

Guarantees: per region the values are 1, 2, 3, ... with no duplicates, whatever the number of
concurrent callers (the increment is one atomic SQL statement), and a step that took a version
returns the same version on replay (a retry or a resumed run never takes a second one). Gaps
appear when a caller takes a version and then fails, as in the original.
Key: ``versioning:region:{region}``. Side effects: the ``take_version`` step (one UPDATE of
``region_versions``). Failure: a bad region is terminal; database errors are retried.
Callers inside other flows use ``tasks.db.versions.take_version`` directly (no flow run per
version).
"""

from __future__ import annotations

from flows.params import Params, Region
from tasks.db.versions import read_version, take_version
from worker.kernel.service import critical_section, parse, service_flow

__all__ = ["get_version", "next_version"]


class RegionParams(Params):
    region: Region


@service_flow("next_version")
async def next_version(region: str) -> int:
    """Take the next version of a region (the first is 1)."""
    params = parse(RegionParams, region=region)
    async with critical_section(f"versioning:region:{params.region}"):
        return take_version(params.region)


@service_flow("get_version")
async def get_version(region: str) -> int:
    """Read a region's current version (0 before the first) without taking one."""
    params = parse(RegionParams, region=region)
    async with critical_section(f"versioning:region:{params.region}"):
        return read_version(params.region)
