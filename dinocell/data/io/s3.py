"""S3 access for streaming datasets: anonymous or custom-endpoint clients, paginated listing, retried reads.

Every request the datasets make (listings, index downloads, image reads) goes through one retry policy,
`_retrying`. It lives here rather than in botocore because botocore does not retry a body that breaks off mid-stream,
which is the common failure when thousands of large objects are in flight; botocore's own retries are therefore off.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import boto3
import botocore.exceptions as bce
from botocore import UNSIGNED
from botocore.config import Config

from dinocell.data.io.bad_files import BadFileError
from dinocell.errors import UserError

T = TypeVar("T")

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


class S3AccessError(UserError, OSError):
    """A bucket that cannot be listed (endpoint unreachable, no such bucket, access denied, no credentials): the
    dataset cannot be built. The message is one line naming the endpoint, the location and what to check."""


class _GaveUp(Exception):
    """A request that failed for good: `error` is the last botocore error, `attempts` how many were made."""

    def __init__(self, error: Exception, attempts: int) -> None:
        super().__init__(f"{attempts} attempt{'s' * (attempts > 1)}, last: {type(error).__name__}: {error}")
        self.error, self.attempts = error, attempts


def _error_code(error: bce.ClientError) -> tuple[str, str]:
    """(S3 error code, HTTP status) of a ClientError, as strings."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code, status


def _retrying(request: Callable[[], T], retries: int, base_delay_s: float) -> T:
    """`request()`, repeated on throttling, 5xx, timeouts, refused or dropped connections and broken streams, with
    exponential back-off (base_delay_s * 2**attempt, +-50% jitter, at most 20 s). Other errors (404, 403, no
    credentials) are not retried. Raises _GaveUp with the last error."""
    for attempt in range(retries + 1):
        try:
            return request()
        except bce.ClientError as error:
            if not RETRYABLE_CODES.intersection(_error_code(error)):
                raise _GaveUp(error, attempt + 1) from error
            last: Exception = error
        except TRANSIENT_ERRORS as error:
            last = error
        except bce.BotoCoreError as error:  # e.g. NoCredentialsError, an invalid endpoint URL
            raise _GaveUp(error, attempt + 1) from error
        if attempt < retries:
            time.sleep(min(20.0, base_delay_s * 2**attempt) * random.uniform(0.5, 1.5))
    raise _GaveUp(last, retries + 1) from last


def make_client(endpoint_url: str | None, anonymous: bool, max_connections: int, timeout_s: float = 30.0,
                attempts: int = 1):
    """A boto3 S3 client; anonymous = unsigned requests (public buckets such as cellpainting-gallery).
    `attempts` > 1 lets botocore retry, for callers that stream through another library (smart-open); the datasets'
    own requests keep 1 and are retried by _retrying."""
    config = Config(
        signature_version=UNSIGNED if anonymous else None,
        max_pool_connections=max_connections,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config, region_name="us-east-1")


def _listing_hint(error: Exception) -> str:
    """What to check, given why a listing failed."""
    if isinstance(error, bce.NoCredentialsError):
        return "no AWS credentials found: configure them (aws configure, AWS_* variables) or use anonymous=true"
    if isinstance(error, bce.ClientError):
        code, status = _error_code(error)
        if code == "NoSuchBucket":
            return "the bucket does not exist at this endpoint: check the bucket name and endpoint_url"
        if code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status in (
            "401", "403",
        ):  # fmt: skip
            return "access denied: check the credentials, or anonymous=true|false for a public|private bucket"
    return "check endpoint_url, the network (proxy, firewall, VPN) and that the endpoint is up"


def _list_pages(client, bucket: str, retries: int, base_delay_s: float, **kwargs) -> list[dict]:
    """Every ListObjectsV2 page under kwargs (Prefix, Delimiter), each page request retried on its own."""
    pages, token = [], None
    while True:
        args = {"Bucket": bucket, **kwargs, **({"ContinuationToken": token} if token else {})}
        try:
            page = _retrying(lambda args=args: client.list_objects_v2(**args), retries, base_delay_s)
        except _GaveUp as failure:
            endpoint = getattr(getattr(client, "meta", None), "endpoint_url", "the default AWS endpoint")
            raise S3AccessError(
                f"cannot list s3://{bucket}/{kwargs.get('Prefix', '')} at S3 endpoint {endpoint} ({failure}); "
                f"{_listing_hint(failure.error)}"
            ) from None
        pages.append(page)
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return pages


def list_keys(client, bucket: str, prefix: str, retries: int = 5, base_delay_s: float = 0.2) -> list[str]:
    """All object keys under `prefix` (paginated: a plate folder can hold more than 1000 objects)."""
    pages = _list_pages(client, bucket, retries, base_delay_s, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def list_folders(client, bucket: str, prefix: str, retries: int = 5, base_delay_s: float = 0.2) -> list[str]:
    """Immediate sub-folder names under `prefix` (which should end with '/')."""
    pages = _list_pages(client, bucket, retries, base_delay_s, Prefix=prefix, Delimiter="/")
    return [p["Prefix"][len(prefix) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]


def get_bytes(client, bucket: str, key: str, retries: int = 5, base_delay_s: float = 0.2) -> bytes:
    """Fetch one object with the retry policy of `_retrying`. Raises BadFileError('missing') for a 404 and
    BadFileError('unreachable') for any other failure (so one bad object is skipped and counted, not a crash)."""
    url = f"s3://{bucket}/{key}"
    try:
        return _retrying(lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(), retries, base_delay_s)
    except _GaveUp as failure:
        error = failure.error
        if isinstance(error, bce.ClientError):
            code, status = _error_code(error)
            if code in MISSING_CODES or status == "404":
                raise BadFileError("missing", url) from error
            if failure.attempts == 1:  # e.g. 403: not retried
                raise BadFileError("unreachable", url, f"{code or status}: {error}") from error
        raise BadFileError("unreachable", url, str(failure)) from error
