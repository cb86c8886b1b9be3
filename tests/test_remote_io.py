"""Remote inputs (dinocell.data.io.remote) against a real S3 API (moto_server on 127.0.0.1) and its HTTP endpoint."""

import io

import pytest
import torch
from s3_server import MotoServer, moto_server_binary

from dinocell.data.io.remote import is_remote, open_input

pytestmark = pytest.mark.skipif(moto_server_binary() is None,
                                reason="moto_server not found: pip install 'moto[server]'")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A public-read bucket 'pub' (a recipe and a state dict) and a private bucket 'priv'."""
    root = tmp_path_factory.mktemp("bucket")
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny.yaml").write_text("optim:\n  lr: 0.5\n")
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, buffer)
    (root / "weights.pth").write_bytes(buffer.getvalue())
    with MotoServer() as moto:
        moto.publish(root, bucket="pub")
        client = moto.signed_client()
        client.create_bucket(Bucket="priv")
        client.put_object(Bucket="priv", Key="secret.txt", Body=b"private")
        yield moto


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def test_public_bucket_is_read_unsigned_without_credentials(server, no_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)  # boto3's own variable, as on a MinIO site
    with open_input("s3://pub/recipes/tiny.yaml", "r") as f:
        assert f.read() == "optim:\n  lr: 0.5\n"
    with open_input("s3://pub/weights.pth") as f:  # torch.load seeks in the stream
        assert torch.equal(torch.load(f, weights_only=True)["w"], torch.arange(6.0).reshape(2, 3))


def test_private_bucket_needs_signed_requests(server, credentials):
    with open_input("s3://priv/secret.txt", endpoint_url=server.endpoint) as f:  # credentials found: signed
        assert f.read() == b"private"
    refused = r"s3://priv/secret.txt: access refused \(403\); the request was unsigned: set AWS credentials"
    with pytest.raises(PermissionError, match=refused):
        open_input("s3://priv/secret.txt", endpoint_url=server.endpoint, anonymous=True)


def test_missing_objects_and_buckets_are_named(server, no_credentials):
    with pytest.raises(FileNotFoundError, match=r"s3://pub/nope.yaml: no such object \(NoSuchKey\)"):
        open_input("s3://pub/nope.yaml", endpoint_url=server.endpoint)
    with pytest.raises(FileNotFoundError, match=r"s3://nobucket/x: no such object \(NoSuchBucket\)"):
        open_input("s3://nobucket/x", endpoint_url=server.endpoint)


def test_http_urls_and_local_paths(server, tmp_path):
    with open_input(f"{server.endpoint}/pub/recipes/tiny.yaml", "r") as f:  # the S3 server's plain HTTP face
        assert f.read() == "optim:\n  lr: 0.5\n"
    with open_input(f"{server.endpoint}/pub/weights.pth") as f:
        assert torch.load(f, weights_only=True)["w"].sum() == 15
    with pytest.raises(FileNotFoundError, match="/pub/missing: no such object \\(404\\)"):
        open_input(f"{server.endpoint}/pub/missing")
    with pytest.raises(PermissionError, match="/priv/secret.txt: access refused \\(403\\)"):
        open_input(f"{server.endpoint}/priv/secret.txt")
    local = tmp_path / "x.txt"
    local.write_text("here")
    assert open_input(local, "r").read() == "here" and not is_remote(local)
    assert is_remote("s3://b/k") and is_remote("https://h/x") and not is_remote("data/s3:/x")
    with pytest.raises(ValueError, match="mode 'wb' is not 'rb' or 'r'"):
        open_input("s3://b/k", "wb")
