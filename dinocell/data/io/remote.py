"""Inputs that may live elsewhere: a local path, an `s3://bucket/key` or an `http(s)://` URL, opened for reading
through smart-open, so that cluster jobs and pods need no shared filesystem for recipes, weights or tables.

S3 signing follows what the machine has: with AWS credentials (environment, ~/.aws, instance role) requests are
signed; without, they are unsigned (anonymous), which is how public buckets such as cellpainting-gallery are read.
`anonymous=True/False` forces either. The endpoint is AWS's unless `endpoint_url` or boto3's own AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL environment variables name another (MinIO, Ceph, a local test server). S3 clients are the dataset
readers' (dinocell.data.io.s3.make_client) with botocore's standard retries switched on.

Large inputs (pretrained weights) are `fetch`ed: downloaded once into a cache directory and read from there, by every
process of the machine (or of every machine that shares the cache directory). The cache is
`$DINOCELL_CACHE_DIR/inputs` (default `~/.cache/dinocell/inputs`); a file at a URL is taken to never change (as
released weights do): delete its cache entry, or the whole directory, to fetch it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

logger = logging.getLogger("dinocell")

REMOTE_PREFIXES = ("s3://", "http://", "https://")
MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
MIB = 1 << 20
CHUNK_BYTES = 16 * MIB
REFUSED = {"AccessDenied", "403", "Forbidden", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(REMOTE_PREFIXES)


def _has_aws_credentials() -> bool:
    import boto3

    return boto3.session.Session().get_credentials() is not None


def open_input(location: str | Path, mode: str = "rb", *, endpoint_url: str | None = None,
               anonymous: bool | None = None) -> IO:
    """Open a local path or a remote URL for reading ("rb" or "r"); the file object is seekable (torch.load needs it).

    Raises FileNotFoundError for a missing object or bucket (HTTP 404) and PermissionError for a refused one (401/403),
    both naming the URL and, for refusals, what to change."""
    if mode not in ("rb", "r"):
        raise ValueError(f"open_input reads only: mode '{mode}' is not 'rb' or 'r'")
    if not is_remote(location):
        return open(location, mode)
    import smart_open

    url = str(location)
    transport: dict = {}
    unsigned = False
    if url.startswith("s3://"):
        from dinocell.data.io.s3 import make_client

        unsigned = not _has_aws_credentials() if anonymous is None else anonymous
        transport["client"] = make_client(endpoint_url, unsigned, max_connections=4, attempts=5)
    try:
        # bytes as stored, as a local open() gives them (smart-open would otherwise decompress .gz/.bz2/... itself)
        return smart_open.open(url, mode, compression="disable", transport_params=transport)
    except OSError as err:
        code = _error_code(err)
        if code in MISSING:
            raise FileNotFoundError(f"{url}: no such object ({code})") from err
        if code in REFUSED:
            how = ("the request was unsigned: set AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                   "AWS_PROFILE) if the object is private" if unsigned
                   else "check the credentials and the object's permissions")
            raise PermissionError(f"{url}: access refused ({code}); {how}") from err
        raise


def _error_code(err: OSError) -> str:
    """The S3 error code or HTTP status behind smart-open's error ('' when there is none)."""
    cause = err.__cause__ or err
    response = getattr(cause, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        error = response.get("Error", {})
        return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    status = getattr(response, "status_code", None)  # requests HTTPError
    return str(status) if status is not None else ""


def cache_dir() -> Path:
    """Where fetched inputs are kept: $DINOCELL_CACHE_DIR/inputs, by default ~/.cache/dinocell/inputs."""
    root = os.environ.get("DINOCELL_CACHE_DIR") or Path.home() / ".cache" / "dinocell"
    return Path(root).expanduser() / "inputs"


def read_text(location: str | Path) -> str:
    """The text of a small input (a config file), read directly."""
    with open_input(location, "r") as f:
        return f.read()


def fetch(location: str | Path, *, endpoint_url: str | None = None, anonymous: bool | None = None) -> Path:
    """A local path holding `location`: the path itself when it is local; for a URL, its copy in the cache, downloaded
    on first use. Processes that share the cache (the ranks of a node) download it once: the first one holds a lock
    while it downloads, the others wait for it and then read its copy. A copy appears only complete (it is written
    under another name, then renamed), so an interrupted download is simply repeated."""
    if not is_remote(location):
        return Path(location)
    url = str(location)
    name = Path(urlsplit(url).path).name or "download"
    target = cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _download(url, target, endpoint_url=endpoint_url, anonymous=anonymous)
    return target


def _download(url: str, target: Path, **options) -> None:
    from dinocell.logging.progress import Progress

    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    logger.info("downloading %s to %s", url, target)
    try:
        with open_input(url, "rb", **options) as source, open(partial, "wb") as out, \
                Progress(None, f"downloading {target.name}", unit="MiB", every_s=10.0) as progress:
            while chunk := source.read(CHUNK_BYTES):
                out.write(chunk)
                progress.update(-(-len(chunk) // MIB))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
