"""The wheels the GPU machine lacks, for `bench/gpu.sh` (run here, where pip reaches PyPI).

    python bench/gpu_wheels.py [--dest .whl] [--limit-mib 60]

1. pip's resolver, nothing installed, resolves ipbatch's runtime requirements for CPython
   3.12 on manylinux x86-64 (binary wheels only) with their dependencies, one version each;
2. the packages the GPU image already has (`bench/gpu-image-packages.txt`) are dropped: there
   ipbatch uses the image's own (its CUDA torch above all);
3. the rest are downloaded (`--no-deps`, exactly the resolved versions) into DEST, which is
   emptied first, and their total size is checked against the limit (what may travel to the
   machine with the working tree).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORM = [
    "--only-binary=:all:",
    "--implementation", "cp",
    "--python-version", "3.12",
    "--platform", "manylinux_2_28_x86_64",
    "--platform", "manylinux_2_27_x86_64",
    "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64",
    "--platform", "manylinux1_x86_64",
]  # fmt: skip


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# the image's package that provides what a requirement's package would (the same `cv2`)
PROVIDED_BY = {"opencv-python": "opencv-python-headless"}


def image_packages() -> dict[str, str | None]:
    """{normalized name: version, or None where the image's version is not known}."""
    lines = (ROOT / "bench" / "gpu-image-packages.txt").read_text().splitlines()
    found: dict[str, str | None] = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            found[normalize(name)] = version or None
    return found


def _name(requirement: str) -> str:
    return normalize(re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0])


def requirements(have: dict[str, str | None]) -> list[str]:
    """ipbatch's runtime requirements that the image does not meet by itself."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [r for r in project["dependencies"] if _name(r) not in have]


def provided(name: str, have: dict[str, str | None]) -> bool:
    name = normalize(name)
    return name in have or PROVIDED_BY.get(name) in have


def resolve(pip: list[str], have: dict[str, str | None]) -> dict[str, str]:
    """{name: version} of everything the requirements need on the GPU machine's platform:
    resolved once, then again with the image's versions pinned for what the first pass
    pulled in that the image has (its dependencies are then the ones that fit those)."""
    first = _resolve(pip, requirements(have))
    pins = [
        f"{name}=={have[normalize(name)]}"
        for name in first
        if have.get(normalize(name)) is not None
    ]
    return _resolve(pip, requirements(have) + pins) if pins else first


def _resolve(pip: list[str], wanted: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run(
            [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
             str(report), "--target", str(Path(scratch) / "none"), *PLATFORM, *wanted],
            check=True,
        )  # fmt: skip
        found = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--limit-mib", type=float, default=60)
    parser.add_argument(
        "--image-requirements",
        type=Path,
        help="also write the image's packages ipbatch uses (name==version) here: the rehearsal "
        "environment installs exactly these (`make gpu-rehearsal`)",
    )
    args = parser.parse_args()
    pip = [sys.executable, "-m", "pip"]
    have = image_packages()
    resolved = resolve(pip, have)
    missing = {n: v for n, v in resolved.items() if not provided(n, have)}
    if args.image_requirements is not None:
        lines = []
        for name, version in sorted(resolved.items()):
            if provided(name, have):
                image_name = PROVIDED_BY.get(normalize(name), normalize(name))
                if image_name != normalize(name):  # the image's variant, at the resolved version
                    lines.append(f"{image_name}=={version}")
                else:
                    lines.append(f"{image_name}=={have.get(image_name) or version}")
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        for requirement in project["dependencies"]:  # those the image meets itself
            name = _name(requirement)
            if name in have and name != "torch":  # torch: the rehearsal brings its own
                lines.append(f"{name}=={have[name]}" if have[name] else name)
        pinned = {line.split("==")[0] for line in lines if "==" in line}
        kept = sorted({line for line in lines if "==" in line or line not in pinned})
        args.image_requirements.write_text("\n".join(kept) + "\n")
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    subprocess.run(
        [*pip, "download", "--quiet", "--no-deps", "--dest", str(args.dest), *PLATFORM,
         *[f"{n}=={v}" for n, v in sorted(missing.items())]],
        check=True,
    )  # fmt: skip
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    names = {normalize(w.name.split("-")[0]) for w in wheels}
    if len(names) != len(wheels):
        raise SystemExit(f"two versions of one package in {args.dest}: {[w.name for w in wheels]}")
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.dest} (of {len(resolved)} packages")
    print(f"ipbatch needs on CPython 3.12, {len(resolved) - len(missing)} are in the GPU image):")
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    if total > args.limit_mib:
        raise SystemExit(f"{total:.1f} MiB is over the {args.limit_mib:g} MiB that may travel")


if __name__ == "__main__":
    main()
