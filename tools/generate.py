"""Generate text from a trained model with recurrent (O(1) per token) inference.

    python tools/generate.py runs/my-run/checkpoints --prompt 'def main():' --max-new-tokens 64
    python tools/generate.py hf/my-run --prompt 'Once' --temperature 0.8 --top-p 0.95 --seed 1

CHECKPOINT_OR_HF_DIR: a Composer checkpoint (file, sharded directory or save_folder, with the
run's config.yaml beside it), or a directory with config.json (HF transformers Mamba, Mamba2 or
Bamba, e.g. from tools/export_hf.py, or mamba-ssm's layout, hybrids and Mamba-3 included). The tokenizer is the directory's tokenizer.json, or
the training data's for a Composer checkpoint, unless --tokenizer is given. Temperature 0
decodes greedily. Generation stops at the tokenizer's end-of-text token.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("mamba") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mamba.config import ConfigError  # noqa: E402
from mamba.known_warnings import quiet_known_warnings  # noqa: E402
from mamba.data.tokenizer import load_tokenizer  # noqa: E402
from mamba.model.generation import generate  # noqa: E402
from mamba.model.hf import CheckpointMismatchError, model_from_pretrained  # noqa: E402
from mamba.runs.checkpoints import load_model_from_checkpoint  # noqa: E402
from mamba.runs.run_config import run_tokenizer  # noqa: E402


def load(source: str, tokenizer: str | None):
    """(model, tokenizer) from an HF / mamba-ssm directory or a Composer checkpoint."""
    path = Path(source)
    if (path / "config.json").is_file():
        model = model_from_pretrained(path)
        spec = tokenizer or str(path)
        if tokenizer is None and not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json; pass --tokenizer (a tokenizer.json or 'byte')")
    else:
        model, cfg = load_model_from_checkpoint(path)
        spec = tokenizer or run_tokenizer(cfg) or "byte"
    return model, load_tokenizer(spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_HF_DIR")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--tokenizer", help="tokenizer.json, or 'byte' (default: see above)")
    args = parser.parse_args(argv)
    if not 0 < args.top_p <= 1 or args.temperature < 0 or args.max_new_tokens < 1:
        parser.error("need 0 < --top-p <= 1, --temperature >= 0 and --max-new-tokens >= 1")
    quiet_known_warnings()
    try:
        model, tok = load(args.checkpoint, args.tokenizer)
    except (OSError, ValueError, ConfigError, CheckpointMismatchError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    prompt = tok.encode_batch([args.prompt])[0]
    if not prompt:
        parser.error("--prompt encodes to no tokens")
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(model, torch.tensor([prompt]), args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, eos_token_id=tok.eos_id, generator=generator,
                   vocab_size=min(tok.vocab_size, model.config.vocab_size))
    print(args.prompt + tok.decode(out[0, len(prompt):].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
