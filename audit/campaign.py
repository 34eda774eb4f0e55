"""A campaign: which twins, which images, which targets, which patch sizes and seeds, and how to attack. The
YAML/JSON file is validated by pydantic (errors name the file and the field) and expands into trials, each
with a deterministic id, so a resubmitted campaign recognises the trials it already stored."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from audit.attack import EOT_EVAL_BATCH, AttackConfig
from segmenters.data import build_dataset, dataset_classes
from segmenters.device import DEVICE_HELP, device_name


class CampaignError(ValueError):
    """A campaign file that cannot be run, with the reason."""


class ImageSet(BaseModel):
    """Which images: a dataset's split, or (`dataset: folder`, `root` a folder or glob) the user's own photos,
    which have no ground truth."""

    model_config = ConfigDict(extra="forbid")
    dataset: Literal["shapes", "camvid", "cityscapes", "voc", "folder"]
    split: str = "val"
    #: image indices; default: the first `count`, or `count` drawn at random with `sample_seed`
    indices: list[int] | None = None
    count: int = Field(10, ge=1)
    sample_seed: int | None = None
    #: (height, width) images are brought to; default the dataset's own
    size: tuple[int, int] | None = None
    root: str | None = None
    #: objects smaller than this are not attacked (a patch needs room inside the object)
    min_object_pixels: int = Field(64, ge=1)
    #: how many objects of each image are attacked: the largest first, or drawn at random (seeded per image)
    objects_per_image: int = Field(1, ge=1)
    object_order: Literal["largest", "random"] = "largest"

    @model_validator(mode="after")
    def _one_selection(self) -> ImageSet:
        if self.indices is not None and self.sample_seed is not None:
            raise ValueError("give either 'indices' or 'sample_seed' (count images drawn at random), not both")
        if self.dataset == "folder" and not self.root:
            raise ValueError("a 'folder' image set needs 'root': a folder or glob of image files")
        return self

    def build(self):
        """The images as a dataset of (image, labels); a folder's labels are all "no label"."""
        size = tuple(self.size) if self.size else None
        if self.dataset == "folder":
            from segmenters.data.folder import ImageFolder

            return ImageFolder(self.root, size=size)
        return build_dataset(self.dataset, self.split, root=self.root, size=size)

    def candidates(self, available: int) -> tuple[list[int], int | None]:
        """The images to look at, in order, out of the split's `available`, and how many of them must have
        something to attack (None: all of those listed). Random draws skip images with nothing to attack, so
        `count: 100` with a `sample_seed` means 100 attacked images, as seed 000's 100 random samples."""
        if self.indices is not None:
            return list(self.indices), None
        if self.sample_seed is None:
            return list(range(self.count)), None
        if self.count > available:
            raise CampaignError(f"cannot draw {self.count} random images from the {available} of "
                                f"{self.dataset}/{self.split}")
        return [int(i) for i in np.random.default_rng(self.sample_seed).permutation(available)], self.count


class TargetSpec(BaseModel):
    """One kind of target. `switch`: an object's pixels should read `to_class` (None: another foreground
    class drawn per trial seed) — objects are the ground truth's instances (shapes) or connected components of
    a class; `mask`: a hand-drawn target PNG per image; `disappear`: every pixel of `remove_class` should go."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["switch", "mask", "disappear"]
    from_classes: list[str] | None = None
    to_class: str | None = None
    masks: dict[int, str] | None = Field(None, description="image index -> target PNG (mask targets)")
    remove_class: str | None = None

    @model_validator(mode="after")
    def _fields_for_kind(self) -> TargetSpec:
        if self.kind == "mask" and not self.masks:
            raise ValueError("a 'mask' target needs 'masks': {image index: target PNG path}")
        if self.kind == "disappear" and not self.remove_class:
            raise ValueError("a 'disappear' target needs 'remove_class'")
        if self.kind != "mask" and self.masks:
            raise ValueError(f"'masks' belongs to 'mask' targets, not {self.kind!r}")
        return self

    def key(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


class CampaignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    #: twin checkpoints (.pt); engines to replay found patches on, per twin checkpoint
    models: list[str] = Field(min_length=1)
    engines: dict[str, list[str]] = Field(default_factory=dict)
    images: ImageSet
    targets: list[TargetSpec] = Field(min_length=1)
    patch_sizes: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0])
    attack: AttackConfig = AttackConfig()
    #: EOT draws used to measure robustness of each found patch
    eot_eval_draws: int = Field(16, ge=0)
    #: shapes only: re-render each switched object with the patch as a decal from this many held-out views
    physical_views: int = Field(0, ge=0)
    #: EOT evaluation draws run through the twin at once (memory; the draws and results do not depend on it)
    eot_eval_batch: int = Field(EOT_EVAL_BATCH, ge=1)
    #: where trials run: auto (the GPU Ray gave the trial, else the CPU), cpu, cuda or cuda:N. Not part of a
    #: trial's id: a campaign resubmitted on another device skips the trials it stored
    device: str = Field("auto", description=DEVICE_HELP)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return device_name(value)  # the form only: where it can be had is decided where trials run

    @field_validator("patch_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(s < 1 for s in value):
            raise ValueError(f"patch sizes must be >= 1 pixel, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _class_names(self) -> CampaignConfig:
        """Objects are chosen by the ground truth's classes; what they become (`to_class`, `remove_class`) may
        also be classes of the models (an imported twin has its own table), resolved per model on expansion."""
        if self.images.dataset == "folder" and any(t.kind == "switch" for t in self.targets):
            raise ValueError("'switch' targets pick objects from ground truth, which a folder of photos has not: "
                             "use 'disappear' or 'mask' targets")
        truth = set() if self.images.dataset == "folder" else {
            c.name.lower() for c in dataset_classes(self.images.dataset)}
        known = truth | _classes_of_models_on_disk(self.models)
        for target in self.targets:
            for name in target.from_classes or []:
                if name.lower() not in truth:
                    raise ValueError(f"class {name!r} is not a {self.images.dataset} class ({', '.join(sorted(truth))})")
            for name in (target.to_class, target.remove_class):
                if name is not None and name.lower() not in known:
                    raise ValueError(f"class {name!r} is not a {self.images.dataset} class nor a class of the models "
                                     f"({', '.join(sorted(known))})")
        if self.physical_views and self.images.dataset != "shapes":
            raise ValueError("physical_views needs the shapes renderer: images.dataset must be 'shapes'")
        unknown = sorted(set(self.engines) - set(self.models))
        if unknown:
            raise ValueError(f"engines are given for {unknown}, which are not in 'models'")
        return self


def _classes_of_models_on_disk(models: list[str]) -> set[str]:
    """Class names every model checkpoint already on disk knows (empty when none is)."""
    tables = [set(model_classes(m, {})) for m in models if Path(m).is_file()]
    return set.intersection(*tables) if tables else set()


def load_campaign(path: str | Path) -> CampaignConfig:
    """A campaign YAML/JSON file -> `CampaignConfig`, or `CampaignError` naming the file and the fields."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CampaignError(f"cannot read campaign file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise CampaignError(f"{path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CampaignError(f"{path}: a campaign is a mapping (name, models, images, targets, patch_sizes, ...)")
    # relative model, engine and target-mask paths are relative to the file, wherever the job runs from
    data = _resolve_paths(data, path.parent)
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise CampaignError(f"{path}: {problems}") from None


def _resolve_paths(data: dict, base: Path) -> dict:
    def resolve(value):
        return str((base / value).resolve()) if isinstance(value, str) and not Path(value).is_absolute() else value

    data = dict(data)
    if isinstance(data.get("models"), list):
        data["models"] = [resolve(m) for m in data["models"]]
    if isinstance(data.get("engines"), dict):
        data["engines"] = {resolve(k): [resolve(e) for e in v] if isinstance(v, list) else v
                           for k, v in data["engines"].items()}
    if isinstance(data.get("targets"), list):
        data["targets"] = [{**t, "masks": {i: resolve(m) for i, m in t["masks"].items()}}
                           if isinstance(t, dict) and isinstance(t.get("masks"), dict) else t for t in data["targets"]]
    return data


@dataclass(frozen=True)
class Trial:
    """One attack: a twin, an image, an object/target, a patch size and a seed."""

    id: str
    model: str
    image_index: int
    target: TargetSpec
    object_id: int  # instance id (shapes), component index, or -1 for whole-image targets
    source_class: int | None
    to_class: int | None
    size: int
    seed: int

    def as_dict(self) -> dict:
        return {"id": self.id, "model": self.model, "image_index": self.image_index, "target": self.target.kind,
                "object_id": self.object_id, "source_class": self.source_class, "to_class": self.to_class,
                "size": self.size, "seed": self.seed}


def object_masks(config: ImageSet, index: int, labels: np.ndarray, foreground: set[int]) -> list[tuple[int, int, np.ndarray]]:
    """(object id, class, mask) of the image's attackable objects, largest first: shapes' instance masks, or
    connected components of each foreground class in the ground truth."""
    objects = []
    if config.dataset == "shapes":
        from segmenters.data.shapes import render_sample

        sample = render_sample(0, config.split, index)
        instances = sample.instances
        if config.size and tuple(config.size) != instances.shape:
            instances = cv2.resize(instances.astype(np.int32), config.size[::-1], interpolation=cv2.INTER_NEAREST)
        for instance in np.unique(instances):
            mask = instances == instance
            cls = int(np.bincount(labels[mask].reshape(-1)).argmax())
            if instance > 0 and cls in foreground:
                objects.append((int(instance), cls, mask))
    else:
        for cls in sorted(foreground):
            count, components = cv2.connectedComponents((labels == cls).astype(np.uint8), connectivity=4)
            for component in range(1, count):
                objects.append((cls * 10_000 + component, cls, components == component))
    objects = [o for o in objects if o[2].sum() >= config.min_object_pixels]
    return sorted(objects, key=lambda o: (-int(o[2].sum()), o[0]))


def trial_id(campaign: CampaignConfig, **fields) -> str:
    """Deterministic: the same campaign settings and trial coordinates give the same id on every run."""
    settings = {"attack": campaign.attack.model_dump(mode="json"), "dataset": campaign.images.dataset,
                "split": campaign.images.split, "size": campaign.images.size,
                "eot_eval_draws": campaign.eot_eval_draws, "physical_views": campaign.physical_views}
    text = json.dumps({**settings, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def expand(campaign: CampaignConfig) -> list[Trial]:
    """models x images x targets (x objects) x patch sizes x seeds -> trials, in a stable order."""
    data = campaign.images.build()
    candidates, wanted_images = campaign.images.candidates(len(data))
    trials, attacked = [], 0
    for index in candidates:
        if index >= len(data):
            raise CampaignError(f"image index {index} is beyond the {len(data)} images of "
                                f"{campaign.images.dataset}/{campaign.images.split}")
        image_trials = _image_trials(campaign, index, data[index][1].numpy())
        if wanted_images is not None and not image_trials:
            continue  # a random draw with nothing to attack: draw another
        trials.extend(image_trials)
        attacked += 1
        if attacked == wanted_images:
            break
    if wanted_images is not None and attacked < wanted_images:
        raise CampaignError(f"only {attacked} of the {len(data)} images of {campaign.images.dataset}/"
                            f"{campaign.images.split} have something to attack; asked for {wanted_images}")
    return trials


def model_classes(path: str, ground_truth: dict[str, int]) -> dict[str, int]:
    """A twin checkpoint's class names (lower case) -> indices, from its embedded spec. A checkpoint not on disk
    yet (a campaign expanded before its twin is trained) is taken to share the ground truth's table."""
    from segmenters.spec import ModelSpec
    from segmenters.twin import read_checkpoint

    if not Path(path).is_file() and ground_truth:
        return ground_truth
    try:
        spec = ModelSpec.from_json(read_checkpoint(path)["spec"])
    except (FileNotFoundError, ValueError) as exc:
        raise CampaignError(f"model {path}: {exc}") from exc
    return {name.lower(): i for i, name in enumerate(spec.class_names)}


def _model_class(model: str, classes: dict[str, int], name: str) -> int:
    if name.lower() not in classes:
        raise CampaignError(f"class {name!r} is not a class of model {Path(model).name} ({', '.join(classes)})")
    return classes[name.lower()]


def _image_trials(campaign: CampaignConfig, index: int, labels: np.ndarray) -> list[Trial]:
    """One image's trials: targets (x objects) x patch sizes x seeds x models. Objects come from the ground
    truth's classes; `to_class` and `remove_class` are resolved in each model's own class table."""
    ground_truth = dataset_classes(campaign.images.dataset) if campaign.images.dataset != "folder" else []
    by_name = {c.name.lower(): i for i, c in enumerate(ground_truth)}
    background = {0} if campaign.images.dataset in ("shapes", "voc") else set()
    tables = {model: model_classes(model, by_name) for model in campaign.models}
    trials = []
    for target in campaign.targets:
        for object_id, source in _units(campaign, target, index, labels, by_name, background):
            for size in campaign.patch_sizes:
                for seed in campaign.seeds:
                    for model in campaign.models:
                        trial = _trial(campaign, target, model, tables[model], index, object_id, source, size, seed,
                                       len(ground_truth), background)
                        if trial is not None:
                            trials.append(trial)
    return trials


def _units(campaign: CampaignConfig, target: TargetSpec, index: int, labels: np.ndarray, by_name: dict[str, int],
           background: set[int]) -> list[tuple[int, int | None]]:
    """(object id, ground-truth class) of what a target attacks in this image."""
    if target.kind == "switch":
        wanted = ({by_name[n.lower()] for n in target.from_classes} if target.from_classes
                  else set(range(len(by_name))) - background)
        objects = object_masks(campaign.images, index, labels, wanted)
        if campaign.images.object_order == "random":
            order = np.random.default_rng([campaign.images.sample_seed or 0, index]).permutation(len(objects))
            objects = [objects[i] for i in order]
        return [(oid, cls) for oid, cls, _ in objects[: campaign.images.objects_per_image]]
    if target.kind == "mask":
        return [(-1, None)] if index in target.masks else []
    return [(-1, None)]


def _trial(campaign: CampaignConfig, target: TargetSpec, model: str, classes: dict[str, int], index: int,
           object_id: int, source: int | None, size: int, seed: int, ground_truth_classes: int,
           background: set[int]) -> Trial | None:
    to_class = None
    if target.kind == "disappear":
        source = _model_class(model, classes, target.remove_class)
    elif target.kind == "switch":
        if target.to_class:
            to_class = _model_class(model, classes, target.to_class)
        else:  # another foreground class of the ground truth's table, drawn per seed
            others = sorted(set(range(ground_truth_classes)) - background - {source})
            to_class = others[np.random.default_rng([seed, index, object_id]).integers(len(others))]
        if to_class == source:
            return None
    tid = trial_id(campaign, model=Path(model).name, image=index, target=target.key(), object=object_id,
                   to_class=to_class, size=size, seed=seed)
    return Trial(tid, model, index, target, object_id, source, to_class, size, seed)
