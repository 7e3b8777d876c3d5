"""Export a trained checkpoint as a HF transformers (or mamba-ssm) model directory.

    python tools/export_hf.py runs/my-run/checkpoints hf/my-run
    python tools/export_hf.py runs/my-run/checkpoints/ep0-ba1000-rank0.pt hf/my-run --config my.yaml
    python tools/export_hf.py runs/my-hybrid/checkpoints out/my-hybrid --format mamba-ssm

CHECKPOINT: a Composer checkpoint file (full state dict), a sharded checkpoint directory (FSDP2,
holds .metadata), or a save_folder (its newest checkpoint is taken). The architecture comes from
the run's config.yaml in the save_folder (or --config); the tokenizer from the training data's
index.json / tokenizer.json (or --tokenizer).

--format (default auto: the first that fits, in this order; mamba/runs/export.py has the matrix):
  hf         pure Mamba-1 / Mamba-2 (no attention, no MLPs): transformers' MambaForCausalLM /
             Mamba2ForCausalLM;
  bamba      Mamba-2 + attention + MLPs that map exactly (conditions in mamba/model/bamba.py:
             ngroups 1, attention without conv, one bias flag, default softmax scale):
             transformers' BambaForCausalLM;
  mamba-ssm  any model, hybrids included: mamba-ssm's MambaLMHeadModel.from_pretrained layout
             (config.json + pytorch_model.bin).
hf and bamba load with `AutoModelForCausalLM.from_pretrained(OUT_DIR)`, all three with
tools/generate.py and as model.init_from; the tokenizer files (a BPE run's) go with each, for
`AutoTokenizer.from_pretrained(OUT_DIR)`. A format that does not fit is refused with the reason.
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
from mamba.runs.export import FORMATS, export_hf  # noqa: E402
from mamba.runs.run_config import run_tokenizer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint file, sharded checkpoint directory or save_folder")
    parser.add_argument("out_dir", help="new (or empty) output directory")
    parser.add_argument("--config", help="the run's config YAML (default: config.yaml beside the checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer.json to ship (default: the training data's)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="output format (default: auto, see above)")
    args = parser.parse_args(argv)
    quiet_known_warnings()
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        model, cfg = load_model_from_checkpoint(checkpoint, args.config)
        tokenizer = args.tokenizer or run_tokenizer(cfg)
        fmt = export_hf(model, args.out_dir, tokenizer, fmt=args.format)
    except (OSError, ValueError, ConfigError, CheckpointMismatchError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"exported {checkpoint} ({model.num_parameters():,} parameters) to {args.out_dir} as {fmt}"
          + (f" with tokenizer {tokenizer}" if tokenizer else " (byte tokenizer: no tokenizer files)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
