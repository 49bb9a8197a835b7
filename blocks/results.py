"""Where step records and flow results live: local files (default) or an S3 bucket.

Replays are decided by the presence of a step's record in result storage, so every worker
that may resume a call must read the same storage: one host can use the local default
(``<state dir>/results``); several hosts need ``UNKEY_RESULTS_S3_BUCKET``.

For S3 the worker saves a prefect-aws ``S3Bucket`` block (with its ``AwsCredentials``) at
startup and makes it Prefect's default result storage for every flow-run process through
``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``; Prefect loads it once per process.
"""

from __future__ import annotations

from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters

from worker.settings import Settings

__all__ = ["RESULTS_BLOCK", "RESULTS_CREDENTIALS_BLOCK", "results_bucket", "save_results_block"]

from worker.prefect_env import RESULTS_BLOCK

RESULTS_CREDENTIALS_BLOCK = "ctrl-results-aws"


def results_bucket(settings: Settings) -> S3Bucket | None:
    """The S3 result storage the settings ask for, or None for local files."""
    if not settings.results_s3_bucket:
        return None
    credentials = AwsCredentials(
        aws_access_key_id=settings.results_s3_access_key_id,
        aws_secret_access_key=settings.results_s3_secret_access_key,
        region_name=settings.results_s3_region,
        aws_client_parameters=AwsClientParameters(endpoint_url=settings.results_s3_endpoint_url),
    )
    return S3Bucket(
        bucket_name=settings.results_s3_bucket,
        credentials=credentials,
        bucket_folder=settings.results_s3_folder,
    )


async def save_results_block(settings: Settings) -> None:
    """Save the S3 blocks when S3 results are configured (idempotent)."""
    bucket = results_bucket(settings)
    if bucket is None:
        return
    await bucket.credentials.asave(RESULTS_CREDENTIALS_BLOCK, overwrite=True)
    await bucket.asave(RESULTS_BLOCK, overwrite=True)
