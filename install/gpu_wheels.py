"""`make gpu-wheels`: the wheels `make gpu-check` needs on a lent GPU machine that cannot download.

    python install/gpu_wheels.py [--out .whl] [--python 3.12]

The lent machines run an image with Python 3.12, CUDA, torch, transformers, safetensors, pyarrow,
pyyaml, numpy, sympy, psutil, ninja and more (/work/.library/device/KINDS.md lists it) and reach no
registry. What the checks import beyond it is fetched here, at the versions this project pins:
DeepSpeed (a source distribution only: built here into a wheel, its C++/CUDA ops compiled there on
first use), its pure-Python needs the image lacks, pydantic's compiled core for CPython 3.12,
transformers at our pin (the image's is older), and the verifier's parsers for the stage check.
At most 64 MiB in all, which is what a device call may carry.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

LIMIT = 64 * 2**20
# Pure Python or abi3/manylinux wheels for the image's interpreter, at the versions installed here.
DOWNLOAD = ["hjson", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "transformers",
            "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "pebble"]
BUILD = ["deepspeed"]  # source distribution only
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + ["manylinux2014_x86_64"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python install/gpu_wheels.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--python", default="3.12", help="the GPU image's Python (default: %(default)s)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    pins = [f"{name}=={version(name)}" for name in DOWNLOAD]
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", args.python,
                    "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(args.out),
                    *pins], check=True)
    # --no-build-isolation: DeepSpeed's setup imports torch, the one installed here (no CUDA: its ops
    # are left to build themselves where they run, as they do here).
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(args.out),
                    *[f"{name}=={version(name)}" for name in BUILD]], check=True,
                   env={**__import__("os").environ, "DS_BUILD_OPS": "0"})
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    if total > LIMIT:
        print(f"error: {total / 2**20:.1f} MiB of wheels, over the 64 MiB a device call carries (fix: carry fewer)",
              file=sys.stderr)
        return 1
    print(f"gpu-wheels: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out} (carry it: `carry: [\"{args.out}\"]`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
