"""Write a validated training config from a few high-level choices.

    python create_mamba_config.py --preset tiny --data runs/quickstart/packed --out tiny.yaml
    python create_mamba_config.py --preset 1.6b --data /lustre/packed --out big.yaml trainer.max_duration=50000ba

The output starts from config.yaml's defaults (the schema), takes the preset's model shape, points
data.train at --data, takes the vocabulary size from the data's manifest when the preset has none
(and refuses data whose vocabulary the preset's model cannot embed), applies any `key=value`
overrides, and is loaded back through the strict schema before it is renamed into place.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout, uninstalled

from omegaconf import OmegaConf  # noqa: E402

from mamba.config.load import ConfigError, load_config, to_dict  # noqa: E402
from mamba.config.presets import MODEL_PRESETS, TINY_RECIPE  # noqa: E402


def manifest_vocab_size(data_dir: str) -> int:
    index = Path(data_dir) / "index.json"
    if not index.is_file():
        raise ConfigError(f"{index} not found: --data must be a directory written by tools/pack.py")
    return int(json.loads(index.read_text())["tokenizer"]["vocab_size"])


def build(args: argparse.Namespace) -> dict:
    preset = dict(MODEL_PRESETS[args.preset])
    data_vocab = manifest_vocab_size(args.data)
    if preset["vocab_size"] is None:
        preset["vocab_size"] = data_vocab
    elif data_vocab > preset["vocab_size"]:
        raise ConfigError(
            f"the data in {args.data} uses a {data_vocab}-token vocabulary but preset "
            f"{args.preset} embeds only {preset['vocab_size']}; pack with the preset's tokenizer "
            f"or override model.vocab_size={data_vocab}"
        )
    recipe = OmegaConf.merge(
        TINY_RECIPE if args.preset == "tiny" else {},
        {"run_name": args.run_name or f"mamba-{args.preset}", "model": preset, "data": {"train": args.data}},
    )
    return OmegaConf.to_container(recipe)


def write(recipe: dict, overrides: list[str], out: Path, header: str) -> None:
    """Validate recipe + overrides through the schema, then write the full config atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(OmegaConf.to_yaml(recipe))
        cfg = load_config(tmp, overrides)
        with open(tmp, "w") as f:
            f.write(f"# {header}\n")
            f.write(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(MODEL_PRESETS))
    parser.add_argument("--data", required=True, help="packed data directory (tools/pack.py --out)")
    parser.add_argument("--out", required=True, type=Path, help="YAML file to write")
    parser.add_argument("--run-name", help="default: mamba-<preset>")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied last")
    args = parser.parse_args(argv)
    try:
        header = "written by: python create_mamba_config.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write(build(args), args.overrides, args.out, header)
    except ConfigError as err:
        sys.exit(f"create_mamba_config.py: {err}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
