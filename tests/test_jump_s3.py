"""JUMP Cell Painting streamed anonymously from a real S3 API (a local moto server holding the gallery-like tree)."""

from __future__ import annotations

import pytest
import torch
from s3_server import BUCKET, PREFIX, S2, S4, FaultyProxy, MotoServer, free_port, make_gallery, moto_server_binary
from test_ct import RECIPES, TINY_RUN

from dinocell.data import make_dataset
from dinocell.data.datasets.jump import JUMPCellPaintingMultiView, JUMPS3MultiView
from dinocell.data.io.bad_files import BadFileError
from dinocell.data.io.s3 import S3AccessError, _list_pages, get_bytes, list_keys, make_client

if moto_server_binary() is None:
    pytest.skip("moto_server is not installed (pip install 'moto[server]'): S3 streaming tests skipped",
                allow_module_level=True)  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    gallery = make_gallery(tmp_path_factory.mktemp("gallery"))
    with MotoServer() as server:
        server.publish(gallery.root)
        yield server, gallery


def test_s3_and_local_give_identical_fields(s3):
    server, gallery = s3
    remote = make_dataset(f"JUMPS3MultiView:endpoint_url={server.endpoint}:normalization=none:concurrency=4")
    local = JUMPCellPaintingMultiView(root=gallery.root, normalization="none")
    assert [f.key for f in remote.fields] == [f.key for f in local.fields] and len(remote) == 8
    remote_samples, local_samples = remote.__getitems__(list(range(8))), local.__getitems__(list(range(8)))
    for a, b in zip(remote_samples, local_samples):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
    for sample in remote_samples:  # right stain in the right channel, 16-bit values intact
        for channel, planes in enumerate(gallery.fields[sample["id"]][s] for s in ("DNA", "ER", "RNA", "AGP", "Mito")):
            assert torch.equal(sample["image"][channel], torch.from_numpy(planes.astype("float32")))
    assert remote.bad_sample_counts() == local.bad_sample_counts()
    assert remote.bad_sample_counts()["missing"] == 1 and remote.bad_sample_counts()["total"] == 3


def test_filters_and_disk_cache(s3, tmp_path):
    server, gallery = s3
    ds = JUMPS3MultiView(
        endpoint_url=server.endpoint, sources=["source_4"], batches=[S4[1]], plates=[S4[2]], channels=["ER"],
        disk_cache=tmp_path, normalization="none",
    )  # fmt: skip
    assert [f.key.split("/")[0] for f in ds.fields] == ["source_4"] * 4
    ds[0]
    cached = list(tmp_path.rglob("*.tiff"))
    assert len(cached) == 1
    assert cached[0].read_bytes() == (gallery.root / cached[0].relative_to(tmp_path / BUCKET)).read_bytes()
    with pytest.raises(FileNotFoundError, match="no fields found"):
        JUMPS3MultiView(endpoint_url=server.endpoint, sources=["source_2"], plates=["nope"])


def test_throttling_is_retried(s3):
    server, gallery = s3
    with FaultyProxy(server.port, fail_first=2) as proxy:
        ds = JUMPS3MultiView(endpoint_url=proxy.endpoint, sources=["source_2"], channels=["DNA"], normalization="none")
        sample = ds[0]
        assert proxy.failed == 2  # the index and the first image got 503 SlowDown first
    assert sample["id"] == "/".join((*S2, "A01", "1"))
    assert torch.equal(sample["image"][0], torch.from_numpy(gallery.fields[sample["id"]]["DNA"].astype("float32")))
    assert ds.bad_sample_counts()["total"] == 0


def test_persistent_failures_become_unreachable_and_404_is_missing(s3):
    server, _ = s3
    with FaultyProxy(server.port, fail_first=1000) as proxy:
        client = make_client(proxy.endpoint, anonymous=True, max_connections=2)
        with pytest.raises(BadFileError) as info:
            get_bytes(client, BUCKET, f"{PREFIX}/anything.tif", retries=2, base_delay_s=0.01)
        assert info.value.reason == "unreachable" and proxy.failed == 3
    with pytest.raises(BadFileError) as info:
        get_bytes(make_client(server.endpoint, True, 2), BUCKET, f"{PREFIX}/does/not/exist.tif")
    assert info.value.reason == "missing"


def test_access_denied_is_an_unreachable_file_without_retries():
    """S3 answers 403 for a key the caller may not read (or, without list rights, for a missing one): counted as a
    bad file at once, never a crash of the loader."""
    from botocore.exceptions import ClientError

    class Denying:
        calls = 0

        def get_object(self, **_):
            Denying.calls += 1
            raise ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get")

    with pytest.raises(BadFileError, match="AccessDenied") as info:
        get_bytes(Denying(), BUCKET, f"{PREFIX}/private.tif", retries=3, base_delay_s=0.01)
    assert info.value.reason == "unreachable" and Denying.calls == 1


def test_read_timeouts_are_retried_then_unreachable(s3):
    """A server that answers too slowly is retried like a 503 (botocore's ReadTimeoutError is no ConnectionError)."""
    server, _ = s3
    with FaultyProxy(server.port, delay_s=0.5) as proxy:
        client = make_client(proxy.endpoint, anonymous=True, max_connections=2, timeout_s=0.1)
        with pytest.raises(BadFileError, match="ReadTimeoutError") as info:
            get_bytes(client, BUCKET, f"{PREFIX}/anything.tif", retries=2, base_delay_s=0.01)
        assert info.value.reason == "unreachable" and proxy.requests == 3



def test_listings_are_retried_on_throttling_and_dropped_connections(s3):
    """ListObjectsV2 goes through the same retry policy as object reads: a 503 SlowDown and a connection closed
    without an answer during the listing cost a retry each, not the dataset."""
    server, gallery = s3
    with FaultyProxy(server.port, fail_listings=1, drop_listings=1) as proxy:
        ds = JUMPS3MultiView(endpoint_url=proxy.endpoint, normalization="none")  # lists sources, then index files
        assert proxy.listing_faults == 2 and proxy.failed == 0
    assert [f.key for f in ds.fields] == [f.key for f in JUMPCellPaintingMultiView(root=gallery.root).fields]


def test_every_listing_page_is_retried(s3):
    """Pagination is done page by page, each page request with its own retries: all keys arrive once, in order."""
    server, gallery = s3
    expected = sorted(p.relative_to(gallery.root).as_posix() for p in gallery.root.rglob("*") if p.is_file())
    with FaultyProxy(server.port, fail_listings=2, drop_listings=2) as proxy:
        client = make_client(proxy.endpoint, anonymous=True, max_connections=2)
        pages = _list_pages(client, BUCKET, retries=4, base_delay_s=0.01, Prefix=f"{PREFIX}/", MaxKeys=7)
        assert proxy.listing_faults == 4
    assert len(pages) == -(-len(expected) // 7) > 2
    assert [item["Key"] for page in pages for item in page["Contents"]] == expected


def test_a_listing_that_keeps_failing_is_one_line_naming_endpoint_and_prefix(s3):
    server, _ = s3
    with FaultyProxy(server.port, fail_listings=1000) as proxy:
        client = make_client(proxy.endpoint, anonymous=True, max_connections=2)
        with pytest.raises(S3AccessError) as info:
            list_keys(client, BUCKET, f"{PREFIX}/source_4/", retries=2, base_delay_s=0.01)
        assert proxy.listing_faults == 3
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"cannot list s3://{BUCKET}/{PREFIX}/source_4/ at S3 endpoint {proxy.endpoint} (3 attempts, last: ClientError"
    )
    assert "SlowDown" in message and message.endswith("check endpoint_url, the network (proxy, firewall, VPN) and "
                                                      "that the endpoint is up")


def test_unreachable_endpoint_and_missing_bucket_are_clear_errors(s3):
    """Nothing listening at the endpoint: retried, then one line naming it (no botocore traceback chain); a bucket
    that does not exist is not retried and says so."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(S3AccessError) as info:
        JUMPS3MultiView(endpoint_url=endpoint, retries=1)
    message = str(info.value)
    assert message.startswith(f"cannot list s3://{BUCKET}/{PREFIX}/ at S3 endpoint {endpoint} (2 attempts, last: "
                              "EndpointConnectionError")
    assert "\n" not in message and "check endpoint_url" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    server, _ = s3
    with pytest.raises(S3AccessError, match=r"s3://no-such-bucket/.* \(1 attempt, last: .*NoSuchBucket.*the bucket "
                       r"does not exist at this endpoint: check the bucket name and endpoint_url"):
        JUMPS3MultiView(endpoint_url=server.endpoint, bucket="no-such-bucket")


@pytest.mark.slow
def test_multiview_recipe_trains_from_s3_with_a_patch16_rgb_checkpoint(s3, tmp_path):
    """The JUMP recipe, shrunk: ViT patch 8 / 1 channel initialised from a patch-16 3-channel checkpoint, fed by
    JUMPS3MultiView (in a DataLoader worker) with mean / single-stain views; bad fields are skipped on the way."""
    import json

    from dinocell.config import load_config
    from dinocell.models import build_backbone
    from dinocell.train.train import train

    server, _ = s3
    checkpoint = tmp_path / "vit_test_p16_rgb.pth"
    torch.save(build_backbone("vit_test", patch_size=16, in_chans=3, n_storage_tokens=4).state_dict(), checkpoint)
    dataset = f"JUMPS3MultiView:endpoint_url={server.endpoint}:crops_per_field=2:concurrency=8"
    overrides = TINY_RUN + [
        f"student.pretrained_weights={checkpoint}", f"train.dataset_path='{dataset}'", "train.num_workers=1",
        "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
        f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cfg = load_config(RECIPES / "dinov3_vits8_jump_s3_multiview.yaml", overrides)
    assert cfg.student.patch_size == 8 and cfg.student.in_chans == 1 and cfg.crops.channel_views.global2 == "single"
    train(cfg, resume=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
    bad = [r["bad_samples"] for r in records]  # counted in the worker, read by the trainer (prefetch may run ahead)
    assert bad == sorted(bad) and 1 <= bad[-1] <= 3  # the gallery has 3 bad fields: missing, corrupt, zero-filled
    assert "initialised from" in (tmp_path / "run" / "logs" / "log.txt").read_text()
