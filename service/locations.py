"""Where a job may read its model and data from: hub IDs, or local paths under the configured roots."""

import re
from pathlib import Path

from service.problems import field_error
from service.settings import Settings

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..")


def resolve_model(settings: Settings, model: str) -> str:
    """The model string the worker loads: a hub ID as given, or a resolved local path inside a model root."""
    loc = ["body", "model"]
    if _local(model):
        # resolve() follows symlinks and "..", so a link inside a root cannot point outside it.
        path = Path(model).expanduser().resolve()
        if not _under(path, settings.model_roots):
            # The roots are the server's layout: named to its operator (CONSA_MODEL_ROOTS), never to a client.
            raise field_error(422, loc, "model path is outside the server's model roots (CONSA_MODEL_ROOTS); "
                                        "ask its operator where models go", "model_path_not_allowed")
        return str(path)
    if not _HUB_ID.fullmatch(model) or ".." in model:
        raise field_error(422, loc, "expected a hub model ID (org/name) or an absolute local path", "invalid_model")
    if not settings.allow_hub_models:
        raise field_error(422, loc, "this server only loads local models (CONSA_ALLOW_HUB_MODELS=false)",
                          "hub_models_disabled")
    return model


def resolve_dataset(settings: Settings, dataset: str | None) -> str:
    loc = ["body", "dataset"]
    if dataset is None:
        if settings.default_dataset is None:
            raise field_error(422, loc, "dataset is required: this server has no default dataset", "dataset_required")
        dataset = str(settings.default_dataset)
    if not Path(dataset).expanduser().is_absolute():
        raise field_error(422, loc, "dataset must be an absolute path under one of the server's data roots",
                          "dataset_path_not_allowed")
    path = Path(dataset).expanduser().resolve()
    if not _under(path, settings.data_roots):
        raise field_error(422, loc, "dataset path is outside the server's data roots (CONSA_DATA_ROOTS); "
                                    "ask its operator where datasets go", "dataset_path_not_allowed")
    return str(path)
