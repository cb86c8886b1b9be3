"""S3 access for streaming datasets: anonymous or custom-endpoint clients, paginated listing, retried reads.

Retries are done here rather than by botocore because botocore does not retry a body that breaks off mid-stream,
which is the common failure when thousands of large objects are in flight.
"""

from __future__ import annotations

import random
import time

import boto3
import botocore.exceptions as bce
from botocore import UNSIGNED
from botocore.config import Config

from dinocell.data.io.bad_files import BadFileError

RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestTimeout", "InternalError", "ServiceUnavailable", "500", "502", "503", "504",
}  # fmt: skip
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# HTTPClientError covers read timeouts and connections closed mid-response (botocore's ConnectionError only covers
# failures to connect); TimeoutError/ConnectionError are what a body read can raise from the socket itself.
TRANSIENT_ERRORS = (
    bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, bce.ResponseStreamingError,
    ConnectionError, TimeoutError,
)  # fmt: skip


def make_client(endpoint_url: str | None, anonymous: bool, max_connections: int, timeout_s: float = 30.0,
                attempts: int = 1):
    """A boto3 S3 client; anonymous = unsigned requests (public buckets such as cellpainting-gallery).
    `attempts` > 1 lets botocore retry (for callers that stream through another library rather than get_bytes)."""
    config = Config(
        signature_version=UNSIGNED if anonymous else None,
        max_pool_connections=max_connections,
        retries={"total_max_attempts": attempts, "mode": "standard"},  # 1: retried by get_bytes with back-off
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config, region_name="us-east-1")


def list_keys(client, bucket: str, prefix: str) -> list[str]:
    """All object keys under `prefix` (paginated: a plate folder can hold more than 1000 objects)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def list_folders(client, bucket: str, prefix: str) -> list[str]:
    """Immediate sub-folder names under `prefix` (which should end with '/')."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    return [p["Prefix"][len(prefix) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]


def get_bytes(client, bucket: str, key: str, retries: int = 5, base_delay_s: float = 0.2) -> bytes:
    """Fetch one object; throttling, 5xx, timeouts and broken streams are retried with exponential back-off
    (base_delay_s * 2**attempt, +-50% jitter, at most 20 s). Raises BadFileError(missing|unreachable)."""
    url = f"s3://{bucket}/{key}"
    for attempt in range(retries + 1):
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except bce.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in MISSING_CODES or status == "404":
                raise BadFileError("missing", url) from error
            if code not in RETRYABLE_CODES and status not in RETRYABLE_CODES:  # e.g. 403: no point in retrying
                raise BadFileError("unreachable", url, f"{code or status}: {error}") from error
            last: Exception = error
        except TRANSIENT_ERRORS as error:
            last = error
        if attempt < retries:
            time.sleep(min(20.0, base_delay_s * 2**attempt) * random.uniform(0.5, 1.5))
    raise BadFileError("unreachable", url, f"{retries + 1} attempts, last: {type(last).__name__}: {last}")
