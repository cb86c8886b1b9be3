"""JUMP Cell Painting fields, from a local copy (`JUMPCellPaintingMultiView`) or streamed from S3 (`JUMPS3MultiView`).

A field (one imaged site) is keyed by (source, batch, plate, well, site): two plates share well/site names, so a
shorter key would merge different fields. Fields and their per-stain files come from the plates' load_data indexes,
never from file names. Each sample is one field as float32 [C, H, W] in the requested stain order, decoded at full
16-bit precision, optionally divided by the plate's illumination function, then normalised per image and channel.

Throughput: `crops_per_field` makes the dataset `n_fields * crops_per_field` long with `index // crops_per_field` =
field, so several crop sets are cut from one download; `__getitems__` fetches every file of a batch's distinct fields
concurrently (`concurrency` requests in flight per process); decoded fields stay in an LRU (`cache_size` fields, per
DataLoader worker). Bad files (missing, truncated, zero-filled, undecodable) are counted (`bad_sample_counts()`),
warned about once with the key, and replaced by the next good field in index order. See docs/jump.md.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.io.bad_files import BadFileError, BadSampleTracker
from dinocell.data.io.cache import DiskCache, LRUCache
from dinocell.data.io.index import (
    INDEX_NAMES,
    STAINS,
    FieldRecord,
    fields_from_table,
    pick_index_files,
    read_index_table,
    resolve_stains,
    split_s3_url,
)
from dinocell.data.io.s3 import get_bytes, list_folders, list_keys, make_client
from dinocell.data.io.tiff import decode_tiff
from dinocell.data.normalize import Normalization, check_normalization, normalize_image
from dinocell.data.registry import register_dataset


@dataclass
class _ProcessState:
    """What must not cross a fork or a pickle: thread pool, S3 client, caches. Rebuilt in each worker process."""

    pid: int
    pool: ThreadPoolExecutor
    cache: LRUCache
    illum: dict[tuple[str, ...], np.ndarray | BadFileError] = field(default_factory=dict)  # per plate
    client: object = None


class _JUMPFields(SampleDataset):
    """Shared machinery; subclasses say how to list index files and read one location's bytes."""

    def __init__(
        self,
        *,
        channels: list[str] | None,
        crops_per_field: int,
        cache_size: int,
        concurrency: int,
        normalization: Normalization,
        illum_correction: bool,
        transform=None,
    ) -> None:
        if crops_per_field < 1:
            raise DatasetError(f"crops_per_field={crops_per_field} must be >= 1 (1 = one sample per field)")
        if concurrency < 1:
            raise DatasetError(f"concurrency={concurrency} must be >= 1")
        check_normalization(normalization, type(self).__name__)
        if cache_size < 0:
            raise DatasetError(f"cache_size={cache_size} must be >= 0 (0 disables the field cache)")
        self.channels = list(channels) if channels else list(STAINS)
        self.crops_per_field = crops_per_field
        self.cache_size = cache_size
        self.concurrency = concurrency
        self.normalization = normalization
        self.illum_correction = illum_correction
        self.transform = transform
        self._state: _ProcessState | None = None
        self.fields = self._discover()
        if not self.fields:
            raise FileNotFoundError(f"{type(self).__name__}: no fields found ({self._where()}); check the filters")
        self._tracker = BadSampleTracker(len(self.fields))

    # -- what subclasses provide ---------------------------------------------------------------------------------
    def _index_files(self) -> list[tuple[str, dict[str, str]]]:
        """(index location, default key columns) pairs, one per plate."""
        raise NotImplementedError

    def _read(self, location: str) -> bytes:
        """Bytes of one file; raises BadFileError('missing') when it does not exist."""
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    # -- public API ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.fields) * self.crops_per_field

    @property
    def sample_block_size(self) -> int:
        """The training sampler keeps this many consecutive indices (one field's crop sets) together."""
        return self.crops_per_field

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch at once: every file of its distinct, uncached fields is requested concurrently."""
        field_ids = [self._field_of(i) for i in indices]
        fetched = self._fetch_many(sorted(set(field_ids)))
        samples = []
        images: dict[int, torch.Tensor] = {}  # a field's crop sets share one normalised image (transforms copy)
        for index, wanted in zip(indices, field_ids):
            found, raw = self._tracker.first_good(wanted, lambda f: self._load_field_or_explain(f, fetched))
            if found not in images:
                images[found] = normalize_image(torch.from_numpy(raw.astype(np.float32)), self.normalization)
            samples.append(self._sample(index, found, wanted, images[found]))
        return samples

    def bad_sample_counts(self) -> dict[str, int]:
        """Distinct bad fields found so far by this process and its DataLoader workers, by reason, plus `total`.
        Meant for the training metrics; ranks each count their own (sum them across ranks)."""
        return self._tracker.counts()

    def field_key(self, index: int) -> str:
        return self.fields[self._field_of(index)].key

    # -- internals -----------------------------------------------------------------------------------------------
    def _field_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return index // self.crops_per_field

    def _process(self) -> _ProcessState:
        if self._state is None or self._state.pid != os.getpid():
            self._state = _ProcessState(os.getpid(), ThreadPoolExecutor(self.concurrency), LRUCache(self.cache_size))
        return self._state

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None}

    def _discover(self) -> list[FieldRecord]:
        index_files = self._index_files()
        tables = self._process().pool.map(lambda item: read_index_table(self._read(item[0]), item[0]), index_files)
        records: dict[str, FieldRecord] = {}
        for (location, defaults), table in zip(index_files, tables):
            for record in fields_from_table(table, self.channels, location, defaults):
                if self.illum_correction and record.illum is None and "/workspace/load_data_csv/" in location:
                    stains = resolve_stains(list(table.columns), self.channels, location)
                    record = replace(record, illum=tuple(_bucket_illum(location, stains)))
                records.setdefault(record.key, record)
        return [records[k] for k in sorted(records)]

    def _fetch_many(self, field_ids: list[int]) -> dict[int, np.ndarray | BadFileError]:
        """The batch's fields: cached ones as they are (held here, so later cache evictions cannot drop them), the
        others fetched with all their files in flight at once."""
        state = self._process()
        fetched: dict[int, np.ndarray | BadFileError] = {}
        for f in field_ids:
            if not self._tracker.is_bad(f) and (cached := state.cache.get(f)) is not None:
                fetched[f] = cached
        todo = [f for f in field_ids if f not in fetched and not self._tracker.is_bad(f)]
        if self.illum_correction:  # a plate without usable illumination functions: do not download its images
            for f in list(todo):
                try:
                    self._illum_stack(self.fields[f])
                except BadFileError as error:
                    fetched[f] = error
                    todo.remove(f)
        futures = {f: [state.pool.submit(self._decode, loc) for loc in self.fields[f].files] for f in todo}
        for f, channel_futures in futures.items():
            try:
                fetched[f] = self._assemble(f, [future.result() for future in channel_futures])
            except BadFileError as error:
                fetched[f] = error
        return fetched

    def _decode(self, location: str) -> np.ndarray:
        return decode_tiff(self._read(location), location)

    def _load_field(self, f: int, fetched: dict[int, np.ndarray | BadFileError]) -> np.ndarray:
        state = self._process()
        raw = fetched.get(f)
        if raw is None:
            raw = state.cache.get(f)
        if raw is None:
            if self.illum_correction:
                self._illum_stack(self.fields[f])  # a plate without illumination functions: no download
            raw = self._assemble(f, [self._decode(loc) for loc in self.fields[f].files])
        if isinstance(raw, BadFileError):
            raise raw
        state.cache.put(f, raw)
        return raw

    def _load_field_or_explain(self, f: int, fetched: dict[int, np.ndarray | BadFileError]) -> np.ndarray:
        """Like _load_field, but a bad file is reported under the field's key (the file location goes in detail)."""
        try:
            return self._load_field(f, fetched)
        except BadFileError as error:
            if error.key == self.fields[f].key:
                raise
            raise BadFileError(error.reason, self.fields[f].key, f"{error.key} {error.detail}".strip()) from error

    def _assemble(self, f: int, planes: list[np.ndarray]) -> np.ndarray:
        """[C, H, W] field from its channel planes, illumination-corrected when asked (then float32)."""
        key = self.fields[f].key
        shapes = {p.shape for p in planes}
        if len(shapes) != 1 or len(planes[0].shape) != 2:
            raise BadFileError("bad_shape", key, f"channel planes have shapes {sorted(shapes)}")
        stacked = np.stack(planes)
        if not self.illum_correction:
            return stacked
        illum = self._illum_stack(self.fields[f])
        if illum.shape != stacked.shape:
            raise BadFileError("bad_shape", key, f"illumination functions {illum.shape} vs field {stacked.shape}")
        return stacked.astype(np.float32) / illum

    def _sample(self, index: int, found: int, wanted: int, image: torch.Tensor) -> dict:
        record = self.fields[found]
        source, batch, plate, well, site = record.key.split("/")
        meta: dict[str, str | int] = {
            "source": source, "batch": batch, "plate": plate, "well": well, "site": site,
            "crop": index % self.crops_per_field,
        }  # fmt: skip
        if found != wanted:
            meta.update(self._tracker.substitute_meta(wanted, self.fields[wanted].key))
        sample = {"image": image, "label": -1, "id": record.key, "meta": meta}
        return self.transform(sample) if self.transform is not None else sample

    def _illum_stack(self, record: FieldRecord) -> np.ndarray:
        """[C, H, W] illumination functions (corrected = raw / illum), clamped and cached per plate. A missing or
        unreadable function makes the field bad (BadFileError); the failure is cached too, so the other fields of
        that plate fail at once without downloading their images. An index without illum locations is a
        configuration error."""
        if record.illum is None:
            raise DatasetError(
                f"illum_correction=true but the index of {record.key} names no Illum files "
                "(expected FileName_Illum<Stain>/PathName_Illum<Stain> columns, or a bucket-layout illum folder)"
            )
        cache = self._process().illum
        if record.illum not in cache:
            try:
                cache[record.illum] = np.stack([self._illum_function(location) for location in record.illum])
            except BadFileError as error:
                cache[record.illum] = error
            except ValueError as error:  # np.stack: functions of different shapes
                cache[record.illum] = BadFileError("bad_shape", record.illum[0], f"illumination functions: {error}")
        cached = cache[record.illum]
        if isinstance(cached, BadFileError):
            raise cached
        return cached

    def _illum_function(self, location: str) -> np.ndarray:
        try:
            function = np.load(io.BytesIO(self._read(location)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise BadFileError("undecodable", location, f"{type(error).__name__}: {error}") from error
        return np.maximum(function.astype(np.float32), 1e-6)


def _bucket_defaults(index_key: str) -> dict[str, str]:
    """Key columns implied by `<...>/<source>/workspace/load_data_csv/<batch>/<plate>/<index file>`."""
    parts = index_key.split("/")
    return {"Metadata_Source": parts[-6], "Metadata_Batch": parts[-3], "Metadata_Plate": parts[-2]}


def _bucket_illum(index_key: str, channels: list[str]) -> list[str]:
    """`<...>/<source>/images/<batch>/illum/<plate>/<plate>_Illum<Stain>.npy`, the gallery's illum layout."""
    parts = index_key.split("/")
    base = "/".join(parts[:-6] + [parts[-6], "images", parts[-3], "illum", parts[-2]])
    return [f"{base}/{parts[-2]}_Illum{c}.npy" for c in channels]


def _keep(index_key: str, batches: list[str] | None, plates: list[str] | None) -> bool:
    parts = index_key.split("/")
    return (not batches or parts[-3] in batches) and (not plates or parts[-2] in plates)


@register_dataset("JUMPCellPaintingMultiView")
class JUMPCellPaintingMultiView(_JUMPFields):
    """JUMP Cell Painting fields from local disk: a mirror of the bucket layout, or a folder with its own index."""

    def __init__(
        self,
        *,
        root: Path,
        prefix: str = "cpg0016-jump",
        index: Path | None = None,
        sources: list[str] | None = None,
        batches: list[str] | None = None,
        plates: list[str] | None = None,
        channels: list[str] | None = None,
        crops_per_field: int = 1,
        cache_size: int = 1000,
        concurrency: int = 8,
        normalization: Normalization = "percentile",
        illum_correction: bool = False,
        transform=None,
    ) -> None:
        """root: the bucket mirror (holds `<prefix>/<source>/workspace/load_data_csv/...`) or a folder whose own
        load_data index (`index`, or root/load_data*.csv|.csv.gz|.parquet) lists its files; s3:// locations in an
        index map to `root/<key>`. channels: stain names (default DNA,ER,RNA,AGP,Mito)."""
        self.root = Path(root).expanduser().resolve()
        self.prefix = prefix.strip("/")
        self.index = index
        self.sources, self.batches, self.plates = sources, batches, plates
        if not self.root.is_dir():
            raise FileNotFoundError(f"JUMPCellPaintingMultiView: root '{self.root}' is not a directory")
        super().__init__(
            channels=channels, crops_per_field=crops_per_field, cache_size=cache_size, concurrency=concurrency,
            normalization=normalization, illum_correction=illum_correction, transform=transform,
        )  # fmt: skip

    def _where(self) -> str:
        return f"root={self.root}, prefix={self.prefix}, sources={self.sources}, batches={self.batches}"

    def _index_files(self) -> list[tuple[str, dict[str, str]]]:
        # A plain folder with its own index: absent Source/Batch columns default to "local".
        defaults = {"Metadata_Source": "local", "Metadata_Batch": "local"}
        if self.index:
            path = self.root / self.index
            if not path.is_file():
                raise FileNotFoundError(f"JUMPCellPaintingMultiView: index '{self.index}' not found under {self.root}")
            return [(path.as_posix(), defaults)]
        own = [(self.root / n).as_posix() for n in INDEX_NAMES if (self.root / n).is_file()]
        if own:
            return [(loc, defaults) for loc in pick_index_files(own)]
        base = self.root / self.prefix if self.prefix else self.root
        sources = self.sources or sorted(p.parent.parent.name for p in base.glob("*/workspace/load_data_csv"))
        found = []
        for source in sources:
            for path in sorted((base / source / "workspace" / "load_data_csv").glob("*/*/*")):
                key = path.as_posix()
                if _keep(key, self.batches, self.plates):
                    found.append(key)
        return [(loc, _bucket_defaults(loc)) for loc in pick_index_files(found)]

    def _read(self, location: str) -> bytes:
        path = Path(self.root / split_s3_url(location)[1]) if location.startswith("s3://") else Path(location)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError) as error:
            raise BadFileError("missing", location) from error
        except OSError as error:  # permissions, stale network mounts, I/O errors: skipped and counted, not a crash
            raise BadFileError("unreachable", location, f"{type(error).__name__}: {error}") from error


@register_dataset("JUMPS3MultiView")
class JUMPS3MultiView(_JUMPFields):
    """JUMP Cell Painting fields streamed from S3 (anonymous by default), with LRU and optional disk cache."""

    def __init__(
        self,
        *,
        bucket: str = "cellpainting-gallery",
        prefix: str = "cpg0016-jump",
        sources: list[str] | None = None,
        batches: list[str] | None = None,
        plates: list[str] | None = None,
        channels: list[str] | None = None,
        crops_per_field: int = 1,
        cache_size: int = 1000,
        disk_cache: Path | None = None,
        concurrency: int = 32,
        retries: int = 5,
        endpoint_url: str | None = None,
        anonymous: bool = True,
        normalization: Normalization = "percentile",
        illum_correction: bool = False,
        transform=None,
    ) -> None:
        """bucket/prefix: where `<source>/workspace/load_data_csv/<batch>/<plate>/load_data*` live. concurrency:
        requests in flight per process. disk_cache: folder keeping every fetched file (no eviction). retries: how often
        each request (listing, index, image) is repeated on throttling, 5xx, timeouts and dropped connections."""
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.sources, self.batches, self.plates = sources, batches, plates
        self.endpoint_url, self.anonymous, self.retries = endpoint_url, anonymous, retries
        self.disk_cache = DiskCache(disk_cache) if disk_cache else None
        super().__init__(
            channels=channels, crops_per_field=crops_per_field, cache_size=cache_size, concurrency=concurrency,
            normalization=normalization, illum_correction=illum_correction, transform=transform,
        )  # fmt: skip

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}, sources={self.sources}, batches={self.batches}, plates={self.plates}"

    def _client(self):
        state = self._process()
        if state.client is None:
            state.client = make_client(self.endpoint_url, self.anonymous, max_connections=self.concurrency)
        return state.client

    def _index_files(self) -> list[tuple[str, dict[str, str]]]:
        base = f"{self.prefix}/" if self.prefix else ""
        client, bucket, retries = self._client(), self.bucket, self.retries
        sources = self.sources or list_folders(client, bucket, base, retries=retries)
        keys = []
        for source in sources:
            folder = f"{base}{source}/workspace/load_data_csv/"
            for sub in [f"{b}/" for b in self.batches] if self.batches else [""]:
                listed = list_keys(client, bucket, folder + sub, retries=retries)
                keys += [k for k in listed if _keep(k, None, self.plates)]
        return [(f"s3://{self.bucket}/{k}", _bucket_defaults(k)) for k in pick_index_files(keys)]

    def _read(self, location: str) -> bytes:
        bucket, key = split_s3_url(location)
        if self.disk_cache is not None and (data := self.disk_cache.get(bucket, key)) is not None:
            return data
        data = get_bytes(self._client(), bucket, key, retries=self.retries)
        if self.disk_cache is not None:
            self.disk_cache.put(bucket, key, data)
        return data

