"""A backbone's features of a dataset: in memory (`extract`) or as a chunked, resumable directory (`export_features`).

Each kept sample gives one row: its dataset index, id, label (-1 = unlabelled), metadata (JUMP: source, batch,
plate, well, site, ...) and feature vectors:
- `cls`: the normalised class token [D] (always);
- `patch_mean`: the mean of the normalised patch tokens [D] (optional);
- `storage`: the normalised storage (register) tokens [R, D] (optional).
Stored features are the backbone's outputs as they are (not L2-normalised); each evaluation normalises as it needs.

Bad samples: a dataset that meets a bad file returns the next good sample in its place (training needs a full
batch), marked with `meta["substituted_for"]`. Extraction skips such substitutes and records them (index, id of the
bad sample, reason), so no image is embedded twice and every bad file is accounted for.

On disk (`export_features`): `features.json` (the manifest) plus `chunk_00000.npz`, ... Chunk k holds the samples
with dataset indices [k * chunk_size, (k + 1) * chunk_size). A chunk is written to a temporary file and renamed, so
a chunk file is always complete; a rerun skips the chunks that exist, and refuses a directory whose manifest was
written with other settings. Under torchrun each rank extracts the chunks k with k % world_size == rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinocell import distributed
from dinocell.data.dataset import SampleDataset
from dinocell.data.io.bad_files import BAD_REASON, REASONS, SUBSTITUTED_FOR, is_substitute
from dinocell.eval.errors import EvalError
from dinocell.logging.progress import Progress

FEATURE_KINDS = ("cls", "patch_mean", "storage")
MANIFEST = "features.json"
FORMAT, VERSION = "dinocell-features", 1


@dataclass
class FeatureSet:
    """Rows of kept samples in dataset order, plus the substitutes that were skipped."""

    index: np.ndarray  # [N] int64 dataset indices
    ids: list[str]
    labels: np.ndarray  # [N] int64, -1 = unlabelled
    meta: list[dict[str, Any]]
    features: dict[str, np.ndarray]  # kind -> [N, D] (storage: [N, R, D]) float32
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "id", "reason"}
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def matrix(self, kind: str = "cls") -> np.ndarray:
        """[N, D] matrix of one kind, or of several joined with '+' (e.g. 'cls+patch_mean', DINOv2's linear input)."""
        parts = kind.split("+")
        missing = [p for p in parts if p not in self.features]
        if missing:
            raise EvalError(
                f"features '{missing[0]}' are not in this set (it holds {', '.join(self.features) or 'none'}); "
                "export them with `dinocell eval features --patch-mean` (or --storage-tokens)"
            )
        return np.concatenate([self.features[p].reshape(len(self), -1) for p in parts], axis=1)

    def bad_counts(self) -> dict[str, int]:
        """Skipped bad samples by reason, plus `total` (the same keys as a dataset's bad_sample_counts())."""
        counts = {reason: sum(s["reason"] == reason for s in self.skipped) for reason in REASONS}
        counts["total"] = len(self.skipped)
        return counts

    @staticmethod
    def concat(parts: Sequence[FeatureSet], classes: list[str] | None = None) -> FeatureSet:
        rows = [p for p in parts if len(p)]
        kinds = rows[0].features.keys() if rows else ()
        return FeatureSet(
            index=np.concatenate([p.index for p in parts]) if parts else np.zeros(0, np.int64),
            ids=[i for p in parts for i in p.ids],
            labels=np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64),
            meta=[m for p in parts for m in p.meta],
            features={k: np.concatenate([p.features[k] for p in rows]) for k in kinds},
            skipped=[s for p in parts for s in p.skipped],
            classes=classes,
        )


class SampleRecords(Dataset):
    """Dataset index -> a record `collate_records` can batch: the transformed image with the sample's index, id,
    label and meta, or a skipped substitute {"index", "skipped": {"index", "id", "reason"}}."""

    def __init__(self, dataset: SampleDataset, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        return self._record(index, self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Keep batch-concurrent datasets (S3) concurrent: fetch the batch through their own __getitems__."""
        samples = self.dataset.__getitems__(indices)
        return [self._record(i, s) for i, s in zip(indices, samples)]

    def _record(self, index: int, sample: dict) -> dict:
        meta = dict(sample.get("meta") or {})
        if is_substitute(sample):
            return {"index": index, "skipped": {"index": index, "id": meta[SUBSTITUTED_FOR],
                                                "reason": meta.get(BAD_REASON, "")}}
        view = self.transform(sample) if self.transform is not None else sample
        image = view if isinstance(view, torch.Tensor) else view["image"]
        return {"index": index, "image": image, "label": int(sample.get("label", -1)), "id": str(sample["id"]),
                "meta": meta}


def collate_records(records: list[dict]) -> tuple[torch.Tensor | None, list[dict], list[dict]]:
    """(stacked images of the kept records or None, kept records without their image, skipped substitutes)."""
    kept = [r for r in records if "image" in r]
    images = torch.stack([r.pop("image") for r in kept]) if kept else None
    return images, kept, [r["skipped"] for r in records if "skipped" in r]


def embed(model: nn.Module, images: torch.Tensor, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Feature tensors of one batch. A module without `forward_features` gives `cls` = model(images) only."""
    if not hasattr(model, "forward_features"):
        if tuple(kinds) != ("cls",):
            raise EvalError(f"features {list(kinds)} need a backbone with forward_features (a dinocell ViT)")
        return {"cls": model(images)}
    out = model.forward_features(images)
    result = {"cls": out["x_norm_clstoken"]}
    if "patch_mean" in kinds:
        result["patch_mean"] = out["x_norm_patchtokens"].mean(dim=1)
    if "storage" in kinds:
        result["storage"] = out["x_storage_tokens"]
    return result


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """`cls` first, each kind once, every kind known."""
    unknown = [k for k in kinds if k not in FEATURE_KINDS]
    if unknown:
        raise EvalError(f"unknown feature kind '{unknown[0]}'; expected some of {', '.join(FEATURE_KINDS)}")
    return tuple(k for k in FEATURE_KINDS if k == "cls" or k in kinds)


def _feature_batches(
    model: nn.Module,
    dataset: SampleDataset,
    transform: Any,
    batches: list[list[int]],
    kinds: Sequence[str],
    *,
    num_workers: int,
    device: torch.device | str,
    progress: Progress,
) -> Iterator[FeatureSet]:
    """One FeatureSet per batch of dataset indices, in the order given; the model runs in eval mode."""
    device = torch.device(device)
    loader = DataLoader(
        SampleRecords(dataset, transform),
        batch_sampler=batches,
        collate_fn=collate_records,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, kept, skipped in loader:
                feats = embed(model, images.to(device, non_blocking=True), kinds) if kept else {}
                yield FeatureSet(
                    index=np.array([r["index"] for r in kept], np.int64),
                    ids=[r["id"] for r in kept],
                    labels=np.array([r["label"] for r in kept], np.int64),
                    meta=[r["meta"] for r in kept],
                    features={k: v.float().cpu().numpy() for k, v in feats.items()},
                    skipped=skipped,
                )
                progress.update(len(kept) + len(skipped))
    finally:
        model.train(was_training)
        progress.close()


def batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """`indices` in consecutive batches of `size` (the last one shorter)."""
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def shard(indices: Sequence[int], distributed_shards: bool) -> list[int]:
    """This rank's contiguous share of `indices` (all of them without `distributed_shards`); shares of consecutive
    ranks follow each other, so gathering them in rank order restores the order of `indices`."""
    rank, world = (distributed.get_rank(), distributed.get_world_size()) if distributed_shards else (0, 1)
    n = len(indices)
    return list(indices[rank * n // world : (rank + 1) * n // world])


def extract(
    model: nn.Module,
    dataset: SampleDataset,
    transform: Any,
    *,
    kinds: Sequence[str] = ("cls",),
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    indices: Sequence[int] | None = None,
    distributed_shards: bool = False,
    show_progress: bool = True,
) -> FeatureSet:
    """Features of every sample of `dataset`, or of the samples at `indices` (substitutes of bad samples skipped),
    in that order.

    `transform` maps a sample record to the image the model sees, or to a record holding it under "image"
    (dinocell's eval transform can be passed as is); None feeds sample["image"] unchanged. With
    `distributed_shards` every rank of the process group extracts a contiguous share and all ranks return the
    whole set (every rank must call this).
    """
    kinds = check_kinds(kinds)
    share = shard(range(len(dataset)) if indices is None else indices, distributed_shards)  # type: ignore[arg-type]
    progress = Progress(len(share), "features", "img",
                        enabled=show_progress and (not distributed_shards or distributed.get_rank() == 0))
    parts = list(_feature_batches(model, dataset, transform, batches(share, batch_size), kinds,
                                  num_workers=num_workers, device=device, progress=progress))
    if distributed_shards:
        parts = [p for rank_parts in distributed.all_gather_object(parts) for p in rank_parts]
    return FeatureSet.concat(parts, classes=dataset.classes)


def extract_features(
    model: nn.Module,
    dataset: SampleDataset,
    transform: Any,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised cls features [N, D] float32 (on CPU) and labels [N] int64 of the kept samples, in dataset
    order: the input of k-NN. `model(x)` may also be any module returning one vector per image."""
    features = extract(model, dataset, transform, batch_size=batch_size, num_workers=num_workers, device=device)
    if not len(features):
        raise EvalError("extract_features got an empty dataset; expected at least one sample")
    cls = F.normalize(torch.from_numpy(features.features["cls"]), p=2, dim=-1)
    return cls, torch.from_numpy(features.labels)


# ------------------------------------------------------------------------------------------------ on disk
def _chunk_path(directory: Path, chunk: int) -> Path:
    return directory / f"chunk_{chunk:05d}.npz"


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _save_chunk(path: Path, part: FeatureSet) -> None:
    arrays = {
        "index": part.index,
        "id": np.array(part.ids, dtype=str),
        "label": part.labels,
        "meta": np.array([json.dumps(m, default=str) for m in part.meta], dtype=str),
        "skipped_index": np.array([s["index"] for s in part.skipped], np.int64),
        "skipped_id": np.array([s["id"] for s in part.skipped], dtype=str),
        "skipped_reason": np.array([s["reason"] for s in part.skipped], dtype=str),
        **{f"feature_{k}": v for k, v in part.features.items()},
    }
    _write_atomic(path, lambda f: np.savez(f, **arrays))


def _load_chunk(path: Path) -> FeatureSet:
    with np.load(path, allow_pickle=False) as z:
        return FeatureSet(
            index=z["index"],
            ids=z["id"].tolist(),
            labels=z["label"],
            meta=[json.loads(m) for m in z["meta"].tolist()],
            features={name[len("feature_"):]: z[name] for name in z.files if name.startswith("feature_")},
            skipped=[{"index": int(i), "id": str(s), "reason": str(r)}
                     for i, s, r in zip(z["skipped_index"], z["skipped_id"], z["skipped_reason"])],
        )


def _check_settings(directory: Path, settings: dict) -> None:
    """Refuse to mix chunks of two different extractions in one directory."""
    path = directory / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("settings", {})
    changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        raise EvalError(
            f"{directory} holds features extracted with other settings ({k}: {old.get(k)!r} there, "
            f"{settings.get(k)!r} now); rerun with the same settings to resume, or use another output directory"
        )


def export_features(
    model: nn.Module,
    dataset: SampleDataset,
    transform: Any,
    output_dir: str | Path,
    *,
    settings: dict[str, Any],
    kinds: Sequence[str] = ("cls",),
    chunk_size: int = 4096,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish) the features of `dataset` under `output_dir` and return the manifest.

    `settings` describes the extraction (model source, dataset string, eval view...): a rerun with the same
    settings resumes, with others it is refused. In a process group every rank must call this; each extracts its
    chunks and rank 0 writes the final manifest.
    """
    if chunk_size < 1:
        raise EvalError(f"chunk_size={chunk_size} must be >= 1")
    kinds = check_kinds(kinds)
    directory = Path(output_dir)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise EvalError("the dataset is empty; expected at least one sample")
    settings = {**settings, "kinds": list(kinds), "chunk_size": chunk_size, "n_samples": n}
    _check_settings(directory, settings)  # every rank reads the same file and comes to the same verdict
    rank, world = distributed.get_rank(), distributed.get_world_size()
    n_chunks = -(-n // chunk_size)
    classes = dataset.classes
    manifest = {"format": FORMAT, "version": VERSION, "settings": settings, "n_chunks": n_chunks,
                "classes": list(classes) if classes is not None else None, "complete": False}
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / MANIFEST).is_file():
            _write_json(directory / MANIFEST, manifest)
    distributed.barrier()
    todo = [k for k in range(rank, n_chunks, world) if not _chunk_path(directory, k).is_file()]
    todo_batches = [b for k in todo for b in batches(range(k * chunk_size, min(n, (k + 1) * chunk_size)), batch_size)]
    progress = Progress(sum(len(b) for b in todo_batches), "features", "img", enabled=show_progress and rank == 0)
    pending: dict[int, list[FeatureSet]] = {}
    for part in _feature_batches(model, dataset, transform, todo_batches, kinds, num_workers=num_workers,
                                 device=device, progress=progress):
        first = int(part.index[0]) if len(part) else int(part.skipped[0]["index"])
        chunk = first // chunk_size
        pending.setdefault(chunk, []).append(part)
        done = sum(len(p) + len(p.skipped) for p in pending[chunk])
        if done == min(n, (chunk + 1) * chunk_size) - chunk * chunk_size:
            _save_chunk(_chunk_path(directory, chunk), FeatureSet.concat(pending.pop(chunk)))
    distributed.barrier()
    if rank == 0:
        _write_json(directory / MANIFEST, _summarise(directory, manifest))
    distributed.barrier()
    return json.loads((directory / MANIFEST).read_text())


def _summarise(directory: Path, manifest: dict) -> dict:
    """The complete manifest: rows, skipped bad samples by reason, feature shapes."""
    features = load_features(directory, require_complete=False)
    dims = {k: list(v.shape[1:]) for k, v in features.features.items()}
    return {**manifest, "complete": True, "rows": len(features), "dims": dims, "bad_samples": features.bad_counts(),
            "skipped": features.skipped}


def load_features(directory: str | Path, *, require_complete: bool = True) -> FeatureSet:
    """All rows of an exported feature directory, in dataset order."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise EvalError(f"{directory} is no feature directory (no {MANIFEST}); write one with `dinocell eval features`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise EvalError(f"{path} is not a dinocell feature manifest (format {manifest.get('format')!r})")
    chunks = [_chunk_path(directory, k) for k in range(manifest["n_chunks"])]
    missing = [c.name for c in chunks if not c.is_file()]
    if missing and require_complete:
        raise EvalError(
            f"{directory} is incomplete: {len(missing)} of {len(chunks)} chunks missing (first {missing[0]}); rerun "
            "the same `dinocell eval features` command to finish it"
        )
    parts = [_load_chunk(c) for c in chunks if c.is_file()]
    return FeatureSet.concat(parts, classes=manifest.get("classes"))


def is_feature_dir(location: str) -> bool:
    """True when `location` names an exported feature directory (rather than a dataset string)."""
    return (Path(location) / MANIFEST).is_file()
