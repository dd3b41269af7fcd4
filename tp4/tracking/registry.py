"""The model registry by aliases: a registered model's versions, and names that point at one.

What this module teaches: MLflow's stages (Staging, Production) are deprecated; a version is named
by aliases instead (`models:/tp4-unet@champion`). `train.py --register NAME` adds a version and
points `@candidate` at it; `report.py --promote RUN NAME@champion` points an alias at the version
a run logged. predict.py and `mlflow models serve` load `models:/NAME@ALIAS` as any model URI, so
that moving an alias changes the model they use, with no change to their command lines.
"""

from mlflow import MlflowClient

CANDIDATE = "candidate"


def set_alias(name: str, alias: str, version) -> None:
    """Point `alias` of the registered model `name` at `version` (MLflow moves it if it is set)."""
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def promote(run_id: str, target: str) -> tuple[str, str]:
    """Point the alias of `target` (NAME@ALIAS) at the version of NAME that run `run_id` logged;
    returns (the version, the model URI that names it). ValueError (one line) if no such version.

    Args:
        run_id: a run whose model was registered under NAME (train.py --register NAME).
        target: NAME@ALIAS, e.g. tp4-unet@champion.
    """
    name, _, alias = target.partition("@")
    if not (name and alias):
        raise ValueError(f"{target!r}: give the registered model and its alias as NAME@ALIAS")
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        raise ValueError(
            f"no version of the registered model {name!r} comes from run {run_id} "
            f"(train.py --register {name} registers a run's model)"
        )
    version = max(versions, key=lambda v: int(v.version)).version
    set_alias(name, alias, version)
    return version, f"models:/{name}@{alias}"
