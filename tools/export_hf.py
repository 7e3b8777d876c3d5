"""Export a trained checkpoint as a HF transformers model directory.

    python tools/export_hf.py runs/my-run/checkpoints hf/my-run
    python tools/export_hf.py runs/my-run/checkpoints/ep0-ba1000-rank0.pt hf/my-run --config my.yaml

CHECKPOINT: a Composer checkpoint file (full state dict), a sharded checkpoint directory (FSDP2,
holds .metadata), or a save_folder (its newest checkpoint is taken). The architecture comes from
the run's config.yaml in the save_folder (or --config); the tokenizer from the training data's
index.json / tokenizer.json (or --tokenizer). OUT_DIR then loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)`.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("mamba") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mamba.config import ConfigError  # noqa: E402
from mamba.known_warnings import quiet_known_warnings  # noqa: E402
from mamba.model.hf import CheckpointMismatchError  # noqa: E402
from mamba.runs.checkpoints import load_model_from_checkpoint, resolve_checkpoint  # noqa: E402
from mamba.runs.export import export_hf  # noqa: E402
from mamba.runs.run_config import run_tokenizer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint file, sharded checkpoint directory or save_folder")
    parser.add_argument("out_dir", help="new (or empty) output directory")
    parser.add_argument("--config", help="the run's config YAML (default: config.yaml beside the checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer.json to ship (default: the training data's)")
    args = parser.parse_args(argv)
    quiet_known_warnings()
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        model, cfg = load_model_from_checkpoint(checkpoint, args.config)
        tokenizer = args.tokenizer or run_tokenizer(cfg)
        export_hf(model, args.out_dir, tokenizer)
    except (OSError, ValueError, ConfigError, CheckpointMismatchError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"exported {checkpoint} ({model.num_parameters():,} parameters) to {args.out_dir}"
          + (f" with tokenizer {tokenizer}" if tokenizer else " (byte tokenizer: no tokenizer files)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
