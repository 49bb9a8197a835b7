"""Step records in S3 (moto server): a call resumed on another host replays its finished steps.

moto is a real S3 HTTP server on loopback; it checks no signatures in this mode, which these
tests do not rely on.
"""

from __future__ import annotations

import asyncio
import uuid

import boto3
import pytest

from tests.support.waits import step_counts
from tests.support.worker_process import WorkerProcess
from worker import client as worker_client

pytestmark = pytest.mark.slow


def test_a_call_resumed_on_another_host_replays_steps_from_s3(
    prefect_api, control_db, s3_endpoint, tmp_path
):
    """Two workers sharing nothing but the Prefect API, the DB and the S3 bucket: a call that
    failed on the first is re-run on the second by idempotency key, and only its failed step
    executes again (the records of the others are read from S3)."""
    bucket = f"ctrl-results-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket=bucket)
    env = {
        "UNKEY_RESULTS_S3_BUCKET": bucket,
        "UNKEY_RESULTS_S3_ENDPOINT_URL": s3_endpoint,
        "UNKEY_RESULTS_S3_ACCESS_KEY_ID": "test",
        "UNKEY_RESULTS_S3_SECRET_ACCESS_KEY": "test-secret-value",
    }
    tag = f"s3-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "fail-once"
    marker.touch()
    params = {"tag": tag, "fail_marker": str(marker)}

    host_a = WorkerProcess(
        prefect_api.url, control_db, tmp_path / "host-a", tmp_path / "a.log", **env
    )
    host_a.start()
    try:
        with pytest.raises(worker_client.FlowRunFailed):
            asyncio.run(
                worker_client.trigger("kernel_three_steps", params, idempotency_key=tag, wait=True)
            )
    finally:
        host_a.stop()

    host_b = WorkerProcess(
        prefect_api.url, control_db, tmp_path / "host-b", tmp_path / "b.log", **env
    )
    host_b.start()
    try:
        result = asyncio.run(
            worker_client.trigger("kernel_three_steps", params, idempotency_key=tag, wait=True)
        )
    finally:
        host_b.stop()
    assert result == ["first-done", "second-done", "third-done"]
    assert step_counts(control_db, tag) == {
        "first": 1,
        "second": 1,
        "third": 2,
    }
    keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert f"results/kernel_three_steps:{tag}:first" in keys
    assert not (tmp_path / "host-a" / "results").exists(), "records must not go to local files"
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert b"test-secret-value" not in body
