"""Exercise 3: volumetric segmentation with Conv3D, its memory cost, and sliding-window inference.

What this script teaches:
- a Conv3D kernel also slides along depth: k³ weights per input/output channel pair instead of k²
  (27 vs 9 for k=3), so it sees the structure across slices that a 2D network, slice by slice,
  cannot;
- the price is memory: every activation has a depth axis too. The levers the TP names (kernel
  3x3x3 vs 2x2x2, fewer filters, fewer slices, mixed precision) are measured (`--levers`:
  tp4/perf/memory.py), not asserted: bfloat16 halves the activations everywhere, and is also
  faster where the CPU has bfloat16 arithmetic;
- a volume larger than the training patch is segmented by overlapping patches whose outputs are
  blended (geometry.sliding_window_predict, which predict.py uses), as in MONAI and nnU-Net;
- training follows the same recipe as train.py (tp4/training/recipe.py) and is tracked in MLflow
  the same way: experiment `tp4-conv3d`, runs `Conv3D_Baseline` (float32) or
  `Conv3D_MixedPrecision`, and `UNet2D_Slices` for the 2D U-Net on the same volumes' slices.

The 3D U-Net is unet.build_unet3d: unet.py's blocks with Conv3D layers.

    python conv3d.py                       # training on synthetic volumes, tracked in MLflow
    python conv3d.py --summary --levers    # first the layers, Conv2D vs Conv3D, memory levers
    python conv3d.py --precision bfloat16  # the same training in mixed bfloat16 (auto: fastest)
    python conv3d.py --skip-training       # the Exercise 3 demo: architecture and memory tables
    python conv3d.py --dataset mni-wm      # white matter in 3D patches of a real T1 MRI (MNI152)
    python conv3d.py --folds 5             # 5-fold cross-validation by volume, nested MLflow runs
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import argparse
import dataclasses
import sys

import keras
import mlflow
import numpy as np

import data
import losses
import unet
from tp4 import cli
from tp4.distributed import distribute
from tp4.images import figures
from tp4.perf import hardware, memory, speed
from tp4.planning import auto
from tp4.tracking import epochs, registry, runs, store
from tp4.training import checkpoint, config, crossval, divergence, folds, recipe, resume
from tp4.training.config import default_of, option


@dataclasses.dataclass(frozen=True)
class Config(folds.Settings, config.Recipe):
    """conv3d.py's settings. With the recipe's (tp4/training/config.py), whose defaults change here
    for a few epochs of a small 3D U-Net, and cross-validation's (tp4/training/folds.py: its cases
    are volumes)."""

    n_volumes: int = option(40, "synthetic volumes (split 70/15/15)", type=cli.at_least(1))
    shape: tuple[int, int, int] = option(
        (32, 64, 64),
        "patch size: the synthetic volumes, or the patches real volumes are cut into",
        type=cli.at_least(1),
        nargs=3,
        metavar=("D", "H", "W"),
    )
    foreground: float = option(data.FOREGROUND, "mean lesion fraction of the voxels")
    kernel_size: int = option(3, "Conv3D kernel size k (k x k x k)", type=cli.at_least(1))
    summary: bool = option(False, "print the layers of the 3D U-Net and Conv2D vs Conv3D first")
    levers: bool = option(
        False, "measure the memory levers first (a fresh process per lever: about a minute)"
    )
    no_peak_memory: bool = option(False, "--levers without the peak memory of fresh processes")
    skip_training: bool = option(
        False, "the Exercise 3 demo: only the architecture and memory tables, no training"
    )
    compare_2d: bool = option(False, "also train a 2D U-Net on the slices of the same volumes")
    slice_batch_size: int = option(
        16,
        "--compare-2d: slices per step (16 slices: about the compute of one 3D step)",
        type=cli.at_least(1),
    )
    slice_xla: str | bool = option(
        "auto",
        "--compare-2d: XLA for the 2D U-Net (its precision is --precision's)",
        choices=speed.XLA_SETTINGS,
    )
    slices: bool = option(False, "this run is the 2D U-Net on slices", flag=False)
    batch_size: int = default_of(config.Recipe, "batch_size", 2)
    epochs: int = default_of(config.Recipe, "epochs", 8)
    patience: int = default_of(config.Recipe, "patience", 4)
    base_filters: int = default_of(config.Recipe, "base_filters", 8)
    depth: int = default_of(config.Recipe, "depth", 3)
    experiment: str = default_of(config.Recipe, "experiment", "tp4-conv3d")


def command_line() -> argparse.ArgumentParser:
    return config.parser(Config, "conv3d.py", __doc__)


def parse_args(argv=None) -> Config:
    """The configuration of a command line; a contradiction is refused by argparse (exit 2)."""
    parser = command_line()
    settings = config.parse(Config, parser, argv, xla_flags=("xla", "slice_xla"))
    if cross_validation(settings):
        if settings.compare_2d or settings.skip_training or settings.save_model:
            parser.error(
                "--folds and --fold train K 3D models: not with --compare-2d, --skip-training "
                "or --save-model"
            )
        if settings.resume and settings.fold is None:
            parser.error("--resume continues one fold's run: --resume RUN_ID of that fold")
    if settings.splits and not cross_validation(settings):
        parser.error("--splits goes with --folds or --fold")
    return settings


def cross_validation(settings: Config) -> bool:
    return settings.folds is not None or settings.fold is not None


def load_volumes(config: Config):
    """(splits, description, test cases): synthetic volumes (test cases None), or real ones
    (--data-dir, --dataset) cut into --shape patches, a padding of shallow volumes said."""
    source = config.data_dir or (None if config.dataset == "synthetic" else config.dataset)
    if source:
        splits, description, cases = auto.load_split(
            config.planned, source, config.shape, config.seed
        )
        if "data_padded" in description:
            print(f"{source}: {description['data_padded']} (--shape {config.shape})")
    else:
        images, masks = data.make_synthetic_3d(
            config.n_volumes, config.shape, config.seed, foreground=config.foreground
        )
        splits = data.split(images, masks, seed=config.seed)
        description, cases = data.describe(images, masks, "synthetic-3d", splits), None
    data.require_foreground(splits, description["data_source"])
    return splits, description, cases


def build_3d(config: Config, output_bias=0.0) -> keras.Model:
    """The 3D U-Net of the configuration, at the global dtype policy, with the fused batch norm."""
    return unet.build_unet3d(
        (*config.shape, 1),
        config.base_filters,
        config.depth,
        config.kernel_size,
        output_bias,
        batch_norm=distribute.batch_norm(config),
        encoder=config.encoder,
        deep_supervision=config.deep_supervision,
    )


def build_2d(config: Config, output_bias=0.0) -> keras.Model:
    """A 2D U-Net of the same filters, depth and kernel, for the volumes' slices."""
    return unet.build_unet(
        (*config.shape[1:], 1),
        config.base_filters,
        config.depth,
        kernel_size=config.kernel_size,
        batch_norm=distribute.batch_norm(config),
        output_bias=output_bias,
        name="UNet2D",
        encoder=config.encoder,
        deep_supervision=config.deep_supervision,
    )


def train3d(config: Config, loaded=None, memory_rows=None) -> dict:
    """A tracked 3D training run (same MLflow conventions as train.py); `loaded`: load_volumes'
    result if done already (or a fold's)."""
    splits, description, test_cases = loaded or load_volumes(config)
    tables = {"memory_levers.json": {"rows": memory_rows}} if memory_rows else {}
    return fit_and_log(config, build_3d, splits, description, test_cases, tables)


def train_on_slices(config: Config, loaded=None) -> dict:
    """The 2D side of Conv2D vs Conv3D: a 2D U-Net (same filters and depth) trained on the slices of
    the same volumes, same split, its own batch (--slice-batch-size) and XLA (--slice-xla). Its
    global test Dice pools all test voxels, so it compares with the 3D run's directly."""
    volumes, description, volume_cases = loaded or load_volumes(config)
    splits = {
        name: (x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:]))
        for name, (x, y) in volumes.items()
    }
    slice_cases = None  # real data: each test volume's slices, with their in-plane voxel size
    if volume_cases:
        depth = config.shape[0]
        slice_cases = data.Cases(
            [f"{case} slice {z}" for case in volume_cases.ids for z in range(depth)],
            np.repeat(volume_cases.spacing[:, 1:], depth, axis=0),
        )
    description = {**description, "data_slices": "2D slices of the volumes"}
    own = dict(batch_size=config.slice_batch_size, xla=config.slice_xla, save_model=None)
    slice_config = dataclasses.replace(config, **own, slices=True)
    return fit_and_log(slice_config, build_2d, splits, description, slice_cases)


def fit_and_log(config: Config, build, splits, description, test_cases, tables=None) -> dict:
    """Train the model `build(config, bias)` makes on `splits` in one tracked MLflow run; returns
    the test metrics and where the run is (run_id, experiment_id, model_uri)."""
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    # Precision and XLA for this machine (measured once, cached); then everything seeded. The 2D
    # run records its resolved XLA as slice_xla, so that --resume does not choose again.
    config = recipe.choose_speed(config, lambda: build(config))
    config = dataclasses.replace(config, slice_xla=config.xla) if config.slices else config
    keras.utils.set_random_seed(config.seed)
    with speed.policy_scope(config.precision), distribute.strategy(config).scope():
        model = build(config, recipe.prior_bias(config, y_train))
        model.compile(
            loss=recipe.loss(config, model),  # at every head with --deep-supervision
            optimizer=recipe.optimizer(config, len(x_train)),
            jit_compile=config.xla,
            metrics=losses.overlap_metrics(model, unet.heads(model)),
        )
    kind = "Baseline" if config.precision == "float32" else "MixedPrecision"
    name = config.run_name or ("UNet2D_Slices" if config.slices else f"Conv3D_{kind}")
    unit = "slices" if config.slices else "volumes"
    split = "/".join(str(len(x)) for x, _ in splits.values())
    shape = "x".join(map(str, x_train.shape[1:]))
    print(
        f"\n{name}: {split} train/val/test {unit} of {shape}, {model.count_params():,} parameters"
    )
    xla = "on" if config.xla else "off"
    speed_line = f"batch {config.batch_size}, {config.precision}, XLA {xla}"
    print(f"  foreground {y_train.mean():.1%} of voxels, {speed_line}{distribute.describe(config)}")

    # The MLflow run: it ends FINISHED, FAILED or KILLED, never left RUNNING.

    tracked = runs.tracked_run(
        config.experiment,
        name,
        config.checkpoint_dir,
        config.resume,
        data=description,
        system_metrics=not config.no_system_metrics,
    )
    with tracked as run, distribute.lost_workers(config):  # a lost worker: one line, run FAILED
        mlflow.set_tag("speed_choice", config.speed_choice)  # this process's, resumed or not
        if not config.resume:  # a resumed run logged them when it started
            architecture = {"architecture": "UNet2D on slices"} if config.slices else {}
            mlflow.log_params({**unet.describe(model), **architecture, **recipe.params(config)})
            mlflow.log_params({"output_bias": config.output_bias, **description})
            mlflow.log_input(runs.dataset(description, splits, config.seed), context="training")
            auto.log(config.planned)  # --plan auto: plan.json and plan_* params
            resolved = dataclasses.replace(
                config, lr=recipe.peak_learning_rate(config), run_name=name
            )
            for artifact, document in {"config.json": resolved.to_json(), **(tables or {})}.items():
                mlflow.log_dict(document, artifact)

        # Training, with a checkpoint after every epoch: a resumed run continues from its last one.
        train_set, val_set, eval_batch = recipe.datasets(config, splits)
        stopping = recipe.stopping(config)
        saved = checkpoint.Checkpoint(run.folder, stopping)
        saved.restore(model, train_set, config.epochs)
        per_epoch = recipe.epoch_size(len(x_train), config)[1]
        logger = epochs.EpochLogger(
            run, saved, per_epoch, config.epochs, "img" if config.slices else "vol"
        )
        validation = distribute.validation(config, splits["val"], eval_batch)
        guard = divergence.DivergenceGuard(saved)
        model.fit(
            train_set,
            epochs=saved.last_epoch(config.epochs),
            initial_epoch=saved.epoch,
            callbacks=[*validation, guard, *stopping, saved, logger],
            validation_data=val_set,
            verbose=0,
            shuffle=False,  # the pipeline shuffles, from the seed
        )

        # Evaluation on the test volumes (or slices), never seen by early stopping; then logging,
        # of the full-resolution output only (--deep-supervision's other heads dropped).
        model = recipe.inference_model(model)
        results, probabilities, table = recipe.evaluate(
            model, x_test, y_test, eval_batch, config.tta, test_cases, config.nsd_tolerance
        )
        results.update(recipe.fit_results(saved.history, saved.state["fit_seconds"]))
        draw = figures.prediction_figure if config.slices else figures.orthogonal_slices_figure
        with run.results(model):
            mlflow.log_dict(table, "test_cases.json")
            mlflow.log_metrics(run.not_logged(results))
            mlflow.log_figure(draw(x_test, y_test, probabilities), "test_predictions.png")
            curves = figures.training_curves(saved.history, results["best_epoch"])
            mlflow.log_figure(curves, "training_curves.png")
            mlflow.log_text(model.to_json(indent=2), "model_config.json")
            logged_model = registry.log_keras_model(
                model, (x_test[:1], probabilities[:1]), config.register
            )
    if config.save_model:
        cli.save_model(model, config.save_model, auto.model_entries(config.planned))
    recipe.print_results(name, results, len(x_test), config.nsd_tolerance)
    return {**results, **run.location(logged_model)}


def print_tables(config: Config) -> list | None:
    """The Exercise 3 tables: the 3D U-Net's layers and Conv2D vs Conv3D (--summary), the memory
    levers measured (--levers); both with --skip-training. Returns the levers' rows, if measured."""
    demo = config.skip_training
    if config.summary or demo:
        model = unet.build_unet3d(
            (*config.shape, 1), config.base_filters, config.depth, config.kernel_size
        )
        model.summary(line_length=100)
        memory.print_comparison(config.shape, config.base_filters, config.depth, config.kernel_size)
    if not (config.levers or demo):
        return None
    rows = memory.measure_levers(
        config.shape,
        config.base_filters,
        config.depth,
        config.batch_size,
        not config.no_peak_memory,
    )
    memory.print_levers(rows, config.batch_size)
    return rows


def main(argv=None):
    settings = parse_args(argv)
    cli.setup()
    hardware.describe_cpu_in_background()  # ready by the speed choice
    with cli.command_line_errors(command_line()), distribute.lost_workers(settings):
        chief = distribute.is_chief(settings)  # under multiworker, the one that talks to MLflow
        if chief and (settings.resume or not settings.skip_training):
            store.open_store()
            if settings.resume:
                argv = sys.argv[1:] if argv is None else argv
                settings = resume.configuration(settings, command_line(), argv)
        if chief and settings.plan == "auto" and not settings.skip_training:  # flags kept
            given = config.given(command_line(), sys.argv[1:] if argv is None else argv)
            settings = auto.configure(settings, given, "shape")
        settings = distribute.setup(settings)  # multiworker: the chief's configuration everywhere
        if cross_validation(settings):  # tp4/training/crossval.py; a fold's --resume too
            crossval.run(settings, train3d, load_volumes, build_3d)
            if chief:
                print(f"\nnext: {cli.script('report.py')} {settings.experiment} --cv")
            distribute.wait_for_the_chief(settings)
            return
        if settings.resume:  # only the interrupted run (its config.json says which of the two)
            outcome = train_on_slices(settings) if settings.slices else train3d(settings)
        else:
            loaded = None if settings.skip_training else load_volumes(settings)  # bad data: now
            rows = print_tables(settings) if chief else None
            if settings.skip_training:
                return
            outcome = train3d(settings, loaded, rows)
            if settings.compare_2d:
                slices = train_on_slices(settings, loaded)
                print(
                    f"\nsame test volumes, global Dice: Conv3D {outcome['test_dice']:.4f}, "
                    f"2D U-Net on slices {slices['test_dice']:.4f}"
                )
        if chief:
            cli.print_next_steps(outcome, mlflow.get_tracking_uri(), settings.save_model)
        distribute.wait_for_the_chief(settings)


if __name__ == "__main__":
    cli.run(main)
