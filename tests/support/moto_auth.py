"""A moto server that verifies AWS credentials, and a real IAM user's key on it.

The session's moto server (``s3_endpoint``) checks no credentials. In its auth mode
(``INITIAL_NO_AUTH_ACTION_COUNT``: the first three calls create an IAM user, its policy
(allow everything) and its key without authentication; every later call is verified and
checked against IAM) a wrong secret really is
``SignatureDoesNotMatch`` and an unknown key ``InvalidClientTokenId``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3

from tests.support.processes import ReadyProcess
from worker.local_server import free_port

__all__ = ["AuthMoto", "moto_with_auth"]

_ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


@dataclass(frozen=True)
class AuthMoto:
    """A moto server in auth mode.

    Attributes:
        url: its endpoint.
        key_id: the access key id of an IAM user it knows.
        secret: that key's secret.
    """

    url: str
    key_id: str
    secret: str


@contextmanager
def moto_with_auth(directory: Path) -> Iterator[AuthMoto]:
    """Start moto in auth mode with one IAM user; SIGKILL it after.

    Args:
        directory: where its log (``moto.log``) goes.

    Yields:
        The server and the user's key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = ReadyProcess(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        cwd=directory,
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        log_path=directory / "moto.log",
        name="moto (auth mode)",
    )
    url = f"http://127.0.0.1:{port}"
    server.start(f"{url}/moto-api/", timeout=30)
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        iam.create_user(UserName="ctrl-test")
        # moto enforces IAM policies in auth mode: the user may do anything
        iam.put_user_policy(UserName="ctrl-test", PolicyName="all", PolicyDocument=_ALLOW_ALL)
        key = iam.create_access_key(UserName="ctrl-test")["AccessKey"]
        yield AuthMoto(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.kill()
