"""Remote inputs (dinocell.data.io.remote) against a real S3 API (moto_server on 127.0.0.1) and its HTTP endpoint:
files, config files with a `_base_` chain, pretrained weights (downloaded once per machine), metadata tables."""

import gzip
import io
import multiprocessing

import pandas as pd
import pytest
import torch
from s3_server import FaultyProxy, MotoServer, moto_server_binary

from dinocell.commands import train as train_command
from dinocell.commands.common import load_checked_config
from dinocell.config import ConfigError, load_config
from dinocell.data.io.remote import cache_dir, fetch, is_remote, open_input
from dinocell.eval.profile_map import read_table
from dinocell.models import build_backbone, load_pretrained

pytestmark = pytest.mark.skipif(moto_server_binary() is None,
                                reason="moto_server not found: pip install 'moto[server]'")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


TABLE = pd.DataFrame({"Metadata_Plate": ["P0", "P0", "P1"], "Metadata_Well": ["A01", "A02", "A01"],
                      "Metadata_JCP2022": ["JCP2022_000001", "JCP2022_033924", "JCP2022_000001"]})


def _bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tiny_backbone():
    return build_backbone("vit_test", patch_size=8, n_storage_tokens=1, in_chans=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A public-read bucket 'pub' (recipes, a state dict, a teacher dump, metadata tables) and a private bucket
    'priv'."""
    root = tmp_path_factory.mktemp("bucket")
    (root / "recipes" / "base").mkdir(parents=True)
    (root / "recipes" / "tiny.yaml").write_text("optim:\n  lr: 0.5\n")
    (root / "recipes" / "base" / "common.yaml").write_text("optim:\n  lr: 0.25\n  epochs: 7\n")
    (root / "recipes" / "child.yaml").write_text("_base_: base/common.yaml\noptim:\n  lr: 0.125\n")
    (root / "recipes" / "loop.yaml").write_text("_base_: ../recipes/loop.yaml\n")
    (root / "weights.pth").write_bytes(_bytes({"w": torch.arange(6.0).reshape(2, 3)}))
    torch.manual_seed(0)
    teacher = {f"backbone.{k}": v for k, v in _tiny_backbone().state_dict().items()}
    (root / "teacher_checkpoint.pth").write_bytes(_bytes({"teacher": teacher}))
    (root / "tables").mkdir()
    (root / "tables" / "well.csv.gz").write_bytes(gzip.compress(TABLE.to_csv(index=False).encode()))
    TABLE.to_parquet(root / "tables" / "well.parquet")
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


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DINOCELL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "inputs"


def test_config_file_and_its_base_chain_from_s3(server, no_credentials, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    cfg = load_checked_config("s3://pub/recipes/child.yaml", ["optim.warmup_epochs=2"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs) == (0.125, 7, 2)  # base <- child <- command line
    assert train_command.main(["--config-file", "s3://pub/recipes/child.yaml", "--output-dir", str(tmp_path / "x"),
                               "--print-config"]) == 0
    assert "lr: 0.125" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"config file 's3://pub/recipes/nope.yaml' does not exist"):
        load_checked_config("s3://pub/recipes/nope.yaml", [])
    with pytest.raises(ConfigError, match=r"cycle: s3://pub/recipes/loop.yaml -> s3://pub/recipes/loop.yaml"):
        load_checked_config("s3://pub/recipes/loop.yaml", [])
    with pytest.raises(ConfigError, match="is a URL: load it through a dinocell command"):
        load_config("s3://pub/recipes/child.yaml")  # the config package itself reads no URL


def test_config_base_chain_over_http(server):
    cfg = load_checked_config(f"{server.endpoint}/pub/recipes/child.yaml", [])
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.125, 7)


def test_pretrained_weights_from_s3_are_downloaded_once_into_the_cache(server, no_credentials, monkeypatch, cache):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    url = "s3://pub/teacher_checkpoint.pth"
    expected = torch.load(open_input(url), weights_only=True)["teacher"]
    backbone = _tiny_backbone()
    report = load_pretrained(backbone, url)
    assert report.source == url and report.layout == "eval dump (teacher.backbone)"
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, expected[f"backbone.{key}"]), key
    cached = fetch(url)
    assert [p.name for p in cache.glob("*.pth")] == [cached.name] and cached.name.endswith("-teacher_checkpoint.pth")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there: only the cache can answer
    assert load_pretrained(_tiny_backbone(), url).layout == "eval dump (teacher.backbone)"
    with pytest.raises(ValueError, match=r"could not download s3://pub/other.pth .*pass the local file path"):
        load_pretrained(_tiny_backbone(), "s3://pub/other.pth")


def _fetch_in_child(url: str, queue) -> None:
    queue.put(str(fetch(url)))


def test_processes_of_one_machine_share_one_download(server, cache):
    """Three processes (the ranks of a node) ask for the same URL at once: one request reaches the server."""
    with FaultyProxy(server.port, delay_s=0.5) as proxy:
        url = f"{proxy.endpoint}/pub/weights.pth"
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        children = [context.Process(target=_fetch_in_child, args=(url, queue)) for _ in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join(timeout=60)
        paths = {queue.get(timeout=5) for _ in children}
        assert proxy.requests == 1 and all(child.exitcode == 0 for child in children)
    assert len(paths) == 1 and str(cache) in paths.pop()
    assert torch.load(fetch(url), weights_only=True)["w"].sum() == 15
    assert not [p.name for p in cache.iterdir() if ".partial" in p.name]
    assert cache_dir() == cache and fetch("/some/local.pth").as_posix() == "/some/local.pth"


def test_metadata_tables_from_s3_and_http(server, no_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    pd.testing.assert_frame_equal(read_table("s3://pub/tables/well.csv.gz"), TABLE)
    pd.testing.assert_frame_equal(read_table(f"{server.endpoint}/pub/tables/well.parquet"), TABLE)
    with pytest.raises(FileNotFoundError, match=r"s3://pub/tables/plate.csv.gz: no such object"):
        read_table("s3://pub/tables/plate.csv.gz")
