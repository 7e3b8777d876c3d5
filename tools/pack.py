"""Pack text into a training dataset (shards of int32 layout words plus index.json), or inspect one.

    python tools/pack.py --tokenizer bpe:32768 --out data/mycorpus --include '*.py' src/ notes.txt
    python tools/pack.py --tokenizer path/to/tokenizer.json --out data/chat --workers 8 \
        --val-fraction 0.01 chats.jsonl.zst wiki.parquet hf_saved_dataset/
    python tools/pack.py inspect data/mycorpus [--window 3 --seq-len 512] [--verify]

On many machines: part I of N packs its share of the inputs into OUT/part-I-of-N (a killed part
re-runs alone, resuming), and the last part to finish merges them into one dataset in OUT (one
index.json over every part's shards, nothing copied; `pack.py merge OUT` does it by hand):

    sbatch --array=0-7 tools/pack_slurm.sh 8 --tokenizer tokenizer.json --out data/big corpus/
    python tools/pack.py --part 3/8 --tokenizer tokenizer.json --out data/big corpus/   # one part

--tokenizer: "byte", "bpe:N" (trained on the inputs, saved in --out) or a HF tokenizer.json (or a
directory holding one; a tokenizer_config.json there names its BOS and EOS). Inputs:
text/source/config/markup files and directories (searched recursively; --include and --exclude
choose names), .jsonl (--text-field, else text/content/body, else chat `messages`), .parquet and
Arrow .arrow/.feather (a string column: --text-field, else text/content/body), .pdf (one document
per file, needs pypdf), HF datasets saved with save_to_disk, hf:NAME[:SPLIT]; text, JSONL and PDF
files may be .gz or .zst.
A bad input (unreadable, binary, not UTF-8, empty, a record without text) stops the run unless
--on-bad-input skip, which lists it in index.json. An interrupted run, re-run with the same
arguments, resumes after the last finished shard, and so does one stopped by a full disk once space
is freed; any other failure leaves nothing behind.
"""
import argparse
import importlib.util
import signal
import sys
import time
from collections import Counter
from pathlib import Path

if importlib.util.find_spec("mamba") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mamba.data import parts  # noqa: E402
from mamba.data.pack import DEFAULT_INCLUDE, DEFAULT_SHARD_TOKENS, POLICIES, pack  # noqa: E402
from mamba.data.progress import PackMeter  # noqa: E402
from mamba.data.shards import PROGRESS_NAME, disk_full  # noqa: E402

SKIPPED_NAMES = 3  # inputs named per reason in the skipped summary; index.json lists them all


def inspect_main(argv) -> int:
    from mamba.data import inspect

    parser = argparse.ArgumentParser(prog="pack.py inspect", description="Summarize a packed dataset directory.")
    parser.add_argument("dir", help="a packed dataset directory (holding index.json)")
    parser.add_argument("--window", type=int, help="decode window number I to text (printed instead of the summary)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--verify", action="store_true", help="check every shard's size and sha256")
    parser.add_argument("--top", type=int, default=10, help="how many of the most frequent ids to list")
    args = parser.parse_args(argv)
    # `inspect DIR | head` closes the pipe early: end quietly, as other Unix tools do, instead of
    # a BrokenPipeError traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        # Verified first: a bad shard is reported by name, not by the summary failing to read it.
        problems = inspect.verify(args.dir) if args.verify else []
        for p in problems:
            print(f"FAILED {p}")
        if problems:
            return 1
        if args.window is None:
            print(inspect.summary(args.dir, args.top))
        else:
            print(inspect.render_window(args.dir, args.window, args.seq_len))
        if args.verify:
            print("verify: every shard matches its size and sha256 in index.json")
    except (ValueError, OSError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    return 0


def part_arg(spec: str) -> tuple[int, int]:
    try:
        return parts.parse_part(spec)
    except ValueError as e:  # argparse would print only "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def merge_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="pack.py merge", description="Merge the parts of a --part I/N pack.")
    parser.add_argument("dir", help="the --out of the parts (holding part-I-of-N directories)")
    args = parser.parse_args(argv)
    try:
        manifest = parts.merge(args.dir)
    except (ValueError, OSError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(merged_line(manifest, args.dir))
    return 0


def merged_line(manifest: dict, out: str) -> str:
    return (f"merged {len(manifest['parts'])} parts into {out}: {manifest['total_documents']} documents, "
            f"{manifest['total_tokens']} tokens in {len(manifest['shards'])} shards")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        return inspect_main(argv[1:])
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories, dataset dirs, hf:NAME")
    parser.add_argument("--tokenizer", required=True, help='"byte", "bpe:N", a HF tokenizer.json, a SentencePiece tokenizer.model, '
                        'or a directory holding either')
    parser.add_argument("--out", required=True, help="new or empty output directory (or an interrupted run's)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (output does not depend on it)")
    parser.add_argument("--on-bad-input", choices=POLICIES, default="fail",
                        help="what to do with a bad input file or record (default: fail)")
    parser.add_argument("--include", action="append", metavar="GLOB",
                        help="file names to take from directory inputs, e.g. '*.py' (repeatable; "
                             "default: common text, source and record extensions; '*' for every file)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="file or directory names not to enter, e.g. site-packages (repeatable)")
    parser.add_argument("--text-field", help="JSONL/Parquet/Arrow/dataset field with the text (default: text, content, body)")
    parser.add_argument("--eos", help="name of the EOS token in a tokenizer.json that lacks a usual one")
    parser.add_argument("--bos", action="store_true", help="start every document with the BOS token (no loss on it)")
    parser.add_argument("--no-eos", action="store_true", help="do not end documents with EOS")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="share of documents for --out/val (the rest in --out/train); default 0: no split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val document hash")
    parser.add_argument("--strip-html", action="store_true", help="take .html/.htm/.xhtml inputs without their tags")
    parser.add_argument("--part", type=part_arg, metavar="I/N",
                        help="pack part I of N (0 <= I < N) of the inputs into OUT/part-I-of-N, for one task of a "
                             "many-machine pack; the last part to finish merges them all into OUT")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (a line updated in place on a terminal, else every 10 s, "
                             "and each shard written); only the summary at the end")
    args = parser.parse_args(argv)

    out = parts.part_dir(Path(args.out), *args.part) if args.part else Path(args.out)
    start = time.perf_counter()
    meter = None if args.quiet else PackMeter(sys.stderr)
    try:
        manifest = pack(
            args.inputs, args.out, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
            on_bad_input=args.on_bad_input, include=args.include or DEFAULT_INCLUDE, exclude=args.exclude, eos=args.eos,
            progress=meter and meter.message, meter=meter, workers=args.workers, text_field=args.text_field,
            add_bos=args.bos, add_eos=not args.no_eos, val_fraction=args.val_fraction, seed=args.seed,
            strip_html=args.strip_html, part=args.part,
        )
        merged = args.part and parts.merge(args.out, quiet_if_incomplete=True)
    except (ValueError, OSError) as e:  # bad input, tokenizer or output dir: the message says which
        kept = disk_full(e) and (out / PROGRESS_NAME).is_file()
        parser.exit(1, f"{parser.prog}: error: {e}" + (
            f"; the disk is full: what is finished is kept in {out}, free space there and run the "
            f"same command again to resume" if kept else "") + "\n")
    except KeyboardInterrupt:
        kept = (out / PROGRESS_NAME).is_file()
        parser.exit(130, f"{parser.prog}: interrupted; " + (
            f"what is finished is kept in {out}: run the same command again to resume\n" if kept else
            "nothing was finished, nothing is left behind\n"))
    seconds = time.perf_counter() - start
    tokens = manifest["total_tokens"] + manifest.get("val_manifest", {}).get("total_tokens", 0)
    tok = manifest["tokenizer"]
    print(f"packed {manifest['total_documents']} documents, {manifest['total_tokens']} tokens into "
          f"{len(manifest['shards'])} shards in {out} ({seconds:.1f} s, {tokens / seconds:,.0f} tokens/s)")
    if "val_manifest" in manifest:
        val = manifest["val_manifest"]
        print(f"  val: {val['total_documents']} documents, {val['total_tokens']} tokens in {out}/val "
              f"(train in {out}/train)")
    print(f"tokenizer {tok['name']} ({tok['kind']}, vocab {tok['vocab_size']}), special ids {manifest['special_tokens']}")
    if manifest["skipped"]:
        print(skipped_summary(manifest["skipped"], f"{out}/train" if "val_manifest" in manifest else str(out)))
    if manifest["unmatched_files"]:
        print(f"left out {manifest['unmatched_files']} files in the input directories that match no --include pattern")
    if args.part:
        print(merged_line(merged, args.out) if merged else
              f"part {args.part[0]}/{args.part[1]} done; the last part to finish merges them into {args.out} "
              f"(or run tools/pack.py merge {args.out} once all are done)")
    return 0


def skipped_summary(skipped: list[dict], out: str) -> str:
    """How many inputs were left out for each reason, naming the first few: a code tree has dozens
    of empty __init__.py files, and the full list is in index.json."""
    # Reasons differ in their parenthesised detail (a byte offset, an exception text): count by the rest.
    reasons = Counter(s["reason"].split(" (")[0] for s in skipped)
    lines = [f"skipped {len(skipped)} inputs or records (all listed in index.json's \"skipped\" and by "
             f"`tools/pack.py inspect {out}`):"]
    for reason, count in reasons.most_common():
        names = [s["path"] for s in skipped if s["reason"].split(" (")[0] == reason][:SKIPPED_NAMES]
        lines.append(f"  {count} {reason}: {', '.join(names)}{', ...' if count > len(names) else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
