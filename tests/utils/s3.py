"""A real S3 endpoint for tests: moto's standalone server in a child process, and a bucket per test.

The server is a separate process (not ``mock_aws`` in this one) so that everything a test starts,
worker processes included, reaches the same objects over real HTTP.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from tests.utils.server import free_port

ACCESS_KEY_ID = "test"
SECRET_ACCESS_KEY = "test"
REGION = "us-east-1"
PREFIX = "zoofit"


@contextmanager
def moto_server(log: Path, timeout: float = 60.0) -> Iterator[str]:
    """Start ``moto.server`` on a free loopback port; yields its endpoint URL, stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {url} in {timeout:.0f} s") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@lru_cache
def s3_client(endpoint_url: str):  # -> botocore client (untyped)
    """A plain boto3 client for the test server (to make buckets and look behind the store's back)."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
    )


def new_bucket(endpoint_url: str) -> str:
    """A fresh, empty bucket with a unique name."""
    name = f"zoofit-test-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint_url).create_bucket(Bucket=name)
    return name


def drop_bucket(endpoint_url: str, bucket: str) -> None:
    """Remove the bucket and everything in it (a missing bucket is no error)."""
    client = s3_client(endpoint_url)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        pass


def bucket_keys(endpoint_url: str, bucket: str, prefix: str = "") -> list[str]:
    """Every key in the bucket under ``prefix``, as the bucket has them (not relative to the store)."""
    client = s3_client(endpoint_url)
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def s3_env(endpoint_url: str, bucket: str, prefix: str = PREFIX) -> dict[str, str]:
    """The ``ZOOFIT_*`` variables that point a zoofit process at ``s3://bucket/prefix`` on the server."""
    return {
        "ZOOFIT_STORAGE_URL": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
        "ZOOFIT_S3_ENDPOINT_URL": endpoint_url,
        "ZOOFIT_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "ZOOFIT_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "ZOOFIT_S3_REGION": REGION,
    }


def settings_kwargs(env: dict[str, str]) -> dict[str, str]:
    """``env`` as keyword arguments of the ``make_settings`` fixture (``ZOOFIT_S3_REGION`` -> ``s3_region``)."""
    return {k.removeprefix("ZOOFIT_").lower(): v for k, v in env.items()}
