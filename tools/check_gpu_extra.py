"""Check that ``pip install .[gpu]`` resolves on a GPU machine, without installing or building.

Runs pip's own resolver (``pip install --dry-run --report``) over the requirements that setup.py
declares for the project and the extra (the core pins plus ``extras_require["gpu"]``), for a
Linux x86_64 GPU machine (CPython 3.11, manylinux up to glibc 2.35: Ubuntu 22.04, the CUDA base
images) and from the packages' published metadata only:

- ``--only-binary=:all:`` so nothing is built (pip would otherwise build a source distribution
  just to learn its dependencies, and Transformer Engine's needs torch and CUDA for that);
- ``--isolated`` and ``PIP_CONFIG_FILE=/dev/null``: this machine's pip configuration, its
  PIP_* variables and every pip.conf (here: a CPU torch wheel in find-links, a torch cap as a
  global constraint, local file indexes) are ignored; what the registry publishes is what counts;
- ``--use-feature=fast-deps`` with a pinned, current pip: the registry here serves no separate
  metadata files (PEP 658), so pip would download every wheel (vllm 326 MB, torch and the CUDA
  libraries several GB) to read its METADATA; fast-deps reads it with HTTP range requests.

A package that publishes only a source distribution for that platform has no metadata pip can
read without building it. The check names each such package and version, reads the PKG-INFO of
its source distribution (a few hundred KB): when PKG-INFO declares its requirements statically
(Metadata 2.2+, requires-dist not "Dynamic") they are used; otherwise the check says they
cannot be read without building and leaves them out. Either way a small stand-in wheel with
that metadata takes the package's place in the resolution (a temporary find-links folder), so
that everything else is still checked.

Exit 0: resolved (a summary of the key versions is printed, the full pip report is kept with
--report). Exit 1: the pins conflict (pip's explanation, naming the packages, is printed).
Exit 2: the check itself could not run (registry unreachable, pip bootstrap failed, timeout).

    python tools/check_gpu_extra.py                      # the project's [gpu] extra
    python tools/check_gpu_extra.py --requirement torch==2.13.0 --requirement vllm==0.33.0
"""
from __future__ import annotations

import argparse
import email.parser
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PIP_VERSION = "26.3"  # fast-deps works in dry-run mode here (pip 23.2 still downloaded whole wheels)
INDEX = "https://pypi.org/simple"
KEY_PACKAGES = ("torch", "vllm", "transformers", "megatron-core", "ray", "flashinfer-python", "triton",
                "transformer-engine", "transformer-engine-cu12", "transformer-engine-cu13",
                "transformer-engine-torch", "numpy", "tensorboard")


NETWORK_ERRORS = (r"Retrying \(Retry\(|NewConnectionError|ConnectTimeoutError|ReadTimeoutError|Max retries exceeded|"
                  r"SSLError|ProxyError|Temporary failure in name resolution")


class CheckError(Exception):
    """The check could not run (exit 2), as opposed to a conflict (exit 1)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------- requirements
def project_requirements(extra: str, setup_py: Path = ROOT / "setup.py") -> list[str]:
    """install_requires + extras_require[extra] as setup.py declares them (setup() is captured,
    nothing is built or written)."""
    import runpy

    import setuptools

    captured: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(setup_py), run_name="__check_gpu_extra__")
    finally:
        setuptools.setup = real
    extras = captured.get("extras_require", {})
    if extra not in extras:
        raise CheckError(f"setup.py has no extra {extra!r} (it has {sorted(extras)})")
    return list(captured.get("install_requires", [])) + list(extras[extra])


# ----------------------------------------------------------------------------- pip
def pip_env() -> dict[str, str]:
    """The environment for pip: no configuration file at all (``--isolated`` alone still reads the
    global ones, /etc/pip.conf and /etc/xdg/pip/pip.conf)."""
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull}


def platforms(glibc_max: int) -> list[str]:
    tags = [f"manylinux_2_{g}_x86_64" for g in range(glibc_max, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def pip_command(cache: Path, timeout_s: float) -> list[str]:
    """A command running pip==PIP_VERSION, installed once into ``cache`` (a --target folder)."""
    target = cache / f"pip-{PIP_VERSION}"
    if not (target / "pip" / "__init__.py").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "-q",
               "--no-deps", "--timeout", "30", "--retries", "2", "--target", str(target), f"pip=={PIP_VERSION}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=pip_env())
        except subprocess.TimeoutExpired:
            raise CheckError(f"installing pip=={PIP_VERSION} for the check took over {timeout_s:.0f} s")
        if r.returncode != 0:
            raise CheckError(f"could not install pip=={PIP_VERSION} for the check: {r.stderr.strip()[-2000:]}")
    return [sys.executable, str(Path(__file__).resolve()), "--run-pip", str(target)]


def run_resolver(pip: list[str], requirements: list[str], find_links: Optional[Path], report: Path,
                 python_version: str, glibc_max: int, timeout_s: float) -> subprocess.CompletedProcess:
    abi = "cp" + python_version.replace(".", "")
    cmd = [*pip, "install", "--isolated", "--disable-pip-version-check", "--no-cache-dir", "--dry-run",
           "--ignore-installed", "--only-binary=:all:", "--use-feature=fast-deps",
           "--timeout", "60", "--retries", "2", "--index-url", INDEX,
           "--python-version", python_version, "--implementation", "cp", "--abi", abi,
           *[a for p in platforms(glibc_max) for a in ("--platform", p)],
           "--report", str(report), "--progress-bar", "off"]
    if find_links is not None:
        cmd += ["--find-links", str(find_links)]
    try:
        return subprocess.run([*cmd, *requirements], capture_output=True, text=True, timeout=timeout_s,
                              env=pip_env())
    except subprocess.TimeoutExpired:
        raise CheckError(f"pip's resolver ran past {timeout_s:.0f} s (backtracking or a slow registry); "
                         "narrow the ranges in setup.py or raise --timeout")


# ----------------------------------------------------------------------------- the index
def index_files(name: str) -> list[dict]:
    """The files the registry lists for ``name`` (PEP 691 JSON simple API)."""
    req = urllib.request.Request(f"{INDEX}/{canonical(name)}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)["files"]
    except Exception as err:  # noqa: BLE001 - any network or format failure: the check cannot run
        raise CheckError(f"could not read the index page of {name}: {err}")


def _supported_tags(python_version: str, glibc_max: int) -> set:
    from packaging import tags

    major, minor = (int(x) for x in python_version.split("."))
    interp = f"cp{major}{minor}"
    found = set(tags.cpython_tags((major, minor), abis=[interp, "abi3", "none"], platforms=platforms(glibc_max)))
    found |= set(tags.compatible_tags((major, minor), interp, platforms(glibc_max)))
    return found


def sdist_only_versions(name: str, python_version: str, glibc_max: int) -> dict[str, dict]:
    """version -> its source distribution's file entry, for every version of ``name`` that has a
    source distribution and no wheel for the target platform."""
    from packaging.utils import InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

    supported = _supported_tags(python_version, glibc_max)
    wheels, sdists = set(), {}
    for f in index_files(name):
        if f.get("yanked"):
            continue
        fn = f["filename"]
        if fn.endswith(".whl"):
            try:
                _, ver, _, wtags = parse_wheel_filename(fn)
            except InvalidWheelFilename:
                continue
            if wtags & supported:
                wheels.add(str(ver))
        elif fn.endswith((".tar.gz", ".zip")):
            try:
                _, ver = parse_sdist_filename(fn)
            except Exception:  # noqa: BLE001 - an odd file name: not ours to judge
                continue
            sdists[str(ver)] = f
    return {v: f for v, f in sdists.items() if v not in wheels}


def sdist_metadata(entry: dict) -> tuple[Optional[list[str]], str]:
    """(requirements, why) from a source distribution's PKG-INFO: the list when it is static,
    None when the requirements are dynamic (known only by building)."""
    try:
        with urllib.request.urlopen(entry["url"], timeout=60) as resp:
            data = resp.read()
    except Exception as err:  # noqa: BLE001
        raise CheckError(f"could not download {entry['filename']}: {err}")
    text = None
    if entry["filename"].endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = sorted((n for n in z.namelist() if n.count("/") == 1 and n.endswith("/PKG-INFO")), key=len)
            text = z.read(names[0]).decode() if names else None
    else:
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            members = [m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
            text = t.extractfile(members[0]).read().decode() if members else None
    if text is None:
        return None, "its source distribution has no PKG-INFO"
    msg = email.parser.Parser().parsestr(text)
    declared = msg.get_all("Requires-Dist") or []
    version = msg.get("Metadata-Version", "1.0")
    dynamic = {d.strip().lower() for d in (msg.get_all("Dynamic") or [])}
    if tuple(int(x) for x in version.split(".")[:2]) < (2, 2):
        return None, f"PKG-INFO is Metadata {version} (before 2.2 nothing in it is binding): declares {declared}"
    if "requires-dist" in dynamic:
        return None, f"PKG-INFO marks requires-dist Dynamic (set at build time); as uploaded it declares {declared}"
    return declared, "PKG-INFO declares its requirements statically"


def write_stand_in(folder: Path, name: str, version: str, requires: list[str], python_requires: Optional[str]) -> Path:
    """A minimal wheel carrying only ``name``'s metadata, for the resolver (never installed)."""
    dist = re.sub(r"[-_.]+", "_", name)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
            "Summary: stand-in for the dependency check (tools/check_gpu_extra.py)"]
    if python_requires:
        meta.append(f"Requires-Python: {python_requires}")
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{info}/METADATA", "\n".join(meta) + "\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: check_gpu_extra\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


# ----------------------------------------------------------------------------- pip's messages
def unavailable_names(stderr: str) -> set[str]:
    """Packages pip found no usable distribution of (candidates for 'only a source build')."""
    names = set(re.findall(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)", stderr))
    block = re.search(r"some packages in these conflicts have no matching distributions available[^\n]*\n"
                      r"((?:[ \t]+\S+\n?)+)", stderr)
    if block:
        names |= {ln.strip() for ln in block.group(1).splitlines() if ln.strip()}
    return {canonical(n) for n in names}


def wanted_specifiers(name: str, output: str, requirements: list[str]) -> list[str]:
    """The specifiers asked of ``name``: by other packages in pip's message ('... depends on
    name==2.11.0', 'No matching distribution found for name>=1.7'), and by the requirements."""
    from packaging.requirements import InvalidRequirement, Requirement

    pat = re.compile(r"(?:depends on|requirement|found for) ([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?"
                     r"((?:[<>=!~]=?[^,;\s)]+,?)*)")
    specs = [spec.rstrip(",") for n, spec in pat.findall(output) if canonical(n) == name and spec]
    for r in requirements:
        try:
            req = Requirement(r)
        except InvalidRequirement:
            continue
        if canonical(req.name) == name and str(req.specifier):
            specs.append(str(req.specifier))
    return specs


def conflict_text(stderr: str) -> str:
    """pip's explanation of a conflict: the lines that name the packages."""
    keep, block = [], False
    for ln in stderr.splitlines():
        if ln.startswith(("The conflict is caused by", "Additionally")):
            block = True
        elif not ln.startswith(" "):
            block = False
        if block or (ln.startswith("ERROR:") and "Ignored the following versions" not in ln):
            keep.append(ln)
    return "\n".join(keep).strip() or stderr.strip()[-3000:]


# ----------------------------------------------------------------------------- the check
def check(requirements: list[str], python_version: str = "3.11", glibc_max: int = 35, timeout_s: float = 900,
          report_path: Optional[Path] = None, cache: Path = ROOT / ".cache" / "check_gpu_extra",
          log=print) -> int:
    from packaging.specifiers import SpecifierSet

    deadline = time.time() + timeout_s
    cache.mkdir(parents=True, exist_ok=True)
    pip = pip_command(cache, timeout_s=min(300, timeout_s))
    log(f"[gpu-extra] resolving {len(requirements)} requirement(s) for CPython {python_version}, "
        f"Linux x86_64 (manylinux, glibc <= 2.{glibc_max}), from the registry's published metadata, wheels "
        f"only, nothing installed: {' '.join(requirements)}")
    with tempfile.TemporaryDirectory(prefix="gpu-extra-") as tmp:
        stand_ins_dir = Path(tmp) / "stand-ins"
        stand_ins_dir.mkdir()
        report = Path(tmp) / "report.json"
        stand_ins: dict[str, dict[str, str]] = {}  # name -> version -> why
        for attempt in range(6):
            left = deadline - time.time()
            if left <= 0:
                raise CheckError(f"ran past {timeout_s:.0f} s")
            t0 = time.time()
            r = run_resolver(pip, requirements, stand_ins_dir if stand_ins else None, report,
                             python_version, glibc_max, left)
            log(f"[gpu-extra] pip resolver pass {attempt + 1}: exit {r.returncode} in {time.time() - t0:.0f} s")
            if r.returncode == 0:
                break
            out = r.stdout + "\n" + r.stderr  # pip prints the conflict's explanation on stdout
            new = False
            for name in sorted(unavailable_names(out)):
                only_src = sdist_only_versions(name, python_version, glibc_max)
                specs = wanted_specifiers(name, out, requirements)
                if not specs:
                    continue  # nothing says which version: do not guess
                versions = [v for v in only_src if v not in stand_ins.get(name, {})
                            and any(SpecifierSet(s).contains(v, prereleases=True) for s in specs)]
                for v in versions:  # none: no such release at all, or it has a wheel: a real "not found"
                    requires, why = sdist_metadata(only_src[v])
                    write_stand_in(stand_ins_dir, name, v, requires or [], only_src[v].get("requires-python"))
                    stand_ins.setdefault(name, {})[v] = why if requires is not None else \
                        f"its dependencies cannot be read without building it ({why}); left out of the check"
                    new = True
            if not new:
                if re.search(NETWORK_ERRORS, out) and "ResolutionImpossible" not in out:
                    raise CheckError(f"pip could not reach the registry:\n{out.strip()[-2000:]}")
                log("[gpu-extra] FAIL: the requirements do not resolve together:")
                log(conflict_text(out))
                _report_stand_ins(stand_ins, log)
                return 1
        else:
            raise CheckError("no resolution after 6 passes")
        data = json.loads(report.read_text())
        if report_path is not None:
            report_path.write_text(json.dumps(data, indent=1))
    got = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}
    log(f"[gpu-extra] OK: resolves to {len(got)} packages; "
        + ", ".join(f"{n} {got[n]}" for n in KEY_PACKAGES if n in got))
    _report_stand_ins(stand_ins, log, got)
    return 0


def _report_stand_ins(stand_ins: dict[str, dict[str, str]], log, resolved: Optional[dict] = None) -> None:
    """Name every package that only has a source distribution: the resolved version in full, the
    other versions the resolver tried in one line."""
    for name, versions in sorted(stand_ins.items()):
        chosen = [v for v in versions if resolved is None or resolved.get(name) == v]
        for v in chosen:
            log(f"[gpu-extra] NOTE: {name} {v} publishes only a source distribution (no wheel for this "
                f"platform): {versions[v]}")
        others = sorted(set(versions) - set(chosen))
        if others:
            log(f"[gpu-extra] NOTE: {name} {', '.join(others)} (tried, not chosen): source distributions only, too")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-pip"]:  # internal: the pinned pip from its --target folder
        sys.path.insert(0, argv[1])
        from pip._internal.cli.main import main as pip_main

        return pip_main(argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra", default="gpu", help="the setup.py extra to check with the core pins (default gpu)")
    ap.add_argument("--requirement", action="append", default=[],
                    help="check these requirements instead of setup.py's (repeatable)")
    ap.add_argument("--python-version", default="3.11")
    ap.add_argument("--glibc", default="2.35", help="newest glibc of the target machines (default 2.35)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the whole check (default 900)")
    ap.add_argument("--report", type=Path, help="keep pip's JSON report of the resolution here")
    args = ap.parse_args(argv)
    try:
        reqs = args.requirement or project_requirements(args.extra)
        return check(reqs, args.python_version, int(args.glibc.split(".")[1]), args.timeout, args.report)
    except CheckError as err:
        print(f"[gpu-extra] ERROR: the check could not run: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
