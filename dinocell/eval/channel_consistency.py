"""Channel consistency: does a field get the same embedding from the mean of its stains and from each stain alone?

The DINOCell recipe trains with channel views (mean of the channels, one random channel, all channels), hoping the
model describes the biology of a field rather than which stain it is shown. For every field this embeds:
- the `mean` view (the average of all channels, replicated to the model's input channels), the reference;
- each single channel, replicated the same way;
- the `all` view (every channel as it is) when the model takes exactly the field's channel count.
Each view gets the eval geometry (shorter side resized, centre crop) and the normalisation of its channels, as in
training (a mean view uses the mean of the channels' mean/std). Reported per view, against the mean view of the
same field:
- `cosine_to_mean`: the mean cosine similarity of the cls features (1.0: the view changes nothing);
- `retrieval_top1`: the share of fields whose view, used as a query against the gallery of every field's mean
  view, finds its own field first (chance: 1 / number of fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinocell import distributed
from dinocell.eval.errors import EvalError
from dinocell.eval.features import SampleRecords, batches, collate_records, embed, shard
from dinocell.eval.report import format_table, percent
from dinocell.logging.progress import Progress
from dinocell.pipeline.augmentations import normalize
from dinocell.pipeline.transforms import EvalTransform, take_view, to_in_chans

MEAN_VIEW, ALL_VIEW = "mean", "all"


class ChannelViews:
    """Sample with `n_channels` channels -> [V, in_chans, size, size]: the mean view, each single channel, then
    `all` when the model takes exactly `n_channels` (and there are several)."""

    def __init__(
        self,
        size: int,
        in_chans: int,
        n_channels: int,
        channel_mean: Sequence[float] | None,
        channel_std: Sequence[float] | None,
    ) -> None:
        if channel_mean is not None and len(channel_mean) != n_channels:
            raise EvalError(f"channel_mean has {len(channel_mean)} values but the fields have {n_channels} channels")
        self.size, self.in_chans, self.n_channels = size, in_chans, n_channels
        self.channel_mean, self.channel_std = channel_mean, channel_std
        self.specs = [("mean", 0)] + [("single", c) for c in range(n_channels)]
        if n_channels == in_chans and n_channels > 1:
            self.specs.append(("all", 0))

    def view_names(self, channel_names: Sequence[str] | None = None) -> list[str]:
        """mean, one name per channel (`channel_names`, else channel_<i>), all."""
        names = list(channel_names or [f"channel_{c}" for c in range(self.n_channels)])
        return [MEAN_VIEW, *names, *([ALL_VIEW] if self.specs[-1][0] == "all" else [])]

    def __call__(self, sample: dict) -> torch.Tensor:
        image: torch.Tensor = sample["image"]
        if image.shape[0] != self.n_channels:
            raise EvalError(f"sample {sample.get('id')!r} has {image.shape[0]} channels, the first field had "
                            f"{self.n_channels}; channel consistency needs one channel layout")
        geometry = EvalTransform(self.size, self.n_channels, None, None)  # resize + centre crop, channels untouched
        field = geometry({"image": image, "id": sample.get("id")})["image"]
        views = []
        for view, channel in self.specs:
            crop, mean, std = take_view(field, view, channel, self.channel_mean, self.channel_std)
            if mean is not None:
                crop = normalize(crop, mean, std)
            views.append(to_in_chans(crop, self.in_chans))
        return torch.stack(views)


def consistency_scores(features: torch.Tensor, view_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """features [N fields, V views, D] (view 0 = mean) -> view name -> {cosine_to_mean, retrieval_top1}."""
    if features.ndim != 3 or features.shape[1] != len(view_names) or view_names[0] != MEAN_VIEW:
        raise EvalError(f"expected [N, {len(view_names)}, D] features with the mean view first, got "
                        f"{tuple(features.shape)} for views {list(view_names)}")
    f = F.normalize(features.double(), dim=-1)
    reference = f[:, 0]  # the mean view of every field: the gallery
    own = torch.arange(f.shape[0])
    scores = {}
    for v, name in enumerate(view_names[1:], start=1):
        cosine = (f[:, v] * reference).sum(dim=-1)
        retrieved = (f[:, v] @ reference.T).argmax(dim=1)
        scores[name] = {"cosine_to_mean": float(cosine.mean()), "retrieval_top1": float((retrieved == own).double()
                                                                                          .mean())}
    return scores


@torch.inference_mode()
def channel_consistency(
    model: nn.Module,
    dataset: Dataset,
    *,
    size: int,
    in_chans: int,
    channel_mean: Sequence[float] | None = None,
    channel_std: Sequence[float] | None = None,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    distributed_shards: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Embed every field of `dataset` under every channel view and score the views against the mean view.

    Returns {"n_fields", "skipped", "chance_top1", "views": {name: scores}, "channel_average": scores averaged
    over the single-channel views}. Substitutes of bad samples are skipped and counted. With `distributed_shards`
    every rank of the process group embeds a contiguous share of the fields and all ranks return the same result
    (every rank must call this).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if not n:
        raise EvalError("channel consistency got an empty dataset")
    views = ChannelViews(size, in_chans, dataset[0]["image"].shape[0], channel_mean, channel_std)
    device = torch.device(device)
    share = shard(range(n), distributed_shards)
    loader = DataLoader(SampleRecords(dataset, views), batch_sampler=batches(share, batch_size),
                        num_workers=num_workers, collate_fn=collate_records, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    feats, skipped = [], 0
    try:
        main_rank = not distributed_shards or distributed.get_rank() == 0
        with Progress(len(share), "channel views", "field", enabled=show_progress and main_rank) as bar:
            for stacks, kept, bad in loader:
                skipped += len(bad)
                if stacks is not None:
                    b, v = stacks.shape[:2]
                    cls = embed(model, stacks.flatten(0, 1).to(device, non_blocking=True), ("cls",))["cls"]
                    feats.append(cls.float().cpu().reshape(b, v, -1))
                bar.update(len(kept) + len(bad))
    finally:
        model.train(was_training)
    if distributed_shards and distributed.get_world_size() > 1:
        shares = distributed.all_gather_object((feats, skipped))
        feats, skipped = [f for rank_feats, _ in shares for f in rank_feats], sum(s for _, s in shares)
    if not feats:
        raise EvalError("channel consistency got no usable field")
    features = torch.cat(feats)
    names = views.view_names(_channel_names(dataset, views.n_channels))
    scores = consistency_scores(features, names)
    singles = [scores[n] for n in names[1 : 1 + views.n_channels]]
    return {
        "n_fields": int(features.shape[0]),
        "skipped": skipped,
        "chance_top1": 1.0 / features.shape[0],
        "views": scores,
        "channel_average": {k: float(np.mean([s[k] for s in singles])) for k in singles[0]},
    }


def consistency_table(results: dict) -> str:
    """The results of `channel_consistency` as text: one row per view and the single-channel average."""
    rows = [[view, f"{s['cosine_to_mean']:.4f}", percent(s["retrieval_top1"])] for view, s in results["views"].items()]
    rows.append(["(single-channel average)", f"{results['channel_average']['cosine_to_mean']:.4f}",
                 percent(results["channel_average"]["retrieval_top1"])])
    head = (f"{results['n_fields']} fields, views against the mean view; retrieval chance "
            f"{percent(results['chance_top1'])} %\n")
    return head + format_table(["view", "cosine to mean", "retrieval top-1 %"], rows)


def _channel_names(dataset: Dataset, n_channels: int) -> list[str] | None:
    """Stain names of datasets that have them (SyntheticCellPainting.channel_names, JUMP's channels)."""
    for attribute in ("channel_names", "channels"):
        names = getattr(dataset, attribute, None)
        if isinstance(names, (list, tuple)) and len(names) == n_channels and all(isinstance(n, str) for n in names):
            return list(names)
    return None
