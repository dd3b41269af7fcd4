"""Exercise 2.3: train the U-Net on synthetic scans or real images, every experiment in MLflow.

What this script teaches:
- a training recipe for segmentation: BCE + Dice loss, Adam, cosine learning-rate decay, flips and
  90-degree rotations, early stopping on validation Dice with the best weights restored;
- honest evaluation: the final numbers come from a held-out test set never used for early stopping,
  computed with metrics.py's exact reference functions;
- experiment tracking: params, one value per epoch for each metric, final test metrics, figures and
  the model itself, in MLflow's local store (`mlflow.db` here; `MLFLOW_TRACKING_URI` to use
  another). See them with `mlflow ui` run from this directory;
- speed chosen for the machine: `--precision auto --xla auto` (the defaults) decide from what the
  hardware does (a convolution timed in a second, XLA only where it can win), measure on the model
  only what that leaves open, and keep it (tp4/perf/speed.py, PERFORMANCE.md).

The script reads top to bottom as the exercise: its settings (one frozen dataclass: `Config`, with
the recipe's settings in tp4/training/config.py), then in `train`: the data, the model, `compile`,
the MLflow run and its params, `fit` with its callbacks (checkpoint, divergence guard, one line and
one MLflow value per epoch), the test evaluation, and its metrics, figures and model logged.

    python train.py                               # the main job: the TP's setting
    python train.py --loss dice --optimizer sgd   # one cell of the loss x optimizer comparison
    python train.py --grid --image-size 64 --foreground 0.015 --contrast 0.2   # all the cells
    python train.py --dataset mni-wm              # white matter in a real T1 MRI (MNI152)
    python train.py --data-dir DIR                # images/ + masks/, or imagesTr/ + labelsTr/
    python train.py --strategy mirrored           # every GPU of the machine (tp4/distributed)
    python train.py --folds 5                     # 5-fold cross-validation, nested MLflow runs
"""

# First, before anything loads TensorFlow: its start-up notices filtered out (tp4/startup.py).
from tp4 import startup  # noqa: F401

# isort: split
import argparse
import dataclasses
import sys

import keras
import mlflow

import data
import losses
import unet
from tp4 import cli
from tp4.distributed import distribute
from tp4.images import figures
from tp4.perf import hardware, speed
from tp4.planning import auto
from tp4.tracking import epochs, registry, runs, store
from tp4.training import checkpoint, config, crossval, divergence, folds, grid, recipe, resume
from tp4.training.config import option
from tp4.training.grid import parse_shard


@dataclasses.dataclass(frozen=True)
class Config(folds.Settings, config.Recipe):
    """train.py's settings. With the recipe's (tp4/training/config.py: loss, optimizer, epochs,
    seed, precision, the MLflow run...) and cross-validation's (tp4/training/folds.py), their
    defaults are the TP's main job."""

    image_size: int = option(
        128,
        "height and width of the network's input (and of the synthetic images); real images are "
        "shrunk to fit and padded",
        type=cli.at_least(1),
    )
    n_images: int = option(200, "synthetic images (split 70/15/15)", type=cli.at_least(1))
    foreground: float = option(data.FOREGROUND, "mean lesion share of the pixels")
    contrast: float = option(data.CONTRAST, "lesion brightness above the tissue")
    noise: float = option(data.NOISE, "Rician noise level")
    num_classes: int = option(
        2,
        "classes, background included: 2 is a binary mask (one sigmoid output), C >= 3 a softmax "
        "over C classes (synthetic data: C-1 kinds of lesion; real masks: labels 0..C-1)",
        type=cli.at_least(2),
    )
    no_skip: bool = option(False, "U-Net without skip connections (ablation: UNetNoSkip_...)")
    grid: bool = option(False, "run every loss x optimizer as separate runs and print a table")
    shard: tuple[int, int] = option(
        (0, 1),
        "with --grid: run only its cells I, I+N, I+2N, ... (I from 0 to N-1), so that N machines "
        "or processes share the grid, logging to one tracking server",
        type=parse_shard,
        metavar="I/N",
        text_default="0/1",
    )


def command_line() -> argparse.ArgumentParser:
    return config.parser(Config, "train.py", __doc__)


def parse_args(argv=None) -> Config:
    """The configuration of a command line; a contradiction is refused by argparse (exit 2)."""
    parser = command_line()
    settings = config.parse(Config, parser, argv)
    if settings.shard != (0, 1) and not settings.grid:
        parser.error("--shard goes with --grid")
    if settings.grid and settings.save_model:
        parser.error("--save-model saves one model: it does not go with --grid")
    if settings.grid and settings.resume not in (None, config.NEWEST):
        parser.error("--grid --resume finishes the grid's cells: it takes no run id")
    if not grid.cells(settings.shard):
        shard = "/".join(map(str, settings.shard))
        parser.error(f"--shard {shard}: the grid has {len(grid.cells())} cells")
    cross_validation = settings.folds is not None or settings.fold is not None
    if cross_validation and (settings.grid or settings.save_model):
        parser.error("--folds and --fold train K models: not with --grid or --save-model")
    if settings.resume and settings.folds is not None and settings.fold is None:
        parser.error("--resume continues one fold's run: --resume RUN_ID of that fold")
    if settings.splits and not cross_validation:
        parser.error("--splits goes with --folds or --fold")
    if settings.save_model:
        try:  # checked now, not after the training
            cli.check_output_file("--save-model", settings.save_model, ".keras")
        except ValueError as error:
            parser.error(str(error))
    return settings


def load_data(config: Config):
    """(splits, description, test cases): synthetic scans (test cases None: named by position,
    pixels of 1), or real data (--data-dir, --dataset), checked before any run."""
    source = config.data_dir or (None if config.dataset == "synthetic" else config.dataset)
    if source:
        print(f"reading and checking {source}", flush=True)
        size = (config.image_size, config.image_size)
        splits, description, cases = auto.load_split(
            config.planned, source, size, config.seed, config.num_classes
        )
    else:
        size = f"{config.image_size}x{config.image_size}"
        print(
            f"generating {config.n_images} synthetic {size} scans (seed {config.seed})", flush=True
        )
        images, masks = data.make_synthetic_2d(
            config.n_images,
            config.image_size,
            config.seed,
            foreground=config.foreground,
            contrast=config.contrast,
            noise=config.noise,
            num_classes=config.num_classes,
        )
        splits = data.split(images, masks, seed=config.seed)
        description, cases = data.describe(images, masks, "synthetic-2d", splits), None
        description.update(data_contrast=config.contrast, data_noise=config.noise)
    data.require_foreground(splits, description["data_source"])
    return splits, description, cases


def build_model(config: Config, output_bias=0.0) -> keras.Model:
    """The U-Net of the configuration, at the global dtype policy, with the fused batch norm."""
    return unet.build_unet(
        (config.image_size, config.image_size, 1),
        config.base_filters,
        config.depth,
        num_classes=1 if config.num_classes == 2 else config.num_classes,
        batch_norm=distribute.batch_norm(config),
        skip_connections=not config.no_skip,
        output_bias=output_bias,
        name=("ResEnc" if config.encoder == "residual" else "")
        + ("UNetNoSkip" if config.no_skip else "UNet"),
        encoder=config.encoder,
        deep_supervision=config.deep_supervision,
    )


def train(config: Config, loaded=None) -> dict:
    """One tracked U-Net training run on 2D images (`loaded`: load_data's result, or a fold's).

    Returns:
        The test metrics, and where the run is: run_id, experiment_id, model_uri.
    """
    # Data: synthetic scans or a folder, checked before anything else starts.
    splits, description, test_cases = loaded or load_data(config)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]

    # Precision and XLA for this machine (measured once, cached); then everything seeded.
    config = recipe.choose_speed(config, lambda: build_model(config))
    keras.utils.set_random_seed(config.seed)

    # The model and its recipe: loss, optimizer and schedule, exact Dice and IoU over each epoch.
    with speed.policy_scope(config.precision), distribute.strategy(config).scope():
        model = build_model(config, recipe.prior_bias(config, y_train, config.num_classes))
        model.compile(
            optimizer=recipe.optimizer(config, len(x_train)),
            loss=recipe.loss(config, model),  # at every head with --deep-supervision
            metrics=losses.overlap_metrics(model, unet.heads(model)),
            jit_compile=config.xla,
        )
    name = recipe.run_name(model, config)
    print(
        f"{name}: {description['data_split']} train/val/test images of "
        f"{description['data_shape']}, foreground {description['data_foreground_fraction']:.1%} "
        f"of pixels, {model.count_params():,} parameters, {config.precision}, "
        f"XLA {'on' if config.xla else 'off'}{distribute.describe(config)}"
    )

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
            classes = {"num_classes": config.num_classes, "output_bias": config.output_bias}
            mlflow.log_params({**unet.describe(model), **classes, **recipe.params(config)})
            mlflow.log_params(description)  # the data: source, split, shape, hash...
            auto.log(config.planned)  # --plan auto: plan.json and plan_* params
            mlflow.log_input(runs.dataset(description, splits, config.seed), context="training")
            resolved = dataclasses.replace(
                config, lr=recipe.peak_learning_rate(config), run_name=name
            )
            mlflow.log_dict(resolved.to_json(), "config.json")  # what --resume reads back

        # Training, with a checkpoint after every epoch: a resumed run continues from its last one.
        train_set, val_set, eval_batch = recipe.datasets(config, splits)
        stopping = recipe.stopping(config)
        saved = checkpoint.Checkpoint(run.folder, stopping)
        saved.restore(model, train_set, config.epochs)
        examples_per_epoch = recipe.epoch_size(len(x_train), config)[1]
        model.fit(
            train_set,
            validation_data=val_set,
            initial_epoch=saved.epoch,
            epochs=saved.last_epoch(config.epochs),
            callbacks=[
                *distribute.validation(config, splits["val"], eval_batch),
                divergence.DivergenceGuard(saved),
                *stopping,
                saved,
                epochs.EpochLogger(run, saved, examples_per_epoch, config.epochs),
            ],
            shuffle=False,  # the pipeline shuffles, from the seed
            verbose=0,
        )

        # Evaluation on the test set, never seen by early stopping, by the model that is logged:
        # the full-resolution output only (--deep-supervision's other heads dropped).
        model = recipe.inference_model(model)
        results, probabilities, table = recipe.evaluate(
            model, x_test, y_test, eval_batch, config.tta, test_cases, config.nsd_tolerance
        )
        results.update(recipe.fit_results(saved.history, saved.state["fit_seconds"]))

        # Logging: test metrics, figures, the per-case table and the model.
        with run.results(model):
            mlflow.log_metrics(run.not_logged(results))
            curves = figures.training_curves(saved.history, results["best_epoch"])
            mlflow.log_figure(curves, "training_curves.png")
            pictures = figures.prediction_figure(x_test, y_test, probabilities)
            mlflow.log_figure(pictures, "test_predictions.png")
            mlflow.log_dict(table, "test_cases.json")
            mlflow.log_text(model.to_json(indent=2), "model_config.json")
            example = (x_test[:1], probabilities[:1])
            logged_model = registry.log_keras_model(model, example, config.register)
    if config.save_model:
        cli.save_model(model, config.save_model, auto.model_entries(config.planned))
    recipe.print_results(name, results, len(x_test), config.nsd_tolerance)
    return {**results, **run.location(logged_model)}


def main(argv=None):
    settings = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    cli.setup()
    hardware.describe_cpu_in_background()  # ready by the speed choice
    with cli.command_line_errors(command_line()), distribute.lost_workers(settings):
        chief = distribute.is_chief(settings)  # under multiworker, the one that talks to MLflow
        if chief:
            store.open_store()
            if settings.resume and not settings.grid:  # the grid resumes cell by cell
                settings = resume.configuration(settings, command_line(), argv)
            if settings.plan == "auto":  # the data's plan, every flag given kept
                given = config.given(command_line(), sys.argv[1:] if argv is None else argv)
                settings = auto.configure(settings, given, "image_size")
        settings = distribute.setup(settings)  # multiworker: the chief's configuration everywhere
        if settings.folds is not None or settings.fold is not None:  # tp4/training/crossval.py
            crossval.run(settings, train, load_data, build_model)
            if chief:
                print(f"\nnext: {cli.script('report.py')} {settings.experiment} --cv")
        elif settings.grid:
            grid.run(settings, train, command_line(), argv)
            if chief:
                print(
                    f"\nnext: {cli.script('report.py')} {settings.experiment} "
                    "--params loss,optimizer"
                )
        else:
            outcome = train(settings)
            if chief:
                cli.print_next_steps(outcome, mlflow.get_tracking_uri(), settings.save_model)
        distribute.wait_for_the_chief(settings)


if __name__ == "__main__":
    cli.run(main)
