"""Load pretrained weights into a backbone (DINOv3 ViT or ResNet), whatever layout they come in, and adapt them.

Accepted sources: an official DINOv3 backbone file (torch.hub layout), a torchvision ResNet file (its classifier
`fc.*` is dropped), a training eval dump ({"teacher": {"backbone.*": ...}} of DINO, {"student": {"backbone.*": ...}} of
SimCLR), this project's training checkpoints
(`ckpt/<iteration>/` or its checkpoint.pth, whose "model" entry holds "teacher.backbone.*" or "student.backbone.*"),
fine-tuning checkpoints (`dinocell eval finetune`'s checkpoints/best/, "model" holding "backbone.*" and "head.*"),
Hugging Face DINOv3 weights (a transformers model directory or its state dict), an in-memory state dict, or a file at
an `s3://`, `http://` or `https://` URL (downloaded once per machine into dinocell's cache, dinocell.data.io.remote).
Sharded training checkpoints (torch.distributed.checkpoint directories of `train.parallelism=fsdp`) are read whole.
Files are read with weights_only=True or safetensors: a checkpoint is untrusted input (a sharded checkpoint's index,
a pickle, is admitted only if it holds nothing but DCP's own records). Adaptations: channel count of the input layer
(mean kernel), ViT patch size (pseudo-inverse resize of the kernel).
"""

import difflib
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from dinocell.data.io.remote import fetch, is_remote
from dinocell.errors import UserError
from dinocell.models.backbones import Backbone
from dinocell.models.resnet import RESNET_ARCHS, ResNetBackbone
from dinocell.models.vision_transformer import ARCHS, DinoVisionTransformer, build_vit

# File names inside a run's directories (written by dinocell.train.checkpoint, which imports them from here).
CHECKPOINT_FILE = "checkpoint.pth"
TEACHER_FILE = "teacher_checkpoint.pth"  # DINO's eval dump {"teacher": ...}
STUDENT_FILE = "student_checkpoint.pth"  # SimCLR's eval dump {"student": ...}
EVAL_DUMP_FILES = {"teacher": TEACHER_FILE, "student": STUDENT_FILE}  # eval dump role -> file name
CHECKPOINT_FILES = (
    CHECKPOINT_FILE, TEACHER_FILE, STUDENT_FILE, "model.safetensors", "model.safetensors.index.json"
)
DCP_INDEX = ".metadata"  # the index of a torch.distributed.checkpoint directory (a sharded training checkpoint)
# What a DCP index may contain: its record classes, torch dtypes and sizes, and paths; nothing that can run code.
DCP_INDEX_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                                                             "ChunkStorageMetadata", "BytesStorageMetadata",
                                                             "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}
# Keys of the official ViT layout (after the Hugging Face renaming) and of torchvision's ResNets; a file with none of
# them is another model.
BACKBONE_KEY = re.compile(
    r"^(cls_token|storage_tokens|mask_token|norm\.|patch_embed\.|rope_embed\.|blocks\.\d+\.|conv1\.|layer\d\.)"
)
# Buffers that are not learned: computed from the architecture (Hugging Face files do not store them), and the
# BatchNorm step counters (older torchvision files predate them). Missing ones keep the backbone's own values.
UNLEARNED_BUFFERS = re.compile(r"^(rope_embed\.periods|blocks\.\d+\.attn\.qkv\.bias_mask|.*\.num_batches_tracked)$")


class WeightsError(UserError, ValueError):
    """Weights that cannot be loaded into the backbone (unreadable, another model, another architecture, not
    downloadable); the message is one line saying why and what to change."""


@dataclass
class LoadReport:
    """What load_pretrained did: the layout it recognised, keys it adapted, and keys left missing or unexpected."""

    source: str
    layout: str
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {self.layout} weights from {self.source}: adapted {self.adapted or 'nothing'}, "
            f"missing {self.missing or 'none'}, unexpected {self.unexpected or 'none'}"
        )


def why_unreadable(error: Exception) -> str:
    """A short reason from a loader error, without torch's advice on weights_only (which does not apply here)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
            return f"it stores a Python object ({m.group(1)}), and weights are read as plain tensors only"
        return "its bytes are not a PyTorch checkpoint"
    if isinstance(error, EOFError) or not text:
        return "the file is empty or ends early"
    return text.split(". ")[0].splitlines()[0]


def _read_file(path: Path) -> Mapping:
    """The file's state dict, memory-mapped where the format allows (safetensors, torch.save's zip format): tensors
    are read from disk only when used, so a check that needs only shapes (the pre-flight one) costs no read of a
    multi-GB file, and the ranks of a node share one copy in the page cache."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise WeightsError(
            f"{path} is not a readable checkpoint ({why_unreadable(e)}); expected a PyTorch state dict saved with "
            "torch.save or a .safetensors file: it may be truncated, corrupt, or another kind of file"
        ) from None


def _read_sharded(index_path: Path) -> dict:
    """A Hugging Face checkpoint split into several safetensors files, listed by its index's weight_map."""
    try:
        shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"{index_path} is not a safetensors index (expected a JSON 'weight_map'): {e}") from e
    merged: dict = {}
    for shard in shards:
        merged |= _read_file(index_path.parent / shard)
    return merged


class _DCPIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in DCP_INDEX_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a checkpoint index never holds")


def _read_dcp(path: Path) -> dict:
    """The backbone weights (the teacher's, else the student's) of a sharded training checkpoint, gathered whole, as
    {"model": {"teacher.backbone.*": ...}}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        with open(path / DCP_INDEX, "rb") as f:
            entries = _DCPIndexUnpickler(f).load().state_dict_metadata
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise WeightsError(f"{path / DCP_INDEX} is not a readable torch.distributed.checkpoint index ({e})") from None
    for prefix in ("model.teacher.backbone.", "model.student.backbone."):
        if keys := [k for k, v in entries.items() if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)]:
            break
    tensors = {k: torch.empty(entries[k].size, dtype=entries[k].properties.dtype) for k in keys}
    try:
        with warnings.catch_warnings():  # DCP warns that it assumes one process: here that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(path), no_dist=True)  # only this process reads
    except (Exception, dcp.CheckpointException) as e:  # DCP's exception (a BaseException) wraps the failing read
        raise WeightsError(f"{path} is a sharded checkpoint whose shards cannot be read (damaged or incomplete "
                           f"{DCP_INDEX} or .distcp files: {type(e).__name__})") from e
    return {"model": {k.removeprefix("model."): v for k, v in tensors.items()}}


def _read(source: str | Path | Mapping) -> tuple[Mapping, str]:
    """The raw object stored at `source` and a printable name for it."""
    if isinstance(source, Mapping):
        return source, "<state dict>"
    if is_remote(source):
        try:
            local = fetch(source)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # no network, an unreachable endpoint, a server error
            raise WeightsError(
                f"could not download {source} ({type(e).__name__}: {e}); download it where a network is available "
                f"and pass the local file path instead (e.g. student.pretrained_weights=/path/to/file.pth)"
            ) from e
        return _read_file(local), str(source)
    path = Path(source)
    if path.is_dir() and (path / DCP_INDEX).is_file():
        return _read_dcp(path), str(path)
    if path.is_dir():
        for name in CHECKPOINT_FILES:
            if (path / name).is_file():
                read = _read_sharded if name.endswith(".index.json") else _read_file
                return read(path / name), str(path / name)
        raise FileNotFoundError(f"directory {path} holds none of the expected weight files {list(CHECKPOINT_FILES)}")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} is neither a file nor a directory")
    return _read_file(path), str(path)


def _strip_prefix(state_dict: Mapping, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def hf_to_official(state_dict: Mapping) -> dict:
    """Hugging Face DINOv3ViTModel keys -> official DINOv3 keys (q/k/v merged into qkv with a zero k bias).

    Blocks are `layer.N.*` in transformers 4.x and `model.layer.N.*` in 5.x; both are accepted."""
    out: dict = {}
    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "storage_tokens",
        "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    block_renames = {"attention.o_proj": "attn.proj", "layer_scale1": "ls1", "layer_scale2": "ls2", "norm1": "norm1",
                     "norm2": "norm2"}
    if any(".mlp.gate_proj." in k for k in state_dict):  # gated (SwiGLU) model
        block_renames |= {"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"}
    else:
        block_renames |= {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in renames:
            out[renames[key]] = value
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
        elif m := re.match(r"^(?:model\.)?layer\.(\d+)\.(.+)$", key):  # transformers 4.x: layer.N, 5.x: model.layer.N
            idx, rest = m.groups()
            if pm := re.match(r"^attention\.([qkv])_proj\.(weight|bias)$", rest):
                qkv_parts.setdefault(idx, {})[f"{pm.group(1)}.{pm.group(2)}"] = value
                continue
            for old, new in block_renames.items():
                if rest.startswith(old + "."):
                    param = rest[len(old) + 1 :]
                    out[f"blocks.{idx}.{new}.{'gamma' if param == 'lambda1' else param}"] = value
                    break
            else:
                out[key] = value  # unknown: reported as unexpected
        else:
            out[key] = value
    for idx, parts in qkv_parts.items():
        out[f"blocks.{idx}.attn.qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        if "q.bias" in parts:
            k_bias = parts.get("k.bias", torch.zeros_like(parts["q.bias"]))
            out[f"blocks.{idx}.attn.qkv.bias"] = torch.cat([parts["q.bias"], k_bias, parts["v.bias"]])
    return out


def backbone_state_dict(obj: object, name: str = "<state dict>") -> tuple[dict, str]:
    """The backbone's official-layout state dict inside any supported container, and the layout's name. Whatever
    the container (file, directory, URL, training checkpoint, eval dump), the result must be a dict of tensors."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{name} holds a {type(obj).__name__}, expected a dict of tensors (a state dict)")
    sd, layout = _find_backbone(obj, name)
    if not any(BACKBONE_KEY.match(k) for k in sd):
        # a file of another model, or a state dict one level down: say what was expected and what the file holds
        sample = ", ".join(repr(k) for k in list(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        raise WeightsError(
            f"{name} holds no backbone weights: none of its {len(obj)} entries ({sample}) is a backbone key such "
            "as 'cls_token', 'blocks.0.attn.qkv.weight' or 'conv1.weight'. Expected an official DINOv3 backbone file, "
            "a Hugging Face DINOv3 model, a torchvision ResNet file, or a dinocell checkpoint (ckpt/<iteration>/ or "
            "eval/<iteration>/teacher_checkpoint.pth): point student.pretrained_weights (--checkpoint for dinocell "
            "knn) at one of these"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{name}: expected a state dict of tensors, but these entries are not tensors: {bad[:5]}")
    return sd, layout


def _find_backbone(obj: Mapping, name: str) -> tuple[dict, str]:
    """Pick the backbone entries by container layout: training checkpoint, eval dump, Hugging Face, official."""
    if isinstance(obj.get("model"), Mapping):
        for prefix in ("teacher.backbone.", "student.backbone."):
            if sd := _strip_prefix(obj["model"], prefix):
                return sd, f"training checkpoint ({prefix[:-1]})"
        if sd := _strip_prefix(obj["model"], "backbone."):
            return sd, "fine-tuning checkpoint (backbone)"
        raise WeightsError(f"{name} is a training checkpoint without 'teacher.backbone.*' or 'student.backbone.*' keys "
                           "in 'model' (a fine-tuning checkpoint of a frozen backbone holds only its head)")
    for role in EVAL_DUMP_FILES:
        if isinstance(obj.get(role), Mapping):
            if sd := _strip_prefix(obj[role], "backbone."):
                return sd, f"eval dump ({role}.backbone)"
            raise WeightsError(f"{name} is an eval dump without 'backbone.*' keys under '{role}'")
    if any(k.startswith("embeddings.") for k in obj):
        return hf_to_official(obj), "hugging face DINOv3ViTModel"
    if "conv1.weight" in obj:
        return dict(obj), "torchvision ResNet"
    return dict(obj), "official DINOv3"


def pi_resize_patch_kernel(weight: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resample a [D, C, p, p] patch kernel to [D, C, q, q] so that <resize(x), new> ~= <x, old> for a patch x
    (FlexiViT's pseudo-inverse resize). resize = bilinear without antialiasing: for 16 -> 8 that is 2x2 averaging,
    which stays inside a patch (so it equals resizing the whole image) and keeps constant patches exact."""
    old_size = weight.shape[-1]
    basis = torch.eye(old_size * old_size, dtype=torch.float64).reshape(-1, 1, old_size, old_size)
    resize = F.interpolate(basis, size=(new_size, new_size), mode="bilinear", align_corners=False, antialias=False)
    resize_matrix = resize.reshape(old_size * old_size, new_size * new_size)  # row i = resize(e_i) = A^T[i]
    flat = weight.to(torch.float64).reshape(-1, old_size * old_size).T  # [p*p, D*C]
    new = torch.linalg.pinv(resize_matrix) @ flat  # [q*q, D*C]
    return new.T.reshape(*weight.shape[:2], new_size, new_size).to(weight.dtype)


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """[D, C, k, k] input kernel -> [D, in_chans, k, k]: every channel = mean of the C kernels x C / in_chans, so that
    in_chans copies of a grey image give what the C-channel model gives on C copies of it."""
    old = weight.shape[1]
    return (weight.mean(dim=1, keepdim=True).expand(-1, in_chans, -1, -1) * (old / in_chans)).contiguous()


def resnet_arch_of(state_dict: Mapping) -> str:
    """The RESNET_ARCHS name of a ResNet state dict, or a description of its blocks when dinocell has no such arch."""
    block = "Bottleneck" if "layer1.0.conv3.weight" in state_dict else "BasicBlock"
    counts = tuple(
        len({m.group(1) for k in state_dict if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))})
        for stage in (1, 2, 3, 4)
    )
    for arch, (block_type, layers) in RESNET_ARCHS.items():
        if block_type.__name__ == block and layers == counts:
            return arch
    return f"a ResNet of {block} blocks {counts}"


def _n_blocks(state_dict: Mapping) -> int:
    return len({int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))})


def _setting(key: str, value: object) -> str:
    """How a user sets a backbone option: the config key, and the flag of `dinocell knn` (which takes the same)."""
    return f"student.{key}={value} (`--{key.replace('_', '-')} {value}` for dinocell knn)"


ADAPTED = ("patch_embed.proj.weight", "storage_tokens")  # adapted below, or checked with their own message


def _shape_difference(own: Mapping, sd: Mapping) -> str | None:
    """The first shape difference between a backbone state dict and a checkpoint's (embed dim, depth, any tensor but
    the adaptable ones), or None."""
    dims = [d["patch_embed.proj.weight"].shape[0] for d in (sd, own) if "patch_embed.proj.weight" in d]
    if len(dims) == 2 and dims[0] != dims[1]:
        return f"embed dim {dims[0]} in the checkpoint, {dims[1]} in the backbone"
    if (depth := _n_blocks(sd)) != _n_blocks(own):
        return f"{depth} blocks in the checkpoint, {_n_blocks(own)} in the backbone"
    for k in own:
        if k in sd and k not in ADAPTED and sd[k].shape != own[k].shape:
            return f"{k}: checkpoint {list(sd[k].shape)} vs backbone {list(own[k].shape)}"
    return None


def _fits(own: Mapping, sd: Mapping) -> bool:
    """Same shapes and the same block keys (an MLP block and a SwiGLU block of one width have equal shapes)."""
    in_blocks = [{k for k in d if k.startswith("blocks.") and not UNLEARNED_BUFFERS.match(k)} for d in (sd, own)]
    return _shape_difference(own, sd) is None and in_blocks[0] == in_blocks[1]


def _fitting_archs(sd: Mapping, n_storage_tokens: int) -> list[str]:
    """Built-in archs whose backbone (built on the meta device: no memory) fits the checkpoint; only archs of the
    checkpoint's width are built."""
    width = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    candidates = [a for a, spec in ARCHS.items() if width in (None, spec["embed_dim"])]
    built = {a: build_vit(a, n_storage_tokens=n_storage_tokens, device="meta").state_dict() for a in candidates}
    return [a for a, own in built.items() if _fits(own, sd)]


def _arch_fix(sd: Mapping, n_storage_tokens: int) -> str:
    """What to set so that the backbone fits the checkpoint: the built-in arch(s) that do, or that none does."""
    archs = _fitting_archs(sd, n_storage_tokens)
    if len(archs) == 1:
        return f"set {_setting('arch', archs[0])}"
    if archs:
        return f"set student.arch to one of {archs} (`--arch` for dinocell knn)"
    return f"no built-in arch has its shapes (archs: {', '.join(ARCHS)})"


def _check_and_adapt(backbone: DinoVisionTransformer, sd: dict, name: str, adapted: list[str]) -> None:
    """Raise on mismatches that cannot be adapted, naming the setting to change; adapt the patch embedding's channels
    and patch size in place."""
    if "conv1.weight" in sd and "patch_embed.proj.weight" not in sd:
        arch = resnet_arch_of(sd)
        raise WeightsError(f"{name} holds ResNet weights ({arch}), but the backbone is a ViT; set "
                           f"{_setting('arch', arch) if arch in RESNET_ARCHS else 'student.arch to a ResNet'}")
    if "storage_tokens" in sd and sd["storage_tokens"].shape[1] != backbone.n_storage_tokens:
        n = sd["storage_tokens"].shape[1]
        raise WeightsError(
            f"{name} has {n} storage tokens but the backbone has {backbone.n_storage_tokens}; set "
            f"{_setting('n_storage_tokens', n)}"
        )
    if difference := _shape_difference(backbone.state_dict(), sd):
        fix = _arch_fix(sd, backbone.n_storage_tokens)
        raise WeightsError(f"{name} holds a ViT of another architecture than the backbone ({difference}); {fix}")
    key = "patch_embed.proj.weight"
    if key not in sd:
        return
    weight = sd[key]
    if weight.shape[1] != backbone.in_chans:
        old = weight.shape[1]
        weight = adapt_input_channels(weight, backbone.in_chans)
        adapted.append(f"{key}: {old} -> {backbone.in_chans} channels (mean kernel x {old}/{backbone.in_chans})")
    if weight.shape[-1] != backbone.patch_size or weight.shape[-2] != weight.shape[-1]:
        old = tuple(weight.shape[-2:])
        weight = pi_resize_patch_kernel(weight, backbone.patch_size)
        adapted.append(f"{key}: patch {old[0]}x{old[1]} -> {backbone.patch_size} (pseudo-inverse resize)")
    sd[key] = weight.contiguous()


def _check_and_adapt_resnet(backbone: ResNetBackbone, sd: dict, name: str, adapted: list[str]) -> None:
    """Drop the ImageNet classifier, check the arch, adapt the first convolution's channels, all in place."""
    if "conv1.weight" not in sd:
        vit = "cls_token" in sd or "patch_embed.proj.weight" in sd
        raise WeightsError(
            f"{name} has no ResNet stem (conv1.weight){': it holds ViT weights' if vit else ''}; the backbone is "
            f"{backbone.arch}: load a torchvision ResNet file or a checkpoint of a ResNet student"
        )
    if (arch := resnet_arch_of(sd)) != backbone.arch:
        hint = f"set {_setting('arch', arch)}" if arch in RESNET_ARCHS else f"supported: {', '.join(RESNET_ARCHS)}"
        raise WeightsError(f"{name} holds {arch} weights but the backbone is {backbone.arch}; {hint}")
    if classifier := sorted(k for k in sd if k.startswith("fc.")):
        for key in classifier:
            del sd[key]
        adapted.append(f"{', '.join(classifier)}: classifier dropped (the backbone ends at its pooled feature)")
    weight = sd["conv1.weight"]
    if weight.shape[1] != backbone.in_chans:
        old = weight.shape[1]
        sd["conv1.weight"] = adapt_input_channels(weight, backbone.in_chans)
        adapted.append(f"conv1.weight: {old} -> {backbone.in_chans} channels (mean kernel x {old}/{backbone.in_chans})")


def load_pretrained(backbone: Backbone, source: str | Path | Mapping, *, strict: bool = True) -> LoadReport:
    """Load weights from `source` into `backbone` (in place) and say what was adapted, missing and unexpected.

    strict=True raises if any backbone key stays missing or any checkpoint key is unused; strict=False loads what
    fits. Shape mismatches that cannot be adapted always raise.
    """
    obj, name = _read(source)
    sd, layout = backbone_state_dict(obj, name)
    report = LoadReport(source=name, layout=layout)
    if isinstance(backbone, ResNetBackbone):
        _check_and_adapt_resnet(backbone, sd, name, report.adapted)
    else:
        _check_and_adapt(backbone, sd, name, report.adapted)
    own = backbone.state_dict()
    for key in own:
        if key not in sd and UNLEARNED_BUFFERS.match(key):
            sd[key] = own[key]
            report.adapted.append(f"{key}: not learned, not in the checkpoint (the backbone's own value kept)")
    report.missing = sorted(set(own) - set(sd))
    report.unexpected = sorted(set(sd) - set(own))
    if strict and (report.missing or report.unexpected):
        hint = ""
        if report.missing:
            close = difflib.get_close_matches(report.missing[0], report.unexpected, n=1)
            hint = f" (checkpoint key closest to {report.missing[0]!r}: {close[0]!r})" if close else ""
        if any(k.startswith("blocks.") for k in report.unexpected):  # e.g. SwiGLU blocks for an MLP backbone
            fix = _arch_fix(sd, backbone.n_storage_tokens)
        else:  # the architecture is right, the file is incomplete or has extra entries
            fix = ("expected a complete backbone of this architecture (a file edited or saved from a modified model "
                   "loads only through load_pretrained(..., strict=False))")
        raise WeightsError(
            f"{name} ({layout} layout) does not match the backbone key for key: missing {report.missing[:10]}, "
            f"unexpected {report.unexpected[:10]}{hint}; {fix}"
        )
    backbone.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return report
