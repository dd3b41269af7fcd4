"""A run's configuration: a frozen dataclass per script, every setting and its default in one block.

What this module teaches:
- nanoGPT's "all the knobs in one visible place", typed: each script declares `class Config(Recipe)`
  with its own settings, and `Recipe` (below) holds the ones train.py and conv3d.py share. A field
  is a flag: `image_size: int = option(128, "...")` is `--image-size`, a Literal type gives the
  choices, a bool that defaults to False an on/off flag, and the help text is the field's;
- the configuration is built once (`parse`) and never changed in place: values resolved later (the
  precision and XLA setting measured for the machine, the number of replicas) are set with
  `dataclasses.replace`, which makes a new one;
- `--resume` reads the configuration a run logged (its config.json, `to_json`) back into the same
  class (`from_json`).
"""

import argparse
import copy
import dataclasses
import types
import typing
from typing import Literal

import losses
from tp4 import cli
from tp4.distributed import distribute
from tp4.perf import speed
from tp4.training import recipe

NEWEST = "newest"  # --resume without a run id


def option(default, help: str, **argparse_options) -> dataclasses.Field:
    """A setting: its default, its --help text and any argparse option (type, nargs, metavar...).

    `flag=False` keeps a field off the command line (a value set later, such as `replicas`);
    `group="name"` puts it in a mutually exclusive group with the others of that name;
    `text_default` is the default as --help shows it, parsed by the option's type.
    """
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


def default_of(base: type, name: str, default) -> dataclasses.Field:
    """`base`'s setting `name` with another default: a script's own default for a shared setting."""
    return dataclasses.field(default=default, metadata=base.__dataclass_fields__[name].metadata)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The settings train.py and conv3d.py share: recipe, speed, data, run. Scripts change defaults
    with `default_of`."""

    # The recipe: loss, optimizer, schedule, stopping, augmentation.
    loss: str = option("bce_dice", "training loss", choices=tuple(losses.LOSSES))
    optimizer: str = option("adam", "optimizer", choices=tuple(recipe.OPTIMIZERS))
    lr: float | None = option(
        None,
        "peak learning rate [default: the optimizer's usual one: "
        + ", ".join(f"{o.label} {o.learning_rate:g}" for o in recipe.OPTIMIZERS.values())
        + "]",
        type=cli.positive,
    )
    lr_schedule: Literal["cosine", "plateau", "constant"] = option(
        "cosine", "learning-rate schedule over --epochs"
    )
    batch_size: int = option(8, "examples per step and replica", type=cli.at_least(1))
    epochs: int = option(30, "maximum number of epochs", type=cli.at_least(1))
    patience: int = option(
        8, "early stopping: epochs without a better validation Dice", type=cli.at_least(0)
    )
    no_augment: bool = option(
        False, "no random flips and 90-degree rotations (in-plane for volumes)"
    )
    output_bias: Literal["prior", "zero"] = option(
        "prior",
        "initial output bias: the training set's lesion prior log(f/(1-f)), or 0 (p = 0.5)",
    )
    seed: int = option(42, "seed for data, split, initialization and augmentation")
    # The model's size (the scripts set their own defaults).
    base_filters: int = option(32, "filters at the first level", type=cli.at_least(1))
    depth: int = option(
        4, "levels, bottleneck included (pools depth-1 times)", type=cli.at_least(1)
    )
    # nnU-Net's variants of the network (unet.py).
    encoder: Literal["plain", "residual"] = option(
        "plain",
        "encoder blocks: plain (two convolutions per level) or residual (nnU-Net's ResEnc, "
        "in small form: unet.RESIDUAL_BLOCKS per level)",
    )
    deep_supervision: bool = option(
        False,
        "train a head at each decoder level too, weighted 1, 1/2, 1/4, ... (the lowest 0) against "
        "the masks down-sampled to match; the logged and saved model keeps the full-resolution one",
    )
    # Real data instead of the synthetic scans.
    data_dir: str | None = option(
        None,
        "train on the images in DIR: images/ + masks/ (PNG, JPEG, TIFF) or imagesTr/ + labelsTr/ "
        "(NIfTI, MSD / nnU-Net)",
        metavar="DIR",
        group="data",
    )
    dataset: str = option(
        "synthetic",
        "built-in data: synthetic scans, or white matter in the MNI152 T1 template (nilearn)",
        choices=("synthetic", "mni-wm"),
        group="data",
    )
    # nnU-Net's plan of the data (tp4/planning): any flag given still wins over it.
    plan: Literal["none", "auto"] = option(
        "none",
        "auto: measure the training volumes (spacings, shapes, intensities) and plan as nnU-Net "
        "does: resample every case to the target spacing, normalize by modality, choose the "
        "patch, --batch-size and --depth (python plan.py DIR shows the plan alone)",
    )
    modality: str | None = option(
        None,
        "--plan auto: CT (clipped to the foreground's 0.5-99.5 percentiles, z-scored with the "
        "dataset's statistics) or any other (z-score per image) [default: the dataset.json's, "
        "else other]",
    )
    planned: dict | None = option(None, "the plan, once made", flag=False)
    # Evaluation on the test set.
    tta: bool = option(
        False,
        "test-time mirroring: average the test predictions over every flip of the spatial axes",
    )
    nsd_tolerance: float = option(
        1.0,
        "normalized surface Dice tolerance, in the unit of the voxel spacing (mm or pixels)",
        type=cli.at_least(0, float),
    )
    # Speed: measured for this machine when `auto`; resolved values replace `auto`.
    precision: str = option(
        "auto",
        "compute precision (mixed: variables, output, losses and metrics in float32); auto: the "
        "fastest this machine supports, measured once and cached",
        choices=("auto", *speed.PRECISIONS),
    )
    xla: str | bool = option(
        "auto",
        "compile the steps with XLA; auto: where it is faster here",
        choices=speed.XLA_SETTINGS,
    )
    strategy: Literal["none", "mirrored", "multiworker"] = option(
        "none",
        "data-parallel training: mirrored (every GPU here, or --devices N CPU devices) or "
        "multiworker (the processes TF_CONFIG names); --batch-size is then per replica",
    )
    devices: int | None = option(
        None,
        "with --strategy mirrored: N logical devices of the CPU instead of the GPUs",
        metavar="N",
    )
    replicas: int = option(1, "replicas of the strategy, once started", flag=False)
    speed_choice: str = option("", "precision and XLA as chosen, with why", flag=False)
    # The MLflow run.
    experiment: str = option("tp4-unet", "MLflow experiment name")
    run_name: str | None = option(
        None, "MLflow run name [default: {Architecture}_{Loss}_{Optimizer}]"
    )
    no_system_metrics: bool = option(
        False,
        "do not record the machine's CPU, memory, disk, network (and GPU) use in the run's system "
        "metrics (MLflow samples them every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10)",
    )
    register: str | None = option(
        None, "also register the model in the MLflow model registry as NAME", metavar="NAME"
    )
    save_model: str | None = option(
        None,
        "also save the trained model as a .keras file (predict.py takes it, MLflow aside)",
        metavar="PATH.keras",
    )
    resume: str | None = option(
        None,
        "continue an interrupted run from its checkpoint, with the run's configuration: RUN_ID, "
        "or the newest unfinished run of --experiment",
        nargs="?",
        const=NEWEST,
        metavar="RUN_ID",
    )
    checkpoint_dir: str = option(
        "checkpoints",
        "where each run keeps its checkpoint: DIR/<run id>/, removed when the run finishes",
    )

    def to_json(self) -> dict:
        """The configuration as config.json holds it (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, document: dict) -> "Recipe":
        """The configuration a run logged, read back (settings it lacks keep their defaults, the
        ones this version no longer has are dropped)."""
        names = {field.name: field for field in dataclasses.fields(cls)}
        values = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in document.items()
            if name in names
        }
        return cls(**values)


def _argument_type(annotation):
    """(argparse type, choices) of a field's annotation: int, float, str, Literal[...], X | None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _argument_type(kinds[0])
    if typing.get_origin(annotation) is Literal:
        return None, typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], None
    return annotation, None


def parser(cls: type, prog: str, doc: str) -> argparse.ArgumentParser:
    """The command line of the dataclass `cls`: one flag per field (see the module docstring).

    Args:
        cls: a Recipe subclass.
        prog, doc: the script's name and docstring (its first paragraph is the description).
    """
    command_line = cli.argument_parser(prog, doc)
    groups = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        options = dict(field.metadata)
        if options.pop("flag", True) is False:
            continue
        group = options.pop("group", None)
        kind, literal = _argument_type(hints[field.name])
        if hints[field.name] is bool:
            options["action"] = "store_true"
        else:
            options.setdefault("type", kind)
            options["choices"] = options.get("choices") or literal
        target = command_line
        if group and group not in groups:
            groups[group] = command_line.add_mutually_exclusive_group()
        if group:
            target = groups[group]
        flag = "--" + field.name.replace("_", "-")
        default = options.pop("text_default", field.default)  # argparse parses a text default
        target.add_argument(flag, dest=field.name, default=default, **options)
    return command_line


def parse(cls: type, command_line: argparse.ArgumentParser, argv=None, xla_flags=("xla",)):
    """The configuration of a command line, checked: what a strategy cannot take is refused (XLA
    on, for each of `xla_flags`)."""
    config = cls(**vars(command_line.parse_args(argv)))
    distribute.check_arguments(command_line, config, xla_flags)
    return config


def given(command_line: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The fields whose flags appear in `argv`: parsed again with every default unset."""
    unset = object()
    probe = copy.deepcopy(command_line)
    probe.set_defaults(**dict.fromkeys(vars(command_line.parse_args([])), unset))
    return {name for name, value in vars(probe.parse_args(argv)).items() if value is not unset}
