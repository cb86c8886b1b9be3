"""Dataset strings: typed parsing from signatures, the ':' continuation rule, every error message, the listing."""

from __future__ import annotations

import pathlib
from typing import Literal

import pytest

from dinocell.commands.datasets import main
from dinocell.data import SampleDataset, list_datasets, make_dataset, parse_dataset_string, register_dataset
from dinocell.data.registry import DatasetStringError, split_dataset_string


@register_dataset("_RegistryTyped", "_RegistryTypedAlias")
class _Typed(SampleDataset):
    """A dataset for registry tests."""

    def __init__(
        self,
        *,
        root: str,
        size: int = 3,
        scale: float = 1.0,
        flag: bool = False,
        path: pathlib.Path = pathlib.Path("."),
        patch_size: list[int] = (512, 512, 6),
        names: list[str] = (),
        pair: tuple[float, float] = (0.0, 1.0),
        limit: int | None = None,
        mode: Literal["a", "b"] = "a",
        channels: Literal[1, 3] = 3,
        transform=None,
    ) -> None:
        self.kwargs = {"root": root, "size": size, "transform": transform}


def test_values_are_typed_from_the_signature():
    cls, kwargs = parse_dataset_string(
        "_RegistryTyped:root=r:size=7:scale=0.5:flag=true:path=/data/x:patch_size=512,512,6:names=a,b"
        ":pair=0.2,0.8:limit=none:mode=b:channels=1"
    )
    assert cls is _Typed
    assert kwargs == {
        "root": "r",
        "size": 7,
        "scale": 0.5,
        "flag": True,
        "path": pathlib.Path("/data/x"),
        "patch_size": [512, 512, 6],
        "names": ["a", "b"],
        "pair": (0.2, 0.8),
        "limit": None,
        "mode": "b",
        "channels": 1,
    }
    assert parse_dataset_string("_RegistryTyped:root=r:limit=5:flag=0:names=")[1] == {
        "root": "r",
        "limit": 5,
        "flag": False,
        "names": [],
    }


def test_colons_inside_values_continue_the_previous_value():
    kwargs = parse_dataset_string("_RegistryTyped:root=s3://bucket/prefix/a.b:size=2")[1]
    assert kwargs == {"root": "s3://bucket/prefix/a.b", "size": 2}
    # a '=' after the ':' is still part of the value unless the segment starts with identifier=
    assert parse_dataset_string("_RegistryTyped:root=s3://b/k=v")[1] == {"root": "s3://b/k=v"}
    assert split_dataset_string("X:root=C:\\data:size=1") == ("X", {"root": "C:\\data", "size": "1"})


def test_alias_and_make_dataset_pass_transform():
    def identity(x):
        return x

    dataset = make_dataset("_RegistryTypedAlias:root=q", transform=identity)
    assert isinstance(dataset, _Typed)
    assert dataset.kwargs == {"root": "q", "size": 3, "transform": identity}
    assert "_RegistryTyped" in list_datasets() and "_RegistryTypedAlias" not in list_datasets()


def test_unknown_name_lists_registered_names_and_closest():
    with pytest.raises(DatasetStringError, match="unknown dataset '_RegistryTyepd'.*mean '_RegistryTyped'") as e:
        parse_dataset_string("_RegistryTyepd:root=x")
    assert "SyntheticCellPainting" in str(e.value) and "ImageFolder" in str(e.value)


def test_unknown_key_lists_the_keys():
    with pytest.raises(DatasetStringError, match="no key 'sise'. Did you mean 'size'.*root, size, scale"):
        parse_dataset_string("_RegistryTyped:root=x:sise=3")
    with pytest.raises(DatasetStringError, match="no key 'transform'"):
        parse_dataset_string("_RegistryTyped:root=x:transform=y")


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        ("size=3.5", "key 'size' got '3.5', expected int"),
        ("scale=abc", "key 'scale' got 'abc', expected float"),
        ("flag=maybe", "key 'flag' got 'maybe', expected bool"),
        ("patch_size=512,x", "key 'patch_size' got '512,x', expected comma-separated int list"),
        ("pair=0.1", "key 'pair' got '0.1'.*needs 2 comma-separated items"),
        ("limit=lots", "key 'limit' got 'lots', expected int | none"),
        ("mode=c", "key 'mode' got 'c', expected one of a|b"),
        ("channels=2", "key 'channels' got '2', expected one of 1|3"),
    ],
)
def test_bad_value_names_key_value_and_type(segment, message):
    with pytest.raises(DatasetStringError, match=message):
        parse_dataset_string(f"_RegistryTyped:root=x:{segment}")


def test_structural_errors():
    with pytest.raises(DatasetStringError, match="needs the key\\(s\\) root"):
        parse_dataset_string("_RegistryTyped:size=2")
    with pytest.raises(DatasetStringError, match="key 'size' is given twice"):
        parse_dataset_string("_RegistryTyped:root=x:size=1:size=2")
    with pytest.raises(DatasetStringError, match="segment 'oops' after the name is not key=value"):
        parse_dataset_string("_RegistryTyped:oops")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("_RegistryTyped")(type("Other", (SampleDataset,), {}))
    with pytest.raises(TypeError, match="NotADataset must subclass dinocell.data.SampleDataset"):
        register_dataset("_NotADataset")(type("NotADataset", (), {}))


def test_datasets_command_lists_names_keys_types_defaults(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "SyntheticCellPainting: Procedural 5-channel" in out
    assert "    image_size: int, default 256" in out
    assert "    root: path, required" in out  # ImageFolder
    assert main(["_RegistryTyped"]) == 0
    out = capsys.readouterr().out
    assert "(aliases: _RegistryTypedAlias)" in out and "limit: int | none, default None" in out
    assert "mode: one of a|b, default 'a'" in out
    assert main(["SyntheticCellPaint"]) == 2
    assert "Did you mean 'SyntheticCellPainting'" in capsys.readouterr().err
