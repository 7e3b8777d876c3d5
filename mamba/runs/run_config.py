"""The run's config.yaml and the tokenizer its training data was packed with.

The trainer writes the resolved config into its save_folder at start (write_run_config); the
tools read it back (mamba.runs.checkpoints.find_run_config) to rebuild the model a checkpoint
holds. Both use CONFIG_NAME, so the name lives in one place.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mamba.config.load import to_dict
from mamba.config.schema import TrainConfig
from mamba.data.manifest import INDEX_NAME, TOKENIZER_NAME, read_index
from mamba.files import write_atomic

CONFIG_NAME = "config.yaml"


def write_run_config(cfg: TrainConfig, folder: Path) -> None:
    """The resolved config as YAML at <folder>/config.yaml, written to a temp name then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
    write_atomic(folder / CONFIG_NAME, lambda f: f.write(text.encode("utf-8")))


def run_tokenizer(cfg: TrainConfig) -> str | None:
    """The tokenizer.json the run's training data was packed with (the first source's own copy,
    else index.json's tokenizer.path); None for the built-in byte tokenizer."""
    source = Path(cfg.data.sources[0]["path"])
    try:
        tok = read_index(source)["tokenizer"]
    except FileNotFoundError:
        raise FileNotFoundError(f"training data {source} has no {INDEX_NAME}; pass --tokenizer") from None
    if tok["kind"] == "byte":
        return None
    for candidate in (source / TOKENIZER_NAME, Path(tok.get("path", ""))):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"tokenizer of {source / INDEX_NAME} ({tok.get('path') or tok['name']}) not found; pass --tokenizer")
