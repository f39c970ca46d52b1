"""Validate an lmprune config and spell sparsity levels the same way everywhere.

The JSON schema in ``config/schema.yaml`` checks types, ranges and unknown keys and fills
defaults. The checks here cover what a schema cannot express: duplicates, sources that do not
exist, and sparsities that round to the same path. Every failure raises :class:`ConfigError` with
one message that names the offending value and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


class ConfigError(ValueError):
    """An lmprune config that cannot run, with a message naming the value and the fix."""


def sparsity_label(sparsity: float) -> str:
    """Return the path spelling of a sparsity fraction: 0.5 -> ``s50``, 0.875 -> ``s87.5``.

    The percent is rounded to 6 decimals so that float noise (0.07 * 100 = 7.000000000000001)
    does not leak into file names.
    """
    percent = round(sparsity * 100, 6)
    return f"s{percent:g}"


def sparsity_from_label(label: str) -> float:
    """Return the sparsity fraction of a path label: ``s87.5`` -> 0.875."""
    if not label.startswith("s"):
        raise ValueError(f"invalid sparsity label {label!r}: expected 's' and a percent, e.g. s50")
    return float(label[1:]) / 100


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def _validator_with_defaults(schema: dict) -> jsonschema.protocols.Validator:
    """Build a validator that also writes each property's ``default`` into the instance."""
    base = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = _copy(subschema["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    extended = jsonschema.validators.extend(base, {"properties": set_defaults})
    return extended(schema)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _location(error: jsonschema.ValidationError) -> str:
    location = "config"
    for part in error.absolute_path:
        location += f"[{part}]" if isinstance(part, int) else f".{part}"
    return location


def _describe(error: jsonschema.ValidationError) -> str:
    """Turn a schema error into one sentence with the value and the fix."""
    where = _location(error)
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        return (
            f"unknown key {', '.join(map(repr, unknown))} in {where}. "
            f"Allowed keys: {', '.join(allowed)}. Check the spelling or remove the key."
        )
    if kind == "required":
        return f"{where} is missing the key {error.message.split()[0]}. Add it (see config/schema.yaml)."
    if kind == "enum":
        choices = ", ".join(map(str, error.validator_value))
        return f"{where} = {error.instance!r} is invalid. Use one of: {choices}."
    if kind in ("minimum", "maximum", "type", "pattern", "minItems", "uniqueItems", "minProperties"):
        return f"{where} = {error.instance!r} is invalid: {error.message}. See config/schema.yaml."
    return f"{where} is invalid: {error.message}. See config/schema.yaml."


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` in place, fill defaults and return it.

    Raises:
        ConfigError: on the first problem found, naming the value and the fix.
    """
    if not isinstance(config, dict) or not config:
        raise ConfigError("the config is empty. Start from config/config.yaml.")

    validator = _validator_with_defaults(schema or load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda error: list(error.absolute_path))
    if errors:
        # Report the deepest error of the first branch: it names the offending value.
        raise ConfigError(_describe(errors[0]))

    _check_sparsities(config["sparsities"])
    _check_model_names(config["models"])
    for index, model in enumerate(config["models"]):
        _check_source(model["source"], f"config.models[{index}].source ({model['name']})")
    return config


def _check_sparsities(sparsities: list[float]) -> None:
    labels: dict[str, float] = {}
    for index, sparsity in enumerate(sparsities):
        if not (0 <= sparsity < 1) or math.isnan(sparsity):
            raise ConfigError(
                f"config.sparsities[{index}] = {sparsity!r} is outside [0, 1). "
                "Write sparsities as fractions, e.g. 0.5 for 50%."
            )
        label = sparsity_label(sparsity)
        if label in labels:
            raise ConfigError(
                f"config.sparsities lists {labels[label]!r} and {sparsity!r}, which are the same "
                f"level ({label}). Remove one of them."
            )
        labels[label] = sparsity


def _check_model_names(models: list[dict]) -> None:
    seen: set[str] = set()
    for index, model in enumerate(models):
        if model["name"] in seen:
            raise ConfigError(
                f"config.models[{index}].name = {model['name']!r} is used by two models. "
                "Give each model its own name, because the name is part of every output path."
            )
        seen.add(model["name"])


def _check_source(source: dict, where: str) -> None:
    kinds = [kind for kind in ("hub", "path", "package") if kind in source]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where} names {kinds or 'no source'}: give exactly one of hub, path or package."
        )
    if "revision" in source and "hub" not in source:
        raise ConfigError(f"{where}: revision applies only to hub sources. Remove it.")
    if "subfolder" in source and "package" not in source:
        raise ConfigError(f"{where}: subfolder applies only to package sources. Remove it.")

    if "path" in source:
        folder = Path(source["path"]).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{where}: model folder {str(folder)!r} not found or has no config.json. "
                "Point path at a folder written by save_pretrained, or use hub: for a hub model."
            )
    if "package" in source:
        from lmprune.models import package_model_folder  # noqa: PLC0415 (avoids a cycle)

        try:
            folder = package_model_folder(source["package"], source.get("subfolder", "."))
        except FileNotFoundError as error:
            raise ConfigError(f"{where}: {error}") from None
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{where}: {str(folder)!r} inside package {source['package']!r} has no "
                "config.json. Set subfolder to the transformers folder inside the package."
            )


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it (see :func:`validate_config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found.")
    with open(path) as handle:
        config = yaml.safe_load(handle)
    return validate_config(config)


# Files each task reads from a local data folder, laid out like the hub-free copies:
# CLM trains on WikiText-2 valid and evaluates on test; QNLI splits the dev TSV in two.
LOCAL_DATA_FILES = {
    "clm": ("wikitext-2/valid.txt", "wikitext-2/test.txt"),
    "qnli": ("qnli/dev.tsv",),
}


def check_data_dir(data_dir: str | Path, tasks: list[str]) -> None:
    """Check that ``data_dir`` has the local files every task in ``tasks`` reads.

    Raises:
        ConfigError: naming the first missing file and the expected layout.
    """
    for task in tasks:
        for relative in LOCAL_DATA_FILES[task]:
            path = Path(data_dir) / relative
            if not path.is_file():
                layout = ", ".join(name for names in LOCAL_DATA_FILES.values() for name in names)
                raise ConfigError(
                    f"{str(path)!r} not found (task {task}). The local data folder {str(data_dir)!r} "
                    f"must contain {layout}; set data.local_dir or LMPRUNE_DATA_DIR to such a folder, "
                    "or leave both empty to read the hub."
                )
