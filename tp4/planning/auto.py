"""`--plan auto`: nnU-Net's plan of the training data, applied to a run and to its predictions.

What this module teaches:
- the plan is made once, before the run, from the fingerprint of every training case, and then
  the command line has the last word: a flag the user gave (config.given) keeps its value, every
  other planned setting (the patch: conv3d.py's --shape or train.py's --image-size, --batch-size,
  --depth) takes the plan's. A patch the user chose gets the depth and batch planned for it;
- the plan travels with the run: the configuration holds it (`planned`, so --resume replays it),
  the run logs it as plan.json and plan_* params, and a .keras file saved by the run holds it too;
- each case is resampled to the target spacing and normalized by the plan before datasets.py
  cuts it into slices or patches; predict.py replays the same on a new volume and resamples the
  probabilities back onto the volume's own grid.
"""

import dataclasses
import functools
import json
import os
import zipfile

import mlflow
import numpy as np

from tp4.images import datasets, examples, imagefiles, mni, volumes
from tp4.images.imagefiles import DataError
from tp4.planning import fingerprint, plan, preprocess

PLAN_FILE = "plan.json"  # in the run's artifacts, and inside a saved .keras file


def dataset_modality(source: str) -> str | None:
    """The modality a dataset.json in `source` gives its (first) channel: MSD's "modality" or
    nnU-Net v2's "channel_names"; None without one."""
    path = os.path.join(source, "dataset.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            document = json.load(file)
        channels = document.get("modality") or document.get("channel_names") or {}
        return str(next(iter(channels.values()))) if channels else None
    except (OSError, ValueError, AttributeError) as error:
        raise DataError(f"{path}: not a dataset description ({error})") from None


def cases(source: str):
    """(image, label map, spacing) of every case of `source`: a folder of volumes or mni-wm."""
    if source in mni.BUILTIN:
        yield mni.mni_wm_volume()
        return
    layout, pairs = datasets.find_pairs(source)
    if layout != "msd":
        raise DataError(
            f"--plan auto plans volumes (imagesTr/ + labelsTr/): {source} holds 2D images"
        )
    for image_path, mask_path in pairs:
        image, labels = volumes.read(image_path), volumes.read(mask_path)
        yield image.array, labels.array, image.spacing


def make(source: str, modality: str | None, base_filters: int, dims: int) -> dict:
    """The plan of `source` (plan.make's, with the fingerprint's case count and the modality)."""
    modality = modality or dataset_modality(source) or "other"
    measured = fingerprint.measure_cases(cases(source))
    planned = plan.make(measured, modality, base_filters, dims=dims)
    return {**planned, "modality": modality, "cases": measured["cases"], "source": source}


def network_patch(patch) -> tuple:
    """The plan's (X, Y, Z) patch in the network's (D, H, W) = (Z, X, Y) order (datasets.py's)."""
    return (patch[2], patch[0], patch[1]) if len(patch) == 3 else tuple(patch)


def configure(settings, given: set, shape_field: str):
    """`settings` with the plan of its data: planned fields replaced unless `given`, the plan kept
    in `settings.planned`; printed in a few lines.

    Args:
        settings: a Recipe (its plan "auto"; a resumed run's already holds its plan).
        given: the fields whose flags the user wrote (config.given).
        shape_field: "shape" (conv3d.py's (D, H, W) patch) or "image_size" (train.py's square).

    Raises:
        DataError: no volumes to plan from (synthetic data, a folder of 2D images).
    """
    if settings.plan != "auto" or settings.planned:
        return settings
    source = settings.data_dir or (None if settings.dataset == "synthetic" else settings.dataset)
    if not source:
        raise DataError("--plan auto plans real volumes: give --data-dir DIR or --dataset mni-wm")
    dims = 3 if shape_field == "shape" else 2
    planned = make(source, settings.modality, settings.base_filters, dims)
    patch = network_patch(planned["patch"]) if dims == 3 else planned["patch"][0]
    patch = getattr(settings, shape_field) if shape_field in given else patch
    spatial = patch if dims == 3 else (patch, patch)
    chosen = {
        shape_field: patch,
        "depth": plan.depth_for(spatial),  # the plan's, or for the patch the user chose
        "batch_size": plan.batch_for(spatial, settings.base_filters),
    }
    chosen = {name: value for name, value in chosen.items() if name not in given}
    for name, value in chosen.items():
        planned[f"chosen_{name}"] = value
    print(describe(planned, given & {shape_field, "depth", "batch_size"}), flush=True)
    return dataclasses.replace(settings, **chosen, planned=planned)


def describe(planned: dict, kept=()) -> str:
    """The plan in a few lines: what it measured and what it chose."""
    spacing = " x ".join(f"{s:g}" for s in planned["target_spacing"])
    axes = "X Y Z"[: 2 * planned["dims"] - 1]
    lines = [
        f"plan (nnU-Net's rules, from the fingerprint of {planned['cases']} cases, modality "
        f"{planned['modality']}): target spacing {spacing} mm, median shape there "
        f"{imagefiles.shape_text(planned['median_shape'])}",
        f"  patch {imagefiles.shape_text(planned['patch'])} ({axes}), batch "
        f"{planned['batch_size']}, depth {planned['depth']}, normalization "
        f"{planned['normalization']['scheme']}, {planned['step_activation_mib']} MiB of "
        "activations per step",
    ]
    if kept:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(kept))
        lines.append(f"  kept from the command line: {flags}")
    return "\n".join(lines)


def params(planned: dict) -> dict:
    """The plan as flat MLflow params (plan_*)."""
    return {
        "plan_target_spacing": "x".join(f"{s:g}" for s in planned["target_spacing"]),
        "plan_patch": "x".join(map(str, planned["patch"])),
        "plan_batch_size": planned["batch_size"],
        "plan_depth": planned["depth"],
        "plan_normalization": planned["normalization"]["scheme"],
        "plan_modality": planned["modality"],
    }


def log(planned: dict | None) -> None:
    """Log the plan to the active MLflow run: plan.json and its params (nothing without one)."""
    if planned:
        mlflow.log_dict(planned, PLAN_FILE)
        mlflow.log_params(params(planned))


def target_of(planned: dict, spacing) -> list[float]:
    """The target spacing of a case of `spacing`: the plan's, on the planned axes (2D: in-plane;
    the slices keep theirs)."""
    target = list(planned["target_spacing"])
    return target + [float(s) for s in spacing[len(target) :]]


def prepare_case(planned: dict, image, mask, spacing):
    """(image, mask, spacing) of one case resampled to the target spacing and normalized by the
    plan: datasets.load_folder's `prepare`."""
    target = target_of(planned, spacing)
    image = preprocess.resample(np.asarray(image, np.float32), spacing, target)
    mask = preprocess.resample(np.asarray(mask), spacing, target, labels="linear")
    return preprocess.normalize(image, planned["normalization"]), mask, np.asarray(target)


def preprocessing(planned: dict | None):
    """datasets.py's `prepare` for a plan (None: the project's percentiles)."""
    return functools.partial(prepare_case, planned) if planned else examples.percentiles


def load_split(planned, source, shape, seed=0, num_classes=2):
    """datasets.load_split, each volume prepared by the plan; the description says how."""
    splits, description, cases = datasets.load_split(
        source, shape, seed, num_classes, preprocessing(planned)
    )
    if planned:
        spacing = "x".join(f"{s:g}" for s in planned["target_spacing"])
        description["data_normalization"] = f"plan: {planned['normalization']['scheme']}"
        description["data_resampled"] = f"to {spacing} mm (plan: images third order, labels " + (
            "linear on one-hot)"
        )
    return splits, description, cases


def model_entries(planned: dict | None) -> dict:
    """What a saved .keras file holds besides the model (cli.save_model's entries): the plan."""
    return {PLAN_FILE: json.dumps(planned, indent=2)} if planned else {}


def predict_planned(predict, volume, spacing, planned: dict) -> np.ndarray:
    """Probabilities (X, Y, Z, classes) of a raw volume on its own grid, by a model trained on the
    plan: the volume resampled to the target spacing and normalized as in training, `predict`ed
    there, the probabilities resampled back (linearly) to the volume's exact shape.

    Args:
        predict: normalized (X, Y, Z) volume -> its probabilities (X, Y, Z, classes).
        volume: (X, Y, Z) raw intensities; spacing: its voxel size (mm).
        planned: the plan the model was trained with.
    """
    target = target_of(planned, spacing)
    resampled = preprocess.resample(np.asarray(volume, np.float32), spacing, target)
    probabilities = predict(preprocess.normalize(resampled, planned["normalization"]))
    return preprocess.resample(probabilities, target, spacing, shape=volume.shape, order=1)


def model_plan(location: str) -> dict | None:
    """The plan a model was trained with (None: trained without one).

    Args:
        location: a .keras file (its plan.json entry), a runs:/ or models:/ URI (the plan.json of
            the run that logged the model), several comma-separated (the first's).
    """
    location = location.split(",")[0]
    if location.endswith(".keras") and os.path.isfile(location):
        with zipfile.ZipFile(location) as archive:
            if PLAN_FILE in archive.namelist():
                return json.loads(archive.read(PLAN_FILE))
        return None
    if not location.startswith(("runs:/", "models:/")):
        return None
    try:
        if location.startswith("runs:/"):
            run_id = location.removeprefix("runs:/").split("/")[0]
        else:
            run_id = mlflow.models.get_model_info(location).run_id
        if not run_id:
            return None
        names = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id)]
        if PLAN_FILE not in names:
            return None
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{PLAN_FILE}")
    except Exception as error:  # MLflow raises several types for a store or a model it lacks
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{location}: cannot read the model's plan ({first})") from None


def predicting_with(planned: dict) -> str:
    """One line: how predict.py replays a plan."""
    spacing = " x ".join(f"{s:g}" for s in planned["target_spacing"])
    return (
        f"the model's plan: each volume resampled to {spacing} mm and normalized "
        f"({planned['normalization']['scheme']}), its mask resampled back onto the volume's grid"
    )
