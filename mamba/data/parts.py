"""One pack job split over many machines: part I of N packs its share of the inputs, merge joins them.

Part I of N (0 <= I < N) takes a contiguous run of the sorted input list (readers.collect_inputs),
the runs chosen by input size so the parts are about equally large, and packs it exactly as a
single-machine pack would, into OUT/part-0000I-of-0000N/ (with its own resume journal, so a killed
part re-runs alone). Every part lists the same whole input list, so they agree on the split
without talking to each other.

merge(OUT) writes OUT/index.json (or OUT/train/ and OUT/val/index.json) listing every part's
shards in part order, with paths relative to the merged index; no token is read or rewritten. A
document never crosses parts, and within a part the documents keep the single-machine order, so the
merged dataset's token stream is the single-machine pack's, whatever N; only the shard boundaries
differ (each part's last shard is short). The train/val split hashes (seed, source, document
number), which does not depend on N either.

Each part records in its index.json {"part": {index, count, inputs, options}}: `inputs` hashes the
whole input list (paths, sizes, modification times) and `options` the pack options, so merge
refuses parts packed from different inputs or with different options, and re-running a finished
part (the whole array again, after one part failed) returns at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from mamba.data.manifest import INDEX_NAME, TOKENIZER_NAME, read_index, write_index
from mamba.data.shards import SPLITS
from mamba.files import write_atomic

PART_DIR = "part-{:05d}-of-{:05d}"
_PART_DIR_RE = re.compile(r"part-(\d{5})-of-(\d{5})")
# Manifest keys every part must agree on for the merged dataset to be one dataset.
_SHARED = ("layout_version", "tokenizer", "eos_id", "special_tokens", "bos", "eos", "split", "unmatched_files")


def parse_part(spec: str) -> tuple[int, int]:
    """"I/N" -> (I, N), 0 <= I < N; a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--part {spec!r}: expected I/N with 0 <= I < N, e.g. --part 0/4 for the first of 4 parts "
                         f"(in a Slurm array --array=0-3: --part $SLURM_ARRAY_TASK_ID/4)")
    return int(m[1]), int(m[2])


def part_dir(out: Path, index: int, count: int) -> Path:
    return Path(out) / PART_DIR.format(index, count)


def _weight(source: str) -> int:
    """An input's size in bytes (a directory's: its files'), >= 1: what the parts balance."""
    p = Path(source)
    if p.is_file():
        return max(p.stat().st_size, 1)
    if p.is_dir():
        return max(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()), 1)
    return 1  # hf:NAME: size unknown before downloading


def part_sources(sources: list[str], index: int, count: int) -> list[str]:
    """Part `index` of `count`'s inputs: source k goes to the part its size-midpoint falls in, so
    every part is a contiguous run of about total/count bytes. Refuses a part left empty."""
    weights = [_weight(s) for s in sources]
    total, before, parts = sum(weights), 0, []
    for w in weights:
        parts.append(min(count - 1, (2 * before + w) * count // (2 * total)))
        before += w
    mine = [s for s, p in zip(sources, parts) if p == index]
    if not mine:
        raise ValueError(f"--part {index}/{count}: no inputs fall in this part ({len(sources)} inputs, the largest "
                         f"{max(weights) * 100 // total}% of all bytes); use fewer parts")
    return mine


def inputs_identity(fingerprint_inputs: list[list]) -> str:
    """sha256 of the whole input list as [path, size, mtime] rows (shards.run_fingerprint)."""
    return hashlib.sha256(json.dumps(fingerprint_inputs).encode()).hexdigest()


def options_identity(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


def finished_part(out: Path, record: dict, splits: list[str]) -> dict | None:
    """The manifest of this part if a previous run finished it with the same inputs and options
    ({"train": ..., "val": ...} as pack returns them), else None."""
    dirs = [out / s for s in splits] if len(splits) > 1 else [out]
    if not all((d / INDEX_NAME).is_file() for d in dirs):
        return None
    manifests = [read_index(d) for d in dirs]
    if any(m.get("part") != record for m in manifests):
        raise FileExistsError(f"{out} holds a part packed from other inputs or with other options; remove it to "
                              f"pack this part again")
    return dict(zip(splits, manifests))


def merge(out: str | os.PathLike, quiet_if_incomplete: bool = False) -> dict | None:
    """Write the merged index.json(s) of OUT's parts; return the train manifest (with
    "val_manifest" when split). Refuses (ValueError naming the parts) if a part is missing or
    unfinished, unless quiet_if_incomplete, which returns None then (a part calls merge when it
    finishes: the last one to finish writes the merged index)."""
    out = Path(out)
    found = sorted((int(m[1]), int(m[2])) for p in (out.iterdir() if out.is_dir() else ())
                   if (m := _PART_DIR_RE.fullmatch(p.name)) and p.is_dir())
    counts = {n for _, n in found}
    if not found:
        raise ValueError(f"{out}: no part-I-of-N directories; pack with tools/pack.py --part I/N --out {out} first")
    if len(counts) > 1:
        raise ValueError(f"{out}: holds parts of packs split in different numbers ({', '.join(f'of {n}' for n in sorted(counts))}); "
                         f"keep the directories of one --part I/N run")
    count = counts.pop()
    split = (part_dir(out, found[0][0], count) / "train").is_dir()
    splits = list(SPLITS) if split else ["train"]
    unfinished = [i for i in range(count)
                  if not all((part_dir(out, i, count) / s / INDEX_NAME if split else part_dir(out, i, count) / INDEX_NAME)
                             .is_file() for s in splits)]
    if unfinished:
        if quiet_if_incomplete:
            return None
        raise ValueError(f"{out}: part{'s' if len(unfinished) > 1 else ''} "
                         f"{', '.join(f'{i}/{count}' for i in unfinished)} not finished (no {INDEX_NAME}); run "
                         f"{'their' if len(unfinished) > 1 else 'its'} pack task again (the same command with --part "
                         f"{unfinished[0]}/{count}): it resumes where it stopped")
    dirs = {s: [part_dir(out, i, count) / s if split else part_dir(out, i, count) for i in range(count)]
            for s in splits}
    part_manifests = {s: [read_index(d) for d in dirs[s]] for s in splits}
    for s in splits:  # a part may hold none of a split's documents (pack leaves that check to merge)
        if not sum(m["total_documents"] for m in part_manifests[s]):
            raise ValueError(f"{out}: none of the {count} parts holds a {s} document; "
                             + ("raise --val-fraction or pack without a split" if s == "val" else
                                "every input was skipped (see each part's index.json)"))
    manifests = {s: _merge_split(out / s if split else out, dirs[s], part_manifests[s]) for s in reversed(splits)}
    return {**manifests["train"], "val_manifest": manifests["val"]} if split else manifests["train"]


def _merge_split(target: Path, parts: list[Path], manifests: list[dict]) -> dict:
    """Merge one split (or an unsplit pack) of every part, `parts` in order, into target/index.json."""
    first, count = manifests[0], len(parts)
    for i, m in enumerate(manifests):
        theirs, ours = m.get("part") or {}, first.get("part") or {}
        differs = [k for k in _SHARED if m.get(k) != first.get(k)]
        differs += [k for k in ("inputs", "options") if theirs.get(k) != ours.get(k)]
        if theirs.get("index") != i or theirs.get("count") != count or differs:
            raise ValueError(f"{parts[i] / INDEX_NAME}: not part {i}/{count} of the same pack as {parts[0]} "
                             f"(differs in {', '.join(differs) or 'its part number'}); re-pack it with the "
                             f"same inputs and options")
    target.mkdir(parents=True, exist_ok=True)
    existing = target / INDEX_NAME
    if existing.is_file() and "parts" not in json.loads(existing.read_text(encoding="utf-8")):
        raise FileExistsError(f"{existing}: a single-machine pack is already here; merge into its own directory")
    shards, sources, skipped = [], [], []
    for p, m in zip(parts, manifests):
        rel = os.path.relpath(p, target)
        shards += [{**s, "file": f"{rel}/{s['file']}"} for s in m["shards"]]
        sources += m["sources"]
        skipped += m["skipped"]
    tokenizer = parts[0] / TOKENIZER_NAME
    if tokenizer.is_file():  # generation and HF export read it beside the index
        write_atomic(target / TOKENIZER_NAME, lambda f: f.write(tokenizer.read_bytes()))
    extra = {k: first[k] for k in ("bos", "eos", "split") if k in first}
    return write_index(target, shards, first["tokenizer"], first["eos_id"], sources, skipped,
                       first["unmatched_files"], special_tokens=first["special_tokens"],
                       parts=[os.path.relpath(p, target) for p in parts], **extra)
