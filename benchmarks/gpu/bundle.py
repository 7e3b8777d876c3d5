"""The bundle of files the GPU proof installs from on a machine without network.

    python benchmarks/gpu/bundle.py reqs --section always [--section ...]   pins of those sections
    python benchmarks/gpu/bundle.py manifest DIR [--budget-mib 60]         write DIR/MANIFEST.tsv
    python benchmarks/gpu/bundle.py verify DIR                             sha256 of every file
    python benchmarks/gpu/bundle.py select DIR                             wheels to install here
    python benchmarks/gpu/bundle.py patch-setup SETUP_PY SM                one CUDA arch, e.g. 90
    python benchmarks/gpu/bundle.py imports SOURCE_DIR MODULE [MODULE ...] what importing them needs

wheelhouse.sh (here, with network) calls reqs and manifest; prove.sh (there) calls verify, select
and patch-setup. `imports` is for choosing the pins: which third-party modules an unpacked sdist's
modules import, and which only inside try/except ImportError (the package runs without them).
Standard library only: it runs before anything is installed, under whichever Python the GPU
machine has.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-gpu.txt"
SECTIONS = ("always", "if-missing", "sdist")
MIB = 2**20


def normalize(name: str) -> str:
    """PEP 503 names: 'ruamel.yaml', 'Ruamel_Yaml' and 'ruamel-yaml' are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path = REQUIREMENTS) -> dict[str, list[tuple[str, str]]]:
    """{section: [(name, version), ...]} from the `# [section]` headers of requirements-gpu.txt.
    Every line must be an exact `name==version` pin inside a known section: a loose or misplaced
    line would make the bundle depend on the day it was downloaded."""
    sections: dict[str, list[tuple[str, str]]] = {s: [] for s in SECTIONS}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        header = re.match(r"#\s*\[([a-z-]+)\]", raw)
        if header:
            current = header.group(1)
            if current not in sections:
                raise ValueError(f"{path}:{number}: unknown section [{current}] (known: {', '.join(SECTIONS)})")
            continue
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pin = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if current is None or pin is None:
            raise ValueError(f"{path}:{number}: expected name==version inside a [section], got {line!r}")
        sections[current].append((pin.group(1), pin.group(2)))
    return sections


def dist_of(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel or sdist file name; None for anything else.
    Wheels escape '-' in the name as '_' (PEP 427), sdists are name-version.tar.gz."""
    if filename.endswith(".whl"):
        name, version = filename[:-4].split("-")[:2]
        return normalize(name), version
    for suffix in (".tar.gz", ".zip"):
        if filename.endswith(suffix):
            name, _, version = filename[: -len(suffix)].rpartition("-")
            return normalize(name), version
    return None


def bundle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and dist_of(p.name))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_complete(folder: Path, sections: dict) -> list[str]:
    """Problems: a pin with no file, a file for no pin, two versions of one package."""
    wanted = {normalize(n): v for pins in sections.values() for n, v in pins}
    found: dict[str, list[str]] = {}
    for path in bundle_files(folder):
        name, version = dist_of(path.name)
        found.setdefault(name, []).append(version)
    problems = [f"{n}=={v}: no file" for n, v in wanted.items() if n not in found]
    problems += [f"{path_name}: not in {REQUIREMENTS.name}" for path_name in found if path_name not in wanted]
    problems += [f"{n}: {len(vs)} files ({', '.join(vs)}); pip there refuses two" for n, vs in found.items() if len(vs) > 1]
    problems += [f"{n}: file is {vs[0]}, pin is {wanted[n]}" for n, vs in found.items()
                 if n in wanted and len(vs) == 1 and vs[0] != wanted[n]]
    return problems


def write_manifest(folder: Path, budget_mib: float) -> int:
    """MANIFEST.tsv (file, bytes, sha256) and the total; exit status 1 when over budget or
    incomplete, naming why, so a bundle that would not fit the carry or install is never used."""
    files = bundle_files(folder)
    rows = [(p.name, p.stat().st_size, sha256(p)) for p in files]
    (folder / "MANIFEST.tsv").write_text("".join(f"{n}\t{s}\t{h}\n" for n, s, h in rows))
    total = sum(s for _, s, _ in rows)
    for name, size, _ in sorted(rows, key=lambda r: -r[1]):
        print(f"{size / MIB:8.2f} MiB  {name}")
    print(f"{len(rows)} files, {total / MIB:.2f} MiB (budget {budget_mib:g} MiB) in {folder}")
    problems = check_complete(folder, read_requirements())
    for problem in problems:
        print(f"bundle incomplete: {problem}", file=sys.stderr)
    if total > budget_mib * MIB:
        print(f"bundle too large: {total / MIB:.2f} MiB > {budget_mib:g} MiB; a device call carries at most "
              f"64 MiB of ignored files", file=sys.stderr)
        return 1
    return 1 if problems else 0


def verify(folder: Path) -> int:
    """Every file of MANIFEST.tsv present with its size and sha256 (a carry cut short, or a
    hand-added wheel, is caught before pip installs half of it)."""
    bad = []
    for line in (folder / "MANIFEST.tsv").read_text().splitlines():
        name, size, digest = line.split("\t")
        path = folder / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif path.stat().st_size != int(size) or sha256(path) != digest:
            bad.append(f"{name}: size or sha256 differs from MANIFEST.tsv")
    for problem in bad:
        print(problem, file=sys.stderr)
    print(f"verify {folder}: {'ok' if not bad else f'{len(bad)} bad'}", file=sys.stderr)
    return 1 if bad else 0


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def select(folder: Path, sections: dict) -> list[Path]:
    """The wheels to install under this interpreter: every [always] one, and an [if-missing] one
    only when no version of it is installed (run it without the bundle's target folder on
    PYTHONPATH, or everything looks installed after the first run)."""
    always = {normalize(n) for n, _ in sections["always"]}
    missing = {normalize(n) for n, _ in sections["if-missing"] if not installed(n)}
    return [p for p in bundle_files(folder) if p.name.endswith(".whl") and dist_of(p.name)[0] in always | missing]


def patch_setup(setup_py: Path, sm: str) -> None:
    """Make mamba-ssm's or causal-conv1d's setup.py build for one GPU architecture: their list
    covers sm_75 to sm_121 (on CUDA 13, nine), and each one compiles every kernel again. The line
    goes right before the "# HACK" comment that follows the list, so it overrides whatever the
    list became; the patch is refused when that anchor is not where it is in mamba-ssm
    2.3.2.post1 and causal-conv1d 1.5.3.post1 (and was in mamba-ssm 2.3.1)."""
    text = setup_py.read_text()
    marker = "# patched by benchmarks/gpu/bundle.py"
    if marker in text:
        return
    anchor = re.search(r"^([ \t]*)# HACK", text, flags=re.M)
    if not anchor or "cc_flag" not in text[: anchor.start()]:
        raise SystemExit(f"{setup_py}: no cc_flag list before a '# HACK' line; cannot pin the CUDA arch")
    line = f'{anchor.group(1)}cc_flag = ["-gencode", "arch=compute_{sm},code=sm_{sm}"]  {marker}\n'
    setup_py.write_text(text[: anchor.start()] + line + text[anchor.start():])


# Handlers under which a failed import is survived: the module then runs without that package.
SURVIVES_IMPORT_ERROR = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _module_level_imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(absolute module name, guarded) of each import statement that runs when `module` (the file
    `path`) is imported: module level, inside if/with/try too, not inside functions or classes.
    Guarded: inside a try whose handlers catch ImportError (or a bare except)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def walk(statements, guarded: bool) -> None:
        for node in statements:
            if isinstance(node, ast.Try):
                caught = [h.type.elts if isinstance(h.type, ast.Tuple) else [h.type] for h in node.handlers]
                catches = any(t is None or getattr(t, "id", "") in SURVIVES_IMPORT_ERROR for ts in caught for t in ts)
                walk(node.body, guarded or catches)
                for part in (node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    walk(part, guarded)
            elif isinstance(node, (ast.If, ast.With)):
                walk(node.body, guarded)
                walk(getattr(node, "orelse", []), guarded)
            elif isinstance(node, ast.Import):
                found.extend((alias.name, guarded) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                found.append((base, guarded))
                found.extend((f"{base}.{alias.name}", guarded) for alias in node.names)  # maybe submodules

    walk(ast.parse(path.read_text(), filename=str(path)).body, False)
    return found


def third_party_imports(source: Path, modules: list[str]) -> dict[str, bool]:
    """{top-level name: required} of the modules outside the standard library and outside
    `source` (an unpacked sdist) that importing `modules` from `source` imports, following its own
    modules (parents' __init__ first, as Python does). required is False when every import of the
    name is guarded, also through a guarded import of one of source's own modules. Static (ast):
    a package of GPU kernels cannot be imported without a GPU to watch what it loads."""
    def file_of(name: str) -> Path | None:
        base = source.joinpath(*name.split("."))
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None

    missing = [m for m in modules if file_of(m) is None]
    if missing:
        raise SystemExit(f"{source}: no module {', '.join(missing)} there; pass an unpacked sdist's folder "
                         "and dotted module names inside it")
    required: dict[str, bool] = {}
    seen: set[tuple[str, bool]] = set()
    todo = [(m, False) for m in modules]
    while todo:
        name, guarded = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            path = file_of(prefix)
            if path is None:
                if depth == 1 and parts[0] not in sys.stdlib_module_names and not (source / parts[0]).is_dir():
                    required[parts[0]] = required.get(parts[0], False) or not guarded
                continue  # a name imported from a module (a function), not a module of its own
            if (prefix, guarded) not in seen:
                seen.add((prefix, guarded))
                todo.extend((dep, guarded or g) for dep, g in _module_level_imports(path, prefix))
    return dict(sorted(required.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reqs")
    p.add_argument("--section", action="append", choices=SECTIONS, required=True)
    p = sub.add_parser("manifest")
    p.add_argument("folder", type=Path)
    p.add_argument("--budget-mib", type=float, default=60)
    p = sub.add_parser("verify")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("select")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("patch-setup")
    p.add_argument("setup_py", type=Path)
    p.add_argument("sm", help="compute capability without the dot, e.g. 90")
    p = sub.add_parser("imports")
    p.add_argument("source", type=Path, help="an unpacked sdist, e.g. mamba_ssm-2.3.2.post1/")
    p.add_argument("modules", nargs="+", help="dotted module names, e.g. mamba_ssm")
    args = parser.parse_args(argv)
    if args.command == "reqs":
        sections = read_requirements()
        print("\n".join(f"{n}=={v}" for s in args.section for n, v in sections[s]))
    elif args.command == "manifest":
        return write_manifest(args.folder, args.budget_mib)
    elif args.command == "verify":
        return verify(args.folder)
    elif args.command == "select":
        print("\n".join(str(p) for p in select(args.folder, read_requirements())))
    elif args.command == "patch-setup":
        patch_setup(args.setup_py, args.sm)
    elif args.command == "imports":
        for name, needed in third_party_imports(args.source, args.modules).items():
            print(f"{name}\t{'required' if needed else 'optional (try/except ImportError)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
