"""The GPU proof (benchmarks/gpu/prove.sh) on CPU: the real script, its steps' commands swapped
for quick ones through PROVE_CMD_<STEP> (or its --rehearse sizes), and the real bundle of
benchmarks/gpu/wheelhouse.sh installed from files alone.

What a GPU machine must be able to rely on: a step that overruns its box is cut and recorded, the
steps after it still run, a failure is recorded with its exit code and the end of its log, a run
stopped at any point keeps every finished step, the script exits 0 whatever the steps did, and the
bundle fits the carry, matches its manifest and installs without network into a Python that has
only torch (and what torch and torchvision need), where Composer then imports from it. The two
bundle tests download from PyPI and run only with GPU_PROOF_BUNDLE=1 (see their comment).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROVE = REPO / "benchmarks" / "gpu" / "prove.sh"
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
import bundle  # noqa: E402


def prove(tmp_path: Path, *args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """prove.sh OUT --work WORK ARGS under this interpreter; Popen when popen options are given."""
    full_env = {**os.environ, "PYTHON": sys.executable, "PROVE_MIN_BOX": "1", **(env or {})}
    cmd = ["bash", str(PROVE), str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args]
    if popen:
        return subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                **popen)
    return subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=300)


def results(tmp_path: Path) -> dict[str, dict]:
    """results.json, every line parsed (a torn line fails here), by step."""
    lines = (tmp_path / "out" / "results.json").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def boxed_run(tmp_path_factory):
    """One run of four steps: one that writes a row, one past its 2 s box, one that fails with
    exit 7 after 40 lines, one after both."""
    tmp = tmp_path_factory.mktemp("boxed")
    env = {
        "PROVE_CMD_PREPARE": 'echo \'{"tokens": 123, "micro_batch": 4, "planner_gb": 1.5}\' >> "$ROWS"; echo packed',
        "PROVE_CMD_TORCH_EAGER": "echo started; sleep 40; echo never",
        "PROVE_BOX_TORCH_EAGER": "2",
        "PROVE_CMD_BENCH_130M": 'for i in $(seq 1 40); do echo "line $i"; done; echo "the error" >&2; exit 7',
        "PROVE_CMD_KERNELS_COLD": "echo after",
    }
    start = time.monotonic()
    run = prove(tmp, "--steps", "prepare torch_eager bench_130m kernels_cold", env=env)
    return tmp, run, time.monotonic() - start


def test_a_step_past_its_box_is_cut_and_the_steps_after_it_still_run(boxed_run):
    tmp, run, seconds = boxed_run
    assert run.returncode == 0, run.stdout + run.stderr
    found = results(tmp)
    assert [s for s in found] == ["env", "prepare", "torch_eager", "bench_130m", "kernels_cold"]
    cut = found["torch_eager"]
    assert cut["status"] == "timed_out" and cut["rc"] == 124 and cut["box"] == 2
    assert cut["seconds"] < 15 and seconds < 40  # cut at its box, not after the 40 s sleep
    assert cut["log_tail"] == ["started"]
    assert found["prepare"]["status"] == "ok" and found["prepare"]["rows"] == [
        {"tokens": 123, "micro_batch": 4, "planner_gb": 1.5}]
    assert found["kernels_cold"]["status"] == "ok" and found["kernels_cold"]["log_tail"] == ["after"]
    table = (tmp / "out" / "results.md").read_text()
    for step, status in [("prepare", "ok"), ("torch_eager", "timed_out (rc 124)"), ("bench_130m", "failed (rc 7)"),
                         ("kernels_cold", "ok")]:
        assert f"| {step} | {status} |" in table
    assert run.stdout == table  # the table is also what the run prints last


def test_a_failing_step_is_recorded_with_its_exit_code_and_the_end_of_its_log(boxed_run):
    tmp, run, _ = boxed_run
    failed = results(tmp)["bench_130m"]
    assert failed["status"] == "failed" and failed["rc"] == 7
    assert failed["log_tail"] == [f"line {i}" for i in range(27, 41)] + ["the error"]
    table = (tmp / "out" / "results.md").read_text()
    assert "## bench_130m: failed (rc 7)" in table and table.index("line 40") < table.index("the error")


def wait_for(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_a_run_stopped_mid_step_keeps_the_finished_steps(tmp_path, sig):
    env = {"PROVE_CMD_PREPARE": "echo done", "PROVE_CMD_TORCH_EAGER": "echo started; sleep 60",
           "PROVE_CMD_TORCH_COMPILE": "echo never"}
    run = prove(tmp_path, "--steps", "prepare torch_eager torch_compile", env=env, start_new_session=True)
    log = tmp_path / "work" / "logs" / "torch_eager.log"
    try:
        wait_for(lambda: log.is_file() and "started" in log.read_text())
        os.kill(run.pid, sig)  # the script alone, as a device command's limit or a person would
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        # A step runs in its own process group (timeout leads it); SIGKILL leaves it orphaned.
        step_group = int((tmp_path / "work" / "current.pid").read_text())
        if sig == signal.SIGKILL:
            os.killpg(step_group, signal.SIGKILL)
    found = results(tmp_path)
    assert found["prepare"]["status"] == "ok" and found["prepare"]["log_tail"] == ["done"]
    assert "torch_compile" not in found
    if sig == signal.SIGTERM:  # the trap records the step it stopped, and stops the step itself
        assert run.returncode == 143
        assert found["torch_eager"]["status"] == "interrupted"
        assert "| torch_eager | interrupted |" in (tmp_path / "out" / "results.md").read_text()
        wait_for(lambda: not group_alive(step_group), 15)
    else:
        assert "torch_eager" not in found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_rehearsal_packs_and_plans_the_composer_run(tmp_path):
    """The prepare step for real, CPU-sized: tools/pack.py on a small stdlib package, then
    create_mamba_config.py's plan read back (micro batch from the config, its memory estimate)."""
    small = Path(json.__file__).parent
    run = prove(tmp_path, "--rehearse", "--steps", "prepare", env={"PROVE_PACK_INPUT": str(small)})
    assert run.returncode == 0, run.stdout + run.stderr
    prepared = results(tmp_path)["prepare"]
    assert prepared["status"] == "ok", prepared["log_tail"]
    (row,) = prepared["rows"]
    index = json.loads((tmp_path / "work" / "packed" / "index.json").read_text())
    assert row["tokens"] == index["total_tokens"] > 10_000
    assert row["micro_batch"] == 8 and row["seq_len"] == 256 and row["max_duration"] == "8ba"
    assert row["planner_gb"] > 0
    assert "REHEARSAL" in results(tmp_path)["env"]["note"]


def test_the_table_compares_the_steps_measurements(tmp_path):
    """proof.py's summary over records as the steps write them: the torch path against the
    kernels' row of the same micro batch, Composer against the bare loop and the planner, and the
    kernel tests' cold-minus-warm time."""
    import proof

    bench = [{"shape": "130m", "mixer": m, "impl": "ours, documents", "micro_batch": b, "tokens_per_s": t, "kernels": True}
             for m, b, t in [("mamba1", 8, 400_000.0), ("mamba2", 8, 500_000.0), ("mamba1", 32, 450_000.0),
                             ("mamba3", 8, 300_000.0)]]
    bench.append({"shape": "130m", "mixer": "mamba3", "impl": "ours, documents, torch path", "micro_batch": 8,
                  "tokens_per_s": 60_000.0, "kernels": False, "vs_kernels": 0.2})  # model_gpu.py's Mamba-3 pair
    eager = [{"shape": "130m", "mixer": "mamba1", "impl": "eager", "micro_batch": 8, "tokens_per_s": 100_000.0},
             {"shape": "130m", "mixer": "mamba2", "impl": "kernels", "micro_batch": 8, "skipped": "still building"}]
    compiled = [{"shape": "130m", "mixer": "mamba2", "impl": "compile", "micro_batch": 8, "tokens_per_s": 250_000.0,
                 "compile_s": 61.0}]
    kernels = [{"test": f"t::{n}", "outcome": "passed", "seconds": s} for n, s in [("a", 50.0), ("b", 30.0)]]
    warm = [{"test": "t::a", "outcome": "passed", "seconds": 5.0}, {"test": "t::b", "outcome": "failed", "seconds": 3.0}]
    composer = [{"micro_batch": 32, "tokens_per_s": 405_000.0, "peak_gb": 60.0, "planner_gb": 68.3, "batches": 20}]
    out = tmp_path / "out"
    out.mkdir()
    for step, rows in [("bench_130m", bench), ("torch_eager", eager), ("torch_compile", compiled),
                       ("kernels_cold", kernels), ("kernels_warm", warm), ("composer_130m", composer)]:
        proof.append_line(out / "results.json", {"step": step, "status": "ok", "rc": 0, "rows": rows})
    with open(out / "results.json", "a") as f:
        f.write('{"step": "torn", "sta')  # a writer killed mid-line: left out, not fatal
    table = proof.summary(out)
    assert "1 failed, 1 passed in 8 s; slowest a 5 s" in table
    assert "torch path, eager, mamba1 130m micro batch 8: 100,000 tok/s = 0.25x the kernels' 400,000 tok/s" in table
    assert "0.50x the kernels' 500,000 tok/s; first step (compilation) 61 s" in table
    assert "eager, mamba3 130m micro batch 8 (model_gpu.py): 60,000 tok/s = 0.20x the kernels' 300,000 tok/s" in table
    assert "405,000 tok/s = 0.90x the bare loop, the kernels' 450,000 tok/s" in table
    assert "peak memory 60.0 GB (torch.cuda.max_memory_allocated) = 0.88x the planner's 68.3 GB" in table
    assert "80 s with an empty Triton cache, 8 s with it filled; the difference, 72 s" in table
    assert "torn" not in table and (out / "results.md").read_text() == table


def test_composer_rows_take_the_steady_half_and_the_peak(tmp_path):
    import proof

    metrics = tmp_path / "metrics.jsonl"
    rates = [1.0, 2.0, 100.0, 101.0, 99.0, 102.0]  # the first batches hold compilation and warm-up
    with open(metrics, "w") as f:
        for batch, rate in enumerate(rates, 5):
            f.write(json.dumps({"batch": batch, "throughput/device/tokens_per_sec": rate, "loss/train/total": 9.0 - batch,
                                "memory/max_allocated_gib": 50.0 + batch}) + "\n")
    row = proof.composer_rows(metrics, {"micro_batch": 32, "planner_gb": 68.3})
    assert row["tokens_per_s"] == 101.0 and row["rates_used"] == 3 and row["batches"] == 10
    assert row["peak_gb"] == pytest.approx(60.0 * 2**30 / 1e9) and row["loss_last"] == -1.0 and row["micro_batch"] == 32


def test_the_pytest_hook_writes_a_line_per_finished_test(tmp_path):
    """`pytest -p proof` as the kernel steps run it: outcome and seconds of each test as it ends."""
    (tmp_path / "test_three.py").write_text(
        "import pytest, time\n"
        "def test_ok():\n    time.sleep(0.3)\n"
        "def test_bad():\n    assert False\n"
        "@pytest.mark.skip(reason='no GPU')\ndef test_gpu():\n    pass\n")
    rows = tmp_path / "rows.jsonl"
    env = {**os.environ, "PROOF_PYTEST_ROWS": str(rows), "PYTHONPATH": str(REPO / "benchmarks" / "gpu")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "proof", "-p", "no:cacheprovider", "-q", "test_three.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout
    found = {r["test"]: r for r in map(json.loads, rows.read_text().splitlines())}
    assert {t: r["outcome"] for t, r in found.items()} == {
        "test_three.py::test_ok": "passed", "test_three.py::test_bad": "failed", "test_three.py::test_gpu": "skipped"}
    assert found["test_three.py::test_ok"]["seconds"] >= 0.3


def test_the_wheels_chosen_for_this_python_fill_only_its_gaps(tmp_path):
    """bundle.py select over a folder of (empty) files named as the bundle's wheels: every
    [always] one, and of the [if-missing] ones only those this venv lacks."""
    sections = bundle.read_requirements()
    for name, version in sections["always"] + sections["if-missing"]:
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    for name, version in sections["sdist"]:
        (tmp_path / f"{name.replace('-', '_')}-{version}.tar.gz").write_bytes(b"")
    chosen = {bundle.dist_of(p.name)[0] for p in bundle.select(tmp_path, sections)}
    always = {bundle.normalize(n) for n, _ in sections["always"]}
    missing = {bundle.normalize(n) for n, _ in sections["if-missing"] if not bundle.installed(n)}
    assert chosen == always | missing
    assert "tabulate" not in chosen and "mamba-ssm" not in chosen  # installed here; a source, built there


SETUP_EXCERPT = """
if not SKIP_CUDA_BUILD:
    cc_flag = []
    if HIP_BUILD:
        cc_flag.append("-DBUILD_PYTHON_PACKAGE")
    else:
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        if bare_metal_version >= Version("13.0"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_121,code=sm_121")


    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI is set to be the same as
    flags = cc_flag
"""


def test_the_setup_patch_leaves_one_cuda_arch(tmp_path):
    """The shape of mamba-ssm's and causal-conv1d's setup.py around their arch list (the real
    files of the pinned sdists are patched in the bundle test): after the patch, the list is sm_90 alone
    whatever branch ran; patching twice changes nothing; without the anchor it refuses."""
    setup = tmp_path / "setup.py"
    setup.write_text(SETUP_EXCERPT)
    bundle.patch_setup(setup, "90")
    patched = setup.read_text()
    bundle.patch_setup(setup, "90")
    assert setup.read_text() == patched
    scope = {"SKIP_CUDA_BUILD": False, "HIP_BUILD": False, "bare_metal_version": 13.0, "Version": float}
    exec(patched, scope)
    assert scope["flags"] == ["-gencode", "arch=compute_90,code=sm_90"]
    setup.write_text("cc_flag = []\n")
    with pytest.raises(SystemExit, match="no cc_flag list before a '# HACK' line"):
        bundle.patch_setup(setup, "90")


def test_the_static_import_walk_agrees_with_python(tmp_path):
    """bundle.third_party_imports (read, not imported: sdists of GPU code) against the interpreter:
    what it calls required, a real import loads, and demands; what it calls optional, it does not."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, mamba.model; print(*sys.modules)"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=True).stdout.split()
    found = bundle.third_party_imports(REPO, ["mamba.model"])
    assert "torch" in found and {n for n, needed in found.items() if needed} <= {m.split(".")[0] for m in loaded}
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg/__init__.py").write_text("try:\n    import gone_a\nexcept ImportError:\n    pass\nfrom . import core\n")
    (src / "pkg/core.py").write_text("import gone_b\n\ndef later():\n    import gone_c\n")
    found = bundle.third_party_imports(src, ["pkg"])
    run, env = [sys.executable, "-c", "import pkg"], {**os.environ, "PYTHONPATH": str(src)}
    demanded = re.search(r"named '(\w+)'", subprocess.run(run, env=env, capture_output=True, text=True).stderr)[1]
    assert {n for n, needed in found.items() if needed} == {demanded} and set(found) == {demanded, "gone_a"}
    (src / f"{demanded}.py").write_text("")  # provided: now the import must succeed
    subprocess.run(run, env=env, check=True)


# --- the bundle ------------------------------------------------------------------------------------
# Building it downloads ~25 MiB from PyPI (15-20 s) and installing it into the bare site takes
# 30-45 s on a 2-core machine: together more than this suite's other tests, on every commit and
# both stacks, and dependent on PyPI answering. So these run when GPU_PROOF_BUNDLE=1 is set: run
# them after changing requirements-gpu.txt, wheelhouse.sh or bundle.py, and before a GPU session.
needs_bundle = pytest.mark.skipif(not os.environ.get("GPU_PROOF_BUNDLE"),
                                  reason="downloads the GPU proof's bundle from PyPI: set GPU_PROOF_BUNDLE=1")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """wheelhouse.sh for this interpreter's Python (the GPU machine's would be 3.12), downloaded
    once for the module: about 25 MiB."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "wheelhouse.sh"), str(folder), "--python-version",
                          version, "--python", sys.executable], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return folder, run.stdout


@needs_bundle
def test_the_bundle_fits_and_its_manifest_matches_its_files(wheelhouse, tmp_path):
    folder, printed = wheelhouse
    rows = [line.split("\t") for line in (folder / "MANIFEST.tsv").read_text().splitlines()]
    files = {p.name for p in bundle.bundle_files(folder)}
    assert {name for name, _, _ in rows} == files
    for name, size, digest in rows:
        assert (folder / name).stat().st_size == int(size) and bundle.sha256(folder / name) == digest
    total = sum(int(size) for _, size, _ in rows)
    assert total <= 60 * 2**20 and f"{len(rows)} files, {total / 2**20:.2f} MiB" in printed
    sections = bundle.read_requirements()
    assert bundle.check_complete(folder, sections) == []
    sdists = {name: f"{name.replace('-', '_')}-{version}" for name, version in sections["sdist"]}
    assert {f"{s}.tar.gz" for s in sdists.values()} <= files
    for sdist in sdists.values():  # the real setup.py takes the patch
        subprocess.run(["tar", "xzf", str(folder / f"{sdist}.tar.gz"), "-C", str(tmp_path)], check=True)
        bundle.patch_setup(tmp_path / sdist / "setup.py", "90")
        text = (tmp_path / sdist / "setup.py").read_text()
        assert text.index('cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]') < text.index("# HACK")
    # What the pinned mamba-ssm and its Mamba-3 kernel import unguarded is there despite --no-deps.
    source, kernel = tmp_path / sdists["mamba-ssm"], "mamba_ssm.ops.triton.mamba3.mamba3_siso_"
    found = bundle.third_party_imports(source, ["mamba_ssm", kernel + "combined", kernel + "step"])
    required = {bundle.normalize(name) for name, needed in found.items() if needed}
    provided = {bundle.normalize(n) for pins in sections.values() for n, _ in pins} | {"torch", "triton", "numpy"}
    setup_py = (source / "setup.py").read_text()
    provided |= {bundle.normalize(n) for n in re.findall(r'CUDAExtension\(\s*name="(\w+)"', setup_py)}
    assert {"torch", "triton", "einops", "selective-scan-cuda"} <= required <= provided, required - provided
    assert found.get("tilelang") is False and found.get("quack") is False  # MIMO, CuTe step: optional


def top_level(dist: metadata.Distribution) -> set[str]:
    """The site-packages entries a distribution installed (packages, modules, its .dist-info)."""
    return {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}


def bare_site(target: Path) -> Path:
    """A site folder holding only torch, torchvision, pip and what they require (links into this
    venv): the GPU machine's minimum. Everything else must come from the bundle."""
    from packaging.requirements import Requirement

    wanted, todo = set(), ["torch", "torchvision", "pip"]
    while todo:
        name = bundle.normalize(todo.pop())
        if name in wanted:
            continue
        wanted.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    target.mkdir()
    for name in wanted:
        dist = metadata.distribution(name)
        for entry in top_level(dist):
            source = Path(dist.locate_file(entry))
            if source.exists() and not (target / entry).exists():
                (target / entry).symlink_to(source)
    return target


@needs_bundle
def test_the_bundle_installs_from_files_alone_and_composer_imports_from_it(wheelhouse, tmp_path):
    """prove.sh's install step under a Python that sees only the bare site (python -S: no
    site-packages): it verifies the manifest, selects the [always] wheels and the [if-missing]
    ones that this Python lacks, installs them with --no-index, and imports composer. Then the
    trainer, transformers and composer import from the target folder over this venv's torch."""
    folder, _ = wheelhouse
    bare = bare_site(tmp_path / "bare")
    python = tmp_path / "python-bare"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    env = {"PYTHON": str(python), "PYTHONPATH": str(bare)}
    run = prove(tmp_path, "--wheels", str(folder), "--steps", "", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    installed = results(tmp_path)["install"]
    assert installed["status"] == "ok", installed["log_tail"]
    site = tmp_path / "work" / "site"
    names = {bundle.normalize(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
    sections = bundle.read_requirements()
    assert {bundle.normalize(n) for n, _ in sections["always"]} <= names
    assert "tabulate" in names and "numpy" not in names and "torch" not in names  # filled gaps only
    probe = ("import composer, transformers, torch, mamba.training.trainer;"
             "print(composer.__file__); print(transformers.__version__); print(torch.__file__)")
    check = subprocess.run([str(python), "-c", probe], env={**os.environ, "PYTHONPATH": f"{site}:{REPO}:{bare}"},
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    composer_file, transformers_version, torch_file = check.stdout.split()
    assert Path(composer_file).is_relative_to(site) and transformers_version == "4.53.3"
    assert Path(torch_file).is_relative_to(bare)  # the venv's torch, through the bare site's link
