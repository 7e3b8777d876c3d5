"""Write a validated training config from the hardware, the token budget and the data.

    python create_mamba_config.py --preset tiny --data runs/quickstart/packed --out tiny.yaml
    python create_mamba_config.py --preset 1.4b --nodes 4 --gpu H100-80GB --tokens 30e9 \\
        --data /lustre/web:3 --data /lustre/code:1 --scheduler wsd --out big.yaml

From the preset (or --d-model/--n-layer/--ssm-layer; --attn-every K or --attn-layers i,j for a
hybrid with attention layers, shaped as mamba2attn's unless the preset has its own; --mimo-rank R
for Mamba-3's MIMO form), the hardware (--nodes, --gpus-per-node,
--gpu or --gpu-memory; --gpus-per-node 0 means CPU ranks) and the budget (--tokens or
--tokens-per-param), mamba/config/planner.py derives the micro batch from its memory model,
gradient accumulation, max duration, warmup, checkpoint interval and activation checkpointing,
and prints a summary. The vocabulary comes from --vocab-size, else the preset, else the data's
manifests; without --data the config's data.sources is a placeholder to set before training.
`key=value` overrides are applied last; the recipe is validated in memory by the strict loader
(mamba/config/load.py) and the file is written (atomically) only when valid. The summary is read
back from that final config, so what is printed is what is written, overrides included; a plan
over its memory budget or repeating its data more than 100 times is warned about. Impossible
plans exit with why.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout, uninstalled

import psutil  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mamba.config import ConfigError, planner  # noqa: E402
from mamba.config.load import load_config, to_dict  # noqa: E402
from mamba.config.presets import (ATTN_EVERY, BATCH_TOKENS, MODEL_PRESETS, SEQ_LEN, TINY_RECIPE,  # noqa: E402
                                  TINY_TOKENS, TOKENS_PER_PARAM, attention_layers, attention_shape)
from mamba.config.schema import SchedulerName, TrainConfig  # noqa: E402
from mamba.data.manifest import read_index  # noqa: E402
from mamba.files import write_atomic  # noqa: E402
from mamba.model.factory import mamba_config  # noqa: E402
from mamba.model.flops import flops_per_token  # noqa: E402


def parse_source(spec: str) -> dict:
    """DIR or DIR:WEIGHT -> {path, weight}."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return {"path": spec, "weight": 1.0}
    try:
        return {"path": path, "weight": float(weight)}
    except ValueError:
        raise ConfigError(f"--data {spec!r}: the part after the last ':' must be a weight, e.g. {path}:2") from None


def read_manifests(sources: list[dict], flag: str) -> tuple[int, int]:
    """(largest vocabulary, total tokens) over the sources' index.json manifests."""
    vocab, tokens = 0, 0
    for s in sources:
        if not Path(s["path"]).is_dir():
            raise ConfigError(f"{flag} {s['path']}: no such directory; give a directory written by tools/pack.py")
        try:
            index = read_index(s["path"])
        except (FileNotFoundError, ValueError) as e:  # missing, or packed in another layout version
            raise ConfigError(f"{flag} {s['path']}: {e}") from None
        vocab = max(vocab, int(index["tokenizer"]["vocab_size"]))
        tokens += int(index["total_tokens"])
    return vocab, tokens


def overrides_of(overrides: list[str], *keys: str) -> list[str]:
    """The overrides setting one of `keys` or anything inside them (a section name takes its keys)."""
    return [o for o in overrides if any(o.split("=", 1)[0] == k or o.startswith(k + ".") for k in keys)]


def model_section(args: argparse.Namespace, data_vocab: int) -> dict:
    shape = dict(MODEL_PRESETS[args.preset]) if args.preset else {"vocab_size": None}
    for key in ("d_model", "n_layer", "ssm_layer", "vocab_size"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if "d_model" not in shape or "n_layer" not in shape:
        raise ConfigError("give --preset, or both --d-model and --n-layer")
    if shape["vocab_size"] is not None and data_vocab > shape["vocab_size"]:
        raise ConfigError(
            f"the data uses a {data_vocab}-token vocabulary but the model embeds only {shape['vocab_size']}; "
            f"pack with the preset's tokenizer or give --vocab-size {data_vocab}")
    if args.attn_every is not None or args.attn_layers is not None:
        shape.update(hybrid_section(args, shape))
    if args.mimo_rank is not None:
        shape.update(mimo_section(args))
    shape["vocab_size"] = shape["vocab_size"] or data_vocab or None
    if shape["vocab_size"] is None:
        if not overrides_of(args.overrides, "model.vocab_size", "model"):
            raise ConfigError(f"{'--preset ' + args.preset if args.preset else 'a custom model'} takes its vocabulary "
                              f"from the data: give --data DIR (a tools/pack.py directory) or --vocab-size N")
        del shape["vocab_size"]  # a model.vocab_size override sets it
    return shape


def hybrid_section(args: argparse.Namespace, shape: dict) -> dict:
    """attn_layer_idx (from --attn-every K or --attn-layers i,j,...) and the attention shape, the
    preset's where it has one (presets.attention_shape otherwise)."""
    if args.attn_every is not None and args.attn_layers is not None:
        raise ConfigError("give --attn-every K or --attn-layers i,j,... (not both)")
    if args.attn_layers is not None:
        try:
            layers = [int(i) for i in args.attn_layers.split(",") if i.strip()]
        except ValueError:
            raise ConfigError(f"--attn-layers {args.attn_layers!r}: give layer indices, e.g. 3,7,11") from None
    else:
        try:
            # --attn-every without K: ATTN_EVERY, or one attention layer in all of a shallower model
            every = args.attn_every or min(ATTN_EVERY, shape["n_layer"])
            layers = attention_layers(shape["n_layer"], every)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return {"attn_layer_idx": layers, "attn_cfg": shape.get("attn_cfg") or attention_shape(shape["d_model"])}


# mamba-ssm's MIMO kernel wants blocks of about 64 rows: chunk_size 64 / R (its mamba3_mimo
# docstring; a larger Q R over-allocates shared memory), and it asserts chunk_size >= 8.
MIMO_ROWS, MIMO_MIN_CHUNK = 64, 8


def mimo_section(args: argparse.Namespace) -> dict:
    """--mimo-rank R: Mamba-3's MIMO form of rank R, and its chunk of 64 / R tokens unless a
    model.chunk_size override sets one (the override is applied last either way)."""
    if args.mimo_rank < 1:
        raise ConfigError(f"--mimo-rank {args.mimo_rank}: give a rank >= 1 (mamba-ssm's MIMO kernel is tested at "
                          "1, 2, 4 and 8)")
    keys = {"is_mimo": True, "mimo_rank": args.mimo_rank}
    if not overrides_of(args.overrides, "model.chunk_size"):
        keys["chunk_size"] = mimo_chunk(args.mimo_rank)
    return keys


def mimo_chunk(rank: int) -> int:
    """mamba-ssm's recommended chunk for MIMO of this rank: 64 / R tokens, at least 8."""
    return max(MIMO_MIN_CHUNK, MIMO_ROWS // rank)


def mimo_note(cfg, args: argparse.Namespace) -> str:
    """What --mimo-rank chose and why: a line of the printed plan, and a comment atop the file."""
    r, q = cfg.model.mimo_rank, cfg.model.chunk_size
    recommended = mimo_chunk(r)
    why = ("64 / R, at least 8: mamba-ssm's recommendation for its MIMO kernel"
           if not overrides_of(args.overrides, "model.chunk_size") else
           f"as overridden; mamba-ssm recommends {recommended} (64 / R, at least 8) for its MIMO kernel")
    return f"--mimo-rank {r}: model.is_mimo=true, model.mimo_rank={r}, model.chunk_size={q} ({why})"


def flops_of(cfg) -> int:
    """Training FLOPs per token of the model this config builds (mamba/model/flops.py)."""
    return flops_per_token(mamba_config(cfg.model), cfg.data.seq_len)


def hardware(args: argparse.Namespace, cpu: bool) -> tuple[float, float | None, str]:
    """(memory per rank in GB, bf16 peak TFLOP/s or None, how the summary names a rank)."""
    if cpu:
        # CPU ranks share this machine's memory (the nodes of a CPU run are taken to be like it).
        total = psutil.virtual_memory().total
        return total / args.procs_per_node / 1e9, None, f"CPU rank ({total / 1e9:.3g} GB here / {args.procs_per_node})"
    gpu_gb, peak = (planner.GPUS[args.gpu] if args.gpu else (None, None))
    gpu_gb = args.gpu_memory or gpu_gb
    if gpu_gb is None:
        raise ConfigError("GPU nodes need --gpu NAME or --gpu-memory GB (or --gpus-per-node 0 for CPU ranks)")
    return gpu_gb, args.peak_tflops or peak, args.gpu or f"{gpu_gb:g} GB GPU"


def build(args: argparse.Namespace) -> tuple[TrainConfig, str, list[str]]:
    """The validated config (derived keys, then the overrides), its summary and its warnings."""
    sources = [parse_source(s) for s in args.data]
    evals = [parse_source(s) for s in args.eval_data]
    data_vocab, data_tokens = read_manifests(sources, "--data")
    read_manifests(evals, "--eval-data")
    name = args.preset or "custom"
    cpu = args.gpus_per_node == 0
    ranks = args.nodes * (args.procs_per_node if cpu else args.gpus_per_node)
    memory_gb, peak, rank_label = hardware(args, cpu)
    # No --data: data.sources keeps the schema's placeholder, to be set before training.
    data = {"sources": sources} if sources else {}
    recipe = OmegaConf.merge(
        OmegaConf.create(to_dict(TrainConfig())),  # schema defaults, so sections exist
        TINY_RECIPE if name == "tiny" else {},
        {"run_name": args.run_name or f"mamba-{name}",
         "model": model_section(args, data_vocab),
         "data": {**data, "eval_sources": evals, "seq_len": args.seq_len or SEQ_LEN.get(name, 2048)},
         "trainer": {"device": "cpu" if cpu else "gpu", "precision": "fp32" if cpu else "amp_bf16"}},
    )
    if args.mimo_rank is not None:  # before load_config, whose own refusal does not name the flag
        layer = OmegaConf.merge(recipe, OmegaConf.from_dotlist(overrides_of(args.overrides, "model.ssm_layer")))
        if layer.model.ssm_layer != "mamba3":
            raise ConfigError(f"--mimo-rank {args.mimo_rank}: MIMO is a form of the Mamba-3 layer, but the model's "
                              f"layer is {layer.model.ssm_layer}; add --ssm-layer mamba3 (or a mamba3 preset), or "
                              "drop --mimo-rank")
    # The plan is derived from the model, the data and the precision as the overrides leave them
    # (keys that share no rule with the derived ones, so they validate before those exist).
    base = load_config(recipe, overrides_of(args.overrides, "model", "data", "trainer.precision",
                                            "fsdp.mixed_precision"))
    if base.model.vocab_size < data_vocab:  # the --vocab-size check above cannot see an override
        raise ConfigError(
            f"model.vocab_size={base.model.vocab_size} is below the data's {data_vocab}-token vocabulary "
            f"(the tokenizer in its index.json); the model must embed every id the tokenizer gives: "
            f"drop the override or set model.vocab_size >= {data_vocab}")
    size = planner.measure_model(base.model)
    mem = planner.memory_model(base, size, "cpu" if cpu else "gpu")
    seq_len, flops = base.data.seq_len, flops_of(base)
    if args.tokens:
        tokens = int(args.tokens)
    elif args.tokens_per_param or name != "tiny":
        tokens = int((args.tokens_per_param or TOKENS_PER_PARAM) * size.params)
    else:
        tokens = TINY_TOKENS
    try:
        pl = planner.plan(size, mem, ranks=ranks, seq_len=seq_len,
                          global_batch_tokens=int(args.global_batch_tokens or BATCH_TOKENS.get(name, 2**20)),
                          tokens=tokens, memory_gb=memory_gb, gpu=not cpu, peak_tflops=peak, mfu=args.mfu,
                          flops_per_token=flops)
    except planner.PlanError as e:
        raise ConfigError(f"{name} on {ranks} x {rank_label}: {e}") from None

    sched = {"name": args.scheduler, "t_warmup": f"{pl.warmup}ba", "t_max": "1dur"}
    if args.scheduler == "wsd":
        sched["t_decay"] = f"{max(1, round(0.2 * pl.steps))}ba"  # the last 20% (Hägele et al. 2024)
    recipe = OmegaConf.merge(recipe, {
        "scheduler": sched,
        "fsdp": {"activation_checkpointing": pl.checkpointing},
        "trainer": {"global_batch_size": pl.global_batch, "micro_batch_size": pl.micro_batch,
                    "max_duration": f"{pl.steps}ba", "save_interval": f"{pl.save_every}ba",
                    "eval_interval": f"{pl.save_every}ba"},  # eval_interval: used only with --eval-data
        "logging": {"peak_flops_per_device": peak * 1e12 if peak else None},
    })
    cfg = load_config(recipe, args.overrides)  # the overrides last, over the derived keys too
    # What is printed is read back from that config: an override shows.
    shown = planner.describe(cfg, size, mem, ranks=ranks, peak_tflops=peak, mfu=args.mfu, flops_per_token=flops)
    budget = planner.usable_bytes(memory_gb)
    lines = [planner.summary(shown, cfg, mem, rank_label=rank_label, budget=budget, data_tokens=data_tokens,
                             mfu=args.mfu)]
    if not sources and cfg.data.sources == TrainConfig().data.sources:
        lines.append(f"data         none given: data.sources is the placeholder {cfg.data.sources[0]['path']}; "
                     f"set it in the file or at launch: 'data.sources=[{{path: DIR}}]'")
    if args.mimo_rank is not None:
        lines.append(f"mimo         {mimo_note(cfg, args)}")
    if args.overrides:
        lines.append(f"overrides    {' '.join(args.overrides)} (applied last; the lines above include them)")
    warnings = planner.warnings(shown, cfg, size, mem, rank_label=rank_label, budget=budget, data_tokens=data_tokens)
    return cfg, "\n".join(lines), warnings


def write(cfg: TrainConfig, out: Path, header: str) -> None:
    """Write the validated config atomically; a failure names `out` (never the temporary file)."""
    text = f"# {header}\n" + OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write it ({e.strerror})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="model shape (or --d-model/--n-layer)")
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--ssm-layer", help="mamba1, mamba2 or mamba3 (default: the schema's)")
    p.add_argument("--mimo-rank", type=int, metavar="R",
                   help="Mamba-3 only: the MIMO form of rank R (model.is_mimo, model.mimo_rank) with chunk_size "
                        "64 / R (at least 8), mamba-ssm's recommendation, unless model.chunk_size=... is given")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: the preset's, else the data's)")
    p.add_argument("--attn-every", type=int, nargs="?", const=0, metavar="K",
                   help=f"hybrid: one attention layer in every K (without K: {ATTN_EVERY}, or n_layer when "
                        f"fewer), in the middle of each group of K layers (Jamba's placement)")
    p.add_argument("--attn-layers", metavar="I,J,...", help="hybrid: these layers (0-based) are attention")
    p.add_argument("--data", action="append", default=[], metavar="DIR[:WEIGHT]",
                   help="packed training data (tools/pack.py --out); repeat to mix, weight default 1; "
                        "without it data.sources is a placeholder to set before training")
    p.add_argument("--eval-data", action="append", default=[], metavar="DIR[:WEIGHT]")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, help="default 8; 0 = CPU ranks (default for tiny)")
    p.add_argument("--procs-per-node", type=int, default=2, help="CPU ranks per node (--gpus-per-node 0)")
    p.add_argument("--gpu", choices=sorted(planner.GPUS), help="sets memory and bf16 peak")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="GPU memory (overrides --gpu's)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU for the wall-time estimate")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--global-batch-tokens", type=float, help="tokens per optimizer step")
    p.add_argument("--tokens", type=float, help="token budget, e.g. 30e9")
    p.add_argument("--tokens-per-param", type=float, help=f"budget as a multiple of the parameters (default {TOKENS_PER_PARAM:g})")
    p.add_argument("--scheduler", default="cosine", choices=get_args(SchedulerName))
    p.add_argument("--out", required=True, type=Path, help="YAML file to write")
    p.add_argument("--run-name", help="default: mamba-<preset>")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied last")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.gpus_per_node is None:
        args.gpus_per_node = 0 if args.preset == "tiny" and not (args.gpu or args.gpu_memory) else 8
    try:
        if args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a directory; give the YAML file to write, "
                              f"e.g. {args.out / 'config.yaml'}")
        header = "written by: python create_mamba_config.py " + " ".join(argv if argv is not None else sys.argv[1:])
        cfg, text, warnings = build(args)
        if args.mimo_rank is not None:  # the file says why its chunk_size is what it is
            header += "\n# " + mimo_note(cfg, args)
        write(cfg, args.out, header)
    except ConfigError as err:
        sys.exit(f"create_mamba_config.py: {err}")
    print(text)
    for warning in warnings:
        print(f"create_mamba_config.py: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
