"""The GPU proof's bookkeeping: step results, the final table, the Composer run's plan and
measurements, and per-test timings of pytest. benchmarks/gpu/prove.sh calls it; nothing here
needs a GPU or Composer, so the CPU tests exercise all of it.

    python benchmarks/gpu/proof.py record OUT --step S --status ok|failed|timed_out|skipped|interrupted
                                   [--rc N] [--seconds S] [--box S] [--log FILE] [--rows FILE] [--note TEXT]
    python benchmarks/gpu/proof.py summary OUT          rewrite OUT/results.md and print it
    python benchmarks/gpu/proof.py plan-flags           create_mamba_config.py's GPU flags for this GPU
    python benchmarks/gpu/proof.py plan-read PLAN_LOG CONFIG > plan.json
    python benchmarks/gpu/proof.py composer-rows METRICS PLAN_JSON > rows.jsonl
    pytest -p proof ...                                 with PROOF_PYTEST_ROWS=FILE: one line per test

OUT/results.json holds one JSON object per line, appended as each step ends (a run stopped early
keeps every finished step); OUT/results.md is rewritten from it each time. A step's "rows" are the
JSON lines its programs wrote (model_gpu.py --json, torch_path.py --json, the pytest hook below).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

TAIL_LINES = 15


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file; a torn last line (a writer killed mid-line) is
    left out rather than failing the whole report."""
    if not path or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_line(path: Path, obj: dict) -> None:
    """One os.write on an O_APPEND descriptor: the line lands whole or not at all, even when
    the shell that called this is killed right after."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    finally:
        os.close(fd)


def log_tail(path: str | None, lines: int = TAIL_LINES) -> list[str]:
    if not path or not Path(path).is_file():
        return []
    return Path(path).read_text(errors="replace").splitlines()[-lines:]


# --- what each kind of step's rows say, in one table cell ------------------------------------


def num(x, spec: str = ",.0f") -> str:
    """A measured number, or '-' where the step did not get that far (or runs on CPU)."""
    return format(x, spec) if isinstance(x, (int, float)) and x == x else "-"


def describe(step: str, rows: list[dict]) -> str:
    """One line of a step's measurements for the table: test counts, tokens/s, memory."""
    if not rows:
        return ""
    if step.startswith("kernels"):
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        slow = max(rows, key=lambda r: r["seconds"])
        total = sum(r["seconds"] for r in rows)
        return (", ".join(f"{n} {o}" for o, n in sorted(counts.items())) + f" in {total:.0f} s; slowest "
                f"{slow['test'].split('::')[-1]} {slow['seconds']:.0f} s")
    if step.startswith("composer"):
        r = rows[-1]
        return (f"{num(r.get('tokens_per_s'))} tok/s steady (micro batch {r.get('micro_batch')}, "
                f"{r.get('batches')} batches), peak {num(r.get('peak_gb'), '.1f')} GB vs planner "
                f"{num(r.get('planner_gb'), '.1f')} GB")
    if step == "install":
        return f"{rows[-1]['wheels']} wheels installed (the rest of the bundle is on this machine already)"
    if step == "prepare":
        r = rows[-1]
        return f"{r.get('tokens', 0):,} tokens packed; plan micro batch {r.get('micro_batch')}, {r.get('planner_gb')} GB"
    parts = []
    for r in rows:
        if r.get("skipped"):
            parts.append(f"{r.get('mixer')} {r.get('impl')}: skipped")
            continue
        label = f"{r.get('shape', '')} {r.get('mixer')} {r.get('impl')} b{r.get('micro_batch')}".strip()
        extra = f" ({r['vs_mamba_ssm']:.2f}x mamba-ssm)" if r.get("vs_mamba_ssm") else ""
        extra += f" ({r['vs_kernels']:.2f}x the kernel path)" if r.get("vs_kernels") else ""
        parts.append(f"{label}: {num(r.get('tokens_per_s'))} tok/s{extra}")
    return "; ".join(parts)


def comparisons(latest: dict[str, dict]) -> list[str]:
    """The cross-step figures the proof exists for: torch path vs kernels, Composer vs the bare
    loop, measured vs planned memory, Triton's share of the kernel tests' time."""
    out = []
    # model_gpu.py's "ours, documents" rows of bench_130m: the training path with document resets,
    # on the kernels where they imported (on CPU, in a rehearsal, on the torch ops: said so).
    bench = [r for r in latest.get("bench_130m", {}).get("rows", []) if not r.get("skipped")]
    ours = {(r["mixer"], r["micro_batch"]): r for r in bench if r["impl"] == "ours, documents"}

    def reference(mixer, micro_batch):
        r = ours.get((mixer, micro_batch))
        if not r or not r.get("tokens_per_s"):
            return None, ""
        path = "the kernels'" if r.get("kernels") else "model_gpu.py's (torch ops: no kernels there)"
        return r["tokens_per_s"], f"{path} {r['tokens_per_s']:,.0f} tok/s"

    for step in ("torch_eager", "torch_compile"):
        for r in latest.get(step, {}).get("rows", []):
            ref, what = reference(r.get("mixer"), r.get("micro_batch"))
            if r.get("skipped") or r.get("impl") == "kernels" or not ref or not r.get("tokens_per_s"):
                continue
            compile_s = f"; first step (compilation) {r['compile_s']:.0f} s" if r.get("compile_s") else ""
            out.append(f"torch path, {r['impl']}, {r['mixer']} {r['shape']} micro batch {r['micro_batch']}: "
                       f"{r['tokens_per_s']:,.0f} tok/s = {r['tokens_per_s'] / ref:.2f}x {what}{compile_s}")
    for r in bench:  # model_gpu.py's Mamba-3 torch-path row, against its kernel row (mamba-ssm >= 2.3.2)
        ref, what = reference(r["mixer"], r["micro_batch"])
        if r.get("vs_kernels") and ref and r.get("tokens_per_s"):
            out.append(f"torch path, eager, {r['mixer']} {r['shape']} micro batch {r['micro_batch']} (model_gpu.py): "
                       f"{r['tokens_per_s']:,.0f} tok/s = {r['tokens_per_s'] / ref:.2f}x {what}")
    for r in latest.get("composer_130m", {}).get("rows", []):
        ref, what = reference("mamba1", r.get("micro_batch"))
        if ref and r.get("tokens_per_s"):
            out.append(f"Composer (FSDP2, 1 device) mamba1 micro batch {r['micro_batch']}: {r['tokens_per_s']:,.0f} "
                       f"tok/s = {r['tokens_per_s'] / ref:.2f}x the bare loop, {what}")
        if r.get("peak_gb") and r.get("planner_gb"):
            out.append(f"Composer peak memory {r['peak_gb']:.1f} GB (torch.cuda.max_memory_allocated) = "
                       f"{r['peak_gb'] / r['planner_gb']:.2f}x the planner's {r['planner_gb']:.1f} GB estimate")
    cold = {r["test"]: r["seconds"] for r in latest.get("kernels_cold", {}).get("rows", [])}
    warm = {r["test"]: r["seconds"] for r in latest.get("kernels_warm", {}).get("rows", [])}
    both = sorted(set(cold) & set(warm))
    if both:
        c, w = sum(cold[t] for t in both), sum(warm[t] for t in both)
        out.append(f"kernel tests, {len(both)} in both runs: {c:.0f} s with an empty Triton cache, {w:.0f} s with "
                   f"it filled; the difference, {c - w:.0f} s, is compilation (on a GPU, Triton's)")
    return out


def summary(out: Path) -> str:
    """results.md: the latest record of each step, in the order steps first appeared, then the
    comparisons, then the log tails of what did not succeed."""
    records = read_jsonl(out / "results.json")
    latest: dict[str, dict] = {}
    for r in records:
        latest.pop(r["step"], None)  # a re-run step moves to where it ran last
        latest[r["step"]] = r
    env = latest.get("env", {}).get("note", "")
    lines = [f"# GPU proof {time.strftime('%Y-%m-%d %H:%M')}", "", env, "",
             "| step | status | seconds (box) | result |", "|---|---|---|---|"]
    for r in latest.values():
        status = r["status"] + (f" (rc {r['rc']})" if r.get("rc") not in (None, 0) else "")
        try:
            result = describe(r["step"], r.get("rows", [])) or r.get("note", "")
        except (KeyError, TypeError, ValueError) as exc:  # a row of an unexpected shape: say so, go on
            result = f"rows not understood ({type(exc).__name__}: {exc})"
        if r.get("note") and result != r.get("note"):
            result = f"{result}; {r['note']}"
        seconds = f"{r.get('seconds', 0):.0f}" + (f" ({r['box']})" if r.get("box") else "")
        lines.append(f"| {r['step']} | {status} | {seconds} | {result.replace('|', '/')} |")
    try:
        found = comparisons(latest)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        found = [f"comparisons not computed ({type(exc).__name__}: {exc})"]
    if found:
        lines += ["", "## Comparisons", ""] + [f"- {c}" for c in found]
    bad = [r for r in latest.values() if r["status"] in ("failed", "timed_out", "interrupted")]
    for r in bad:
        lines += ["", f"## {r['step']}: {r['status']} (rc {r.get('rc')}), last lines of {r.get('log')}", "", "```"]
        lines += r.get("log_tail", []) + ["```"]
    text = "\n".join(lines) + "\n"
    tmp = out / ".results.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "results.md")
    return text


def record(args) -> None:
    rec = {"step": args.step, "status": args.status, "rc": args.rc, "seconds": round(args.seconds, 1),
           "box": args.box, "note": args.note, "log": args.log, "log_tail": log_tail(args.log),
           "rows": read_jsonl(args.rows), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    append_line(args.out / "results.json", rec)
    summary(args.out)


# --- the Composer run: what the planner promised, what the run measured ------------------------


def plan_flags() -> str:
    """--gpu NAME for create_mamba_config.py when this GPU is in the planner's table (by name,
    the closest memory size among names that match: an A100 is 40 or 80 GB), else
    --gpu-memory with what torch reports."""
    import torch
    from mamba.config.planner import GPU_MEMORY_GB

    name = torch.cuda.get_device_name()
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    words = name.replace("-", " ").split()
    matches = [k for k in GPU_MEMORY_GB if k.split("-")[0] in words]
    if matches:
        return "--gpu " + min(matches, key=lambda k: abs(GPU_MEMORY_GB[k] - total_gb))
    return f"--gpu-memory {total_gb:.0f}"


def plan_read(plan_log: Path, config: Path) -> dict:
    """The planner's memory estimate (its printed 'memory  N GB ...' line) and the batch layout
    of the config it wrote."""
    text = plan_log.read_text()
    memory = re.search(r"^memory\s+([\d.]+)\s*GB", text, flags=re.M)
    cfg = config.read_text()

    def key(name):
        found = re.search(rf"^\s+{name}:\s*(\S+)", cfg, flags=re.M)
        return found.group(1) if found else None

    return {"planner_gb": float(memory.group(1)) if memory else None,
            "micro_batch": int(key("micro_batch_size")), "global_batch": int(key("global_batch_size")),
            "seq_len": int(key("seq_len")), "activation_checkpointing": key("activation_checkpointing") == "true",
            "max_duration": key("max_duration")}


def composer_rows(metrics: Path, plan: dict) -> dict:
    """Steady state of a Composer run's metrics file: the median of SpeedMonitor's tokens/s over
    the second half of the logged batches (the first ones hold compilation, autotuning and the
    allocator's growth), and the peak of MemoryMonitor's torch.cuda.max_memory_allocated."""
    rows = read_jsonl(metrics)
    rates = [r["throughput/device/tokens_per_sec"] for r in rows if "throughput/device/tokens_per_sec" in r]
    peaks = [r["memory/max_allocated_gib"] for r in rows if "memory/max_allocated_gib" in r]
    steady = rates[len(rates) // 2:]
    return {**plan, "batches": max((r["batch"] for r in rows), default=0),
            "tokens_per_s": statistics.median(steady) if steady else None, "rates_used": len(steady),
            "peak_gb": max(peaks) * 2**30 / 1e9 if peaks else None,
            "loss_last": next((r["loss/train/total"] for r in reversed(rows) if "loss/train/total" in r), None)}


# --- pytest hook: `pytest -p proof` writes one JSON line per finished test ----------------------

_phases: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    """Setup, call and teardown of one test, summed, written at teardown (so a pytest killed by
    its time box still leaves every test that finished). Outcome: failed if any phase failed,
    skipped if setup skipped it."""
    path = os.environ.get("PROOF_PYTEST_ROWS")
    if not path:
        return
    seen = _phases.setdefault(report.nodeid, {"seconds": 0.0, "outcome": "passed"})
    seen["seconds"] += report.duration
    if report.failed:
        seen["outcome"] = "failed"
    elif report.skipped and seen["outcome"] != "failed":
        seen["outcome"] = "skipped"
    if report.when == "teardown":
        append_line(Path(path), {"test": report.nodeid, "outcome": seen["outcome"],
                                 "seconds": round(seen["seconds"], 3)})
        _phases.pop(report.nodeid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("record")
    p.add_argument("out", type=Path)
    p.add_argument("--step", required=True)
    p.add_argument("--status", required=True, choices=["ok", "failed", "timed_out", "skipped", "interrupted"])
    p.add_argument("--rc", type=int)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--box", type=int)
    p.add_argument("--log")
    p.add_argument("--rows", type=Path)
    p.add_argument("--note", default="")
    p = sub.add_parser("summary")
    p.add_argument("out", type=Path)
    sub.add_parser("plan-flags")
    p = sub.add_parser("plan-read")
    p.add_argument("plan_log", type=Path)
    p.add_argument("config", type=Path)
    p = sub.add_parser("composer-rows")
    p.add_argument("metrics", type=Path)
    p.add_argument("plan", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args)
    elif args.command == "summary":
        print(summary(args.out), end="")
    elif args.command == "plan-flags":
        print(plan_flags())
    elif args.command == "plan-read":
        print(json.dumps(plan_read(args.plan_log, args.config)))
    elif args.command == "composer-rows":
        print(json.dumps(composer_rows(args.metrics, json.loads(args.plan.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
