"""Pack text files into a training dataset: shards of int32 layout words plus index.json.

    python tools/pack.py --tokenizer bpe:32768 --out data/mycorpus --include '*.py' src/ notes.txt

--tokenizer: "byte", "bpe:N" (trained on the inputs, saved in --out) or a HF tokenizer.json path.
Directories are searched recursively for text and source files (--include and --exclude change
which); files named on the command line are always packed.
A binary or non-UTF-8 file stops the run unless --on-bad-input skip, which lists it in index.json.
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("mamba") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mamba.data.pack import DEFAULT_INCLUDE, DEFAULT_SHARD_TOKENS, POLICIES, pack  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files and directories to pack")
    parser.add_argument("--tokenizer", required=True, help='"byte", "bpe:N" or a path to tokenizer.json')
    parser.add_argument("--out", required=True, help="new or empty output directory")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--on-bad-input", choices=POLICIES, default="fail",
                        help="what to do with a binary or non-UTF-8 file (default: fail)")
    parser.add_argument("--include", action="append", metavar="GLOB",
                        help="file names to take from directory inputs, e.g. '*.py' (repeatable; "
                             "default: common text and source extensions; '*' for every file)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="file or directory names not to enter, e.g. site-packages (repeatable)")
    parser.add_argument("--eos", help="name of the EOS token in a tokenizer.json that lacks a usual one")
    parser.add_argument("--quiet", action="store_true", help="do not report each shard as it is written")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        manifest = pack(
            args.inputs, args.out, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
            on_bad_input=args.on_bad_input, include=args.include or DEFAULT_INCLUDE, exclude=args.exclude, eos=args.eos,
            progress=None if args.quiet else lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (ValueError, OSError) as e:  # bad input, tokenizer or output dir: the message says which
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    seconds = time.perf_counter() - start
    tokens = manifest["total_tokens"]
    tok = manifest["tokenizer"]
    print(f"packed {manifest['total_documents']} documents, {tokens} tokens into "
          f"{len(manifest['shards'])} shards in {args.out} ({seconds:.1f} s, {tokens / seconds:,.0f} tokens/s)")
    print(f"tokenizer {tok['name']} ({tok['kind']}, vocab {tok['vocab_size']}, eos {manifest['eos_id']})")
    for bad in manifest["skipped"]:
        print(f"skipped {bad['path']}: {bad['reason']}")
    if manifest["unmatched_files"]:
        print(f"left out {manifest['unmatched_files']} files in the input directories that match no --include pattern")
    return 0


if __name__ == "__main__":
    sys.exit(main())
