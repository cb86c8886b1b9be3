"""Test helpers: a small cellpainting-gallery-like tree (on disk and in a local moto S3 server) and a faulty proxy.

The tree has what real JUMP data has: two sources with different channel orders and file naming (Phenix csv index
with PathName columns; Yokogawa-style names with a parquet index using URL columns and numeric sites), illumination
functions, a selected-channel-only brightfield column, and three bad files (missing, corrupt, zero-filled). Pixel
values encode the stain: stain i (in STAINS order) has values in [10000*(i+1), 10000*(i+1)+5000), all above 8 bits.

Also used by scripts/bench_s3.py (which adds this folder to sys.path).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

BUCKET = "cellpainting-gallery"
PREFIX = "cpg0016-jump"
STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")
PHENIX_ORDER = ("Mito", "AGP", "RNA", "ER", "DNA")  # source_4: ch1..ch5
S4 = ("source_4", "2021_04_26_Batch1", "BR00117035")
S2 = ("source_2", "20210607_Batch_2", "1053601756")


@dataclass
class Gallery:
    """What the generated tree contains: good fields' planes by stain, bad fields by reason."""

    root: Path
    fields: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    illum: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # plate key -> stain -> illum function


def plane(key: str, stain: str, size: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{key}/{stain}".encode()))
    return (10000 * (STAINS.index(stain) + 1) + rng.integers(0, 5000, (size, size))).astype(np.uint16)


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def make_gallery(root: Path, size: int = 24) -> Gallery:
    """Write the tree under `root` (root = bucket root, holding cpg0016-jump/...)."""
    gallery = Gallery(root)
    _phenix_source(gallery, size)
    _yokogawa_source(gallery, size - 4)
    return gallery


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _phenix_source(gallery: Gallery, size: int) -> None:
    source, batch, plate = S4
    folder = f"{PREFIX}/{source}/images/{batch}/images/{plate}__2021-05-02T16_02_51-Measurement1/Images"
    rows = []
    for col, well in ((1, "A01"), (2, "A02")):
        for site in (1, 2):
            key = f"{source}/{batch}/{plate}/{well}/{site}"
            row = {"Metadata_Source": source, "Metadata_Batch": batch, "Metadata_Plate": plate,
                   "Metadata_Well": well, "Metadata_Site": str(site)}  # fmt: skip
            planes = {}
            for ch, stain in enumerate(PHENIX_ORDER, start=1):
                name = f"r01c{col:02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff"
                row[f"FileName_Orig{stain}"] = name
                row[f"PathName_Orig{stain}"] = f"s3://{BUCKET}/{folder}/"
                planes[stain] = plane(key, stain, size)
                if key.endswith("A02/2") and stain == "DNA":
                    gallery.bad[key] = "missing"  # listed in the index, never uploaded
                    continue
                _write(gallery.root / folder / name, tiff_bytes(planes[stain]))
            row["FileName_OrigBrightfield"] = f"r01c{col:02d}f{site:02d}p01-ch6sk1fk1fl1.tiff"  # never written
            row["PathName_OrigBrightfield"] = f"s3://{BUCKET}/{folder}/"
            rows.append(row)
            if key not in gallery.bad:
                gallery.fields[key] = planes
    index = gallery.root / PREFIX / source / "workspace" / "load_data_csv" / batch / plate / "load_data.csv"
    index.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(index, index=False)


def _yokogawa_source(gallery: Gallery, size: int) -> None:
    source, batch, plate = S2
    folder = f"{PREFIX}/{source}/images/{batch}/images/{plate}"
    rows = []
    for well in ("A01", "A02"):
        for site in (1, 2):
            key = f"{source}/{batch}/{plate}/{well}/{site}"
            row: dict[str, object] = {"Metadata_Source": source, "Metadata_Batch": batch, "Metadata_Plate": plate,
                                      "Metadata_Well": well, "Metadata_Site": site}  # fmt: skip
            planes = {}
            for ch, stain in enumerate(STAINS, start=1):
                name = f"{plate}_{well}_T0001F{site:03d}L01A{ch:02d}Z01C{ch:02d}.tif"
                row[f"URL_Orig{stain}"] = f"s3://{BUCKET}/{folder}/{name}"
                planes[stain] = plane(key, stain, size)
                data = tiff_bytes(planes[stain])
                if key.endswith("A02/1") and stain == "RNA":
                    gallery.bad[key] = "undecodable"
                    data = b"II*\x00" + bytes(range(256)) * (len(data) // 256)
                elif key.endswith("A02/2") and stain == "AGP":
                    gallery.bad[key] = "zero_filled"
                    data = bytes(len(data))
                _write(gallery.root / folder / name, data)
            rows.append(row)
            if key not in gallery.bad:
                gallery.fields[key] = planes
    illum_dir = gallery.root / PREFIX / source / "images" / batch / "illum" / plate
    illum_dir.mkdir(parents=True, exist_ok=True)
    gallery.illum[plate] = {}
    for i, stain in enumerate(STAINS):
        function = np.linspace(0.5 + 0.1 * i, 1.5, size * size, dtype=np.float32).reshape(size, size)
        np.save(illum_dir / f"{plate}_Illum{stain}.npy", function)
        gallery.illum[plate][stain] = function
    index = gallery.root / PREFIX / source / "workspace" / "load_data_csv" / batch / plate
    index.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(index / "load_data_with_illum.parquet")


# -- S3 ------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moto_server_binary() -> str | None:
    local = Path(sys.executable).parent / "moto_server"
    return str(local) if local.exists() else shutil.which("moto_server")


class MotoServer:
    """`moto_server` on a free 127.0.0.1 port, as a context manager; `endpoint` is its URL."""

    def __init__(self) -> None:
        binary = moto_server_binary()
        if binary is None:
            raise FileNotFoundError("moto_server not found (pip install 'moto[server]')")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise RuntimeError(f"moto_server did not start on port {self.port}") from None
                time.sleep(0.1)

    def signed_client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
        )  # fmt: skip

    def publish(self, root: Path, bucket: str = BUCKET) -> None:
        """Create a public-read bucket holding every file under `root` (keys = paths relative to root)."""
        client = self.signed_client()
        client.create_bucket(Bucket=bucket)
        policy = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}  # fmt: skip
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.put_object(Bucket=bucket, Key=path.relative_to(root).as_posix(), Body=path.read_bytes())

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up waiting (the read-timeout tests make them) is expected: no traceback for it."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultyProxy:
    """HTTP proxy in front of an S3 endpoint, to test retries and measure latency hiding: adds `delay_s` to every
    request, answers the first `fail_first` object GETs and the first `fail_listings` listings (ListObjectsV2, a GET
    with a query string) with 503 SlowDown, and closes the connection without an answer on the next `drop_listings`
    listings. `failed` counts object faults, `listing_faults` listing faults (both kinds)."""

    def __init__(
        self, upstream_port: int, delay_s: float = 0.0, fail_first: int = 0, fail_listings: int = 0,
        drop_listings: int = 0,
    ) -> None:  # fmt: skip
        self.delay_s, self.fail_first, self.failed, self.requests = delay_s, fail_first, 0, 0
        self.fail_listings, self.drop_listings, self.listing_faults = fail_listings, drop_listings, 0
        self.lock = threading.Lock()
        proxy = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._relay()

            def do_HEAD(self) -> None:
                self._relay()

            def _relay(self) -> None:
                with proxy.lock:
                    proxy.requests += 1  # counted on arrival, so a client that gave up waiting is counted too
                time.sleep(proxy.delay_s)
                with proxy.lock:
                    if "?" in self.path:  # a listing
                        fault = proxy.listing_faults
                        fail = fault < proxy.fail_listings
                        drop = not fail and fault < proxy.fail_listings + proxy.drop_listings
                        proxy.listing_faults += fail or drop
                    else:
                        fail, drop = proxy.failed < proxy.fail_first, False
                        proxy.failed += fail
                if drop:  # a connection that breaks before any answer
                    self.close_connection = True
                    return
                if fail:
                    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if getattr(local, "conn", None) is None:
                    local.conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                local.conn.request(self.command, self.path, headers=headers)
                response = local.conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no credential probing of a metadata service in tests
