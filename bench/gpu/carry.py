"""The wheels a device run carries (carry.txt) and the checks bench/gpu/carry.sh runs on them.

    python3 bench/gpu/carry.py specs             the pins, validated (carry.sh downloads these)
    python3 bench/gpu/carry.py verify OUT_DIR    drops, sizes, pip's install check, requirement check;
                                                 writes bench/gpu/carry_report.json

The device machine installs the wheels with `pip install --no-deps --target /tmp/site` and puts
/tmp/site first on PYTHONPATH: a carried package shadows the image's copy, every other package is the
image's own. So the requirement check resolves each carried wheel's Requires-Dist against carried
versions first, then the image's (image_packages.txt); a requirement left unmet must be listed, with
the reason, in carry_accepted.txt. tests/bench/test_gpu_carry.py checks the committed report offline.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CARRY = HERE / "carry.txt"
IMAGE = HERE / "image_packages.txt"
ACCEPTED = HERE / "carry_accepted.txt"
REPORT = HERE / "carry_report.json"
LIMIT_BYTES = 64 * 2**20  # the device tool's limit on one call's working tree plus carried paths
# Never carried: the image's torch is the CUDA build the benchmark measures, and its CUDA libraries go with it.
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|cuda-.+|cupy-.+|nvidia-(cu.+|nccl.*|nvjitlink|nvshmem.*|nvtx))$")
# The device image's interpreter (KINDS.md: Python 3.12.3 on x86-64; Ubuntu 24.04's glibc 2.39).
PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
# The wheels the image's interpreter installs: pure Python, or CPython 3.12 (or the stable ABI) on manylinux x86-64.
WHEEL_TAGS = re.compile(r"-((py2\.)?py3|py312)-none-any\.whl$|-(cp312-cp312|cp3\d+-abi3)-manylinux[\w.]*x86_64\.whl$")
MARKERS = {"python_version": PYTHON, "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


class CarryError(RuntimeError):
    """The carried set is wrong; the message says how, in one line."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path):
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        body, _, why = raw.partition("#")
        if body.strip():
            yield number, body.split(), why.strip()


def read_carry(path: Path = CARRY) -> list[dict]:
    """carry.txt's entries: name, version, drops, why; one version per package, never torch."""
    entries, seen = [], {}
    for number, fields, why in _lines(path):
        name, sep, version = fields[0].partition("==")
        where = f"{path.name}:{number}"
        if not sep or not version or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise CarryError(f"{where}: {fields[0]!r} is not NAME==VERSION")
        if norm(name) in seen:
            raise CarryError(f"{where}: {name} is pinned twice (also line {seen[norm(name)]}): keep one version")
        if NEVER.match(norm(name)):
            raise CarryError(f"{where}: {name} is never carried (the image's CUDA build is the one measured)")
        drops = [f[len("drop="):] for f in fields[1:] if f.startswith("drop=")]
        if len(drops) != len(fields) - 1:
            raise CarryError(f"{where}: only drop=PATH may follow the pin, got {fields[1:]}")
        if not why:
            raise CarryError(f"{where}: {name} has no comment saying why it is carried")
        seen[norm(name)] = number
        entries.append({"name": name, "version": version, "drops": drops, "why": why})
    return entries


def read_image(path: Path = IMAGE) -> dict[str, str | None]:
    """image_packages.txt: normalized name -> version (None where unknown)."""
    found = {}
    for _, fields, _ in _lines(path):
        name, _, version = fields[0].partition("==")
        found[norm(name)] = version or None
    return found


def read_accepted(path: Path = ACCEPTED) -> dict[tuple[str, str], str]:
    """carry_accepted.txt: (requirer, requirement) -> why, for `REQUIRER: REQUIREMENT  # why` lines."""
    found = {}
    for number, fields, why in _lines(path):
        if not fields[0].endswith(":") or len(fields) < 2 or not why:
            raise CarryError(f"{path.name}:{number}: expected `REQUIRER: REQUIREMENT  # why`")
        found[(norm(fields[0][:-1]), _canonical(" ".join(fields[1:])))] = why
    return found


def _canonical(requirement: str) -> str:
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    req.marker = None  # the marker decides whether a line applies, not what it asks for
    return str(req)


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalized name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return norm(name), version


def requirements_of(entry: dict, env: dict[str, str | None]) -> list[dict]:
    """The Requires-Dist lines of a carried wheel that apply on the device (markers evaluated for the
    image's interpreter, no extras), each with what satisfies it there, if anything."""
    from packaging.requirements import Requirement

    unmet = []
    for line in entry["requires"]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(MARKERS):
            continue
        have = env.get(norm(req.name), "absent")
        if have == "absent":
            unmet.append({"requirer": norm(entry["name"]), "requirement": _canonical(line), "found": None})
        elif have is not None and not req.specifier.contains(have, prereleases=True):
            unmet.append({"requirer": norm(entry["name"]), "requirement": _canonical(line), "found": have})
    return unmet


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> dict:
    """jp-peft's own pins (pyproject.toml), as one more requirer: the device runs its code too. torch is
    the image's (pyproject leaves its build to scripts/setup.sh)."""
    import tomllib

    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    return {"name": "jp-peft", "requires": [d for d in deps if not d.startswith("torch")]}


def resolve(entries: list[dict], image: dict[str, str | None], accepted: dict, with_project: bool = True) -> dict:
    """Every unmet requirement of the carried set and of jp-peft itself, with the carried versions
    shadowing the image's; fails on one carry_accepted.txt does not list, or on a listed one that no
    longer occurs."""
    env = {**image, **{norm(e["name"]): e["version"] for e in entries}}
    requirers = [project_requirements(), *entries] if with_project else entries
    unmet = [u for e in requirers for u in requirements_of(e, env)]
    for u in unmet:
        u["accepted"] = accepted.get((u["requirer"], u["requirement"]))
    wrong = [u for u in unmet if u["accepted"] is None]
    if wrong:
        raise CarryError("unmet on the device and not in carry_accepted.txt: " + "; ".join(
            f"{u['requirer']} needs {u['requirement']}, image has {u['found'] or 'none'}" for u in wrong))
    stale = sorted(set(accepted) - {(u["requirer"], u["requirement"]) for u in unmet})
    if stale:
        raise CarryError("carry_accepted.txt lists what no carried wheel asks any more: "
                         + "; ".join(f"{a}: {b}" for a, b in stale))
    return {"python": MARKERS["python_full_version"], "unmet_accepted": unmet,
            "shadowed_image_packages": sorted(n for n in env if n in image and image[n] != env[n])}


def tree_bytes(repo: Path = REPO) -> int:
    """What the device tool sends of the checkout: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((repo / p).lstat().st_size for p in listed if p and (repo / p).exists())


def slim(wheel: Path, drops: list[str]) -> int:
    """Remove `drops` (file or folder paths inside the wheel) and their RECORD lines; returns bytes saved."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        gone = {n for n in names if any(n == d or n.startswith(d.rstrip("/") + "/") for d in drops)}
        if not gone:
            return 0  # slimmed already (a re-run keeps the downloaded, slimmed file)
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in gone:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",", 1)[0] not in gone).encode()
                out.writestr(info, data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def pip_check(out: Path, entries: list[dict]) -> list[dict]:
    """pip's dry run of the device's install command (--no-deps into an empty --target) for the image's
    interpreter and platform: what it would install."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--no-index",
                   "--find-links", str(out), "--target", str(Path(tmp) / "site"), "--python-version", PYTHON,
                   "--implementation", "cp", "--only-binary=:all:", "--report", str(report),
                   *[f"--platform={p}" for p in PLATFORMS], *[f"{e['name']}=={e['version']}" for e in entries]]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CarryError("pip cannot install the set for cp312 manylinux: "
                             + (proc.stderr.strip().splitlines() or ["(no output)"])[-1])
        installs = json.loads(report.read_text())["install"]
    return sorted(({"name": norm(i["metadata"]["name"]), "version": i["metadata"]["version"],
                    "file": Path(i["download_info"]["url"]).name} for i in installs), key=lambda i: i["name"])


def _earlier_savings(report: Path) -> dict[str, int]:
    """What the drops saved, per wheel file, as an earlier run recorded it (a re-run finds them applied)."""
    try:
        return {w["file"]: w["bytes_saved"] for w in json.loads(report.read_text())["wheels"] if "bytes_saved" in w}
    except (OSError, ValueError, KeyError):
        return {}


def verify(out: Path, entries: list[dict], report: Path = REPORT) -> dict:
    """Check OUT_DIR against carry.txt (one wheel per pin, stale ones removed, drops applied), the
    size limit, pip's install check and the requirement check; returns the report."""
    pins = {norm(e["name"]): e for e in entries}
    found: dict[str, Path] = {}
    for wheel in sorted(out.glob("*.whl")):
        name, version = wheel_name(wheel)
        if name not in pins or pins[name]["version"] != version:
            wheel.unlink()  # another version, or no longer pinned: exactly one version of each travels
        else:
            found[name] = wheel
    missing = sorted(set(pins) - set(found))
    if missing:
        raise CarryError(f"no wheel in {out} for {', '.join(missing)} (run bench/gpu/carry.sh {out})")
    wheels, earlier = [], _earlier_savings(report)
    for name, entry in pins.items():
        wheel = found[name]
        if not WHEEL_TAGS.search(wheel.name):
            raise CarryError(f"{wheel.name}: not a py3-none-any or cp312 manylinux x86-64 wheel")
        saved = slim(wheel, entry["drops"]) or earlier.get(wheel.name, 0)
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            entry["requires"] = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                                 if line.startswith("Requires-Dist:")]
        wheels.append({"name": name, "version": entry["version"], "file": wheel.name, "bytes": wheel.stat().st_size,
                       "dropped": entry["drops"], "requires": entry["requires"],
                       **({"bytes_saved": saved} if saved else {})})
    total, tree = sum(w["bytes"] for w in wheels), tree_bytes()
    if total + tree > LIMIT_BYTES:
        largest = sorted(wheels, key=lambda w: -w["bytes"])[:5]
        raise CarryError(f"wheels {total / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB exceed the device's "
                         f"64 MiB; largest: " + ", ".join(f"{w['file']} {w['bytes'] / 2**20:.1f} MiB" for w in largest))
    installs = pip_check(out, entries)
    resolution = resolve(entries, read_image(), read_accepted())
    return {"python": PYTHON, "platforms": PLATFORMS, "limit_bytes": LIMIT_BYTES, "wheel_bytes": total,
            "tree_bytes": tree, "wheels": sorted(wheels, key=lambda w: w["name"]),
            "pip_dry_run": {"command": "pip install --dry-run --no-deps --no-index --find-links OUT_DIR --target TMP "
                                       "--python-version 3.12 --implementation cp --only-binary=:all: --platform ...",
                            "install": installs},
            "resolution": resolution}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("specs", help="print the validated pins, one NAME==VERSION a line")
    sub.add_parser("missing", help="the pins with no wheel in OUT_DIR yet").add_argument("out", type=Path)
    check = sub.add_parser("verify", help="check OUT_DIR and write the report")
    check.add_argument("out", type=Path)
    check.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    try:
        entries = read_carry()
        if args.command in ("specs", "missing"):
            have = {wheel_name(w) for w in args.out.glob("*.whl")} if args.command == "missing" else set()
            print("\n".join(f"{e['name']}=={e['version']}" for e in entries if (norm(e["name"]), e["version"]) not in have))
            return 0
        out = args.out.resolve()
        if out.is_relative_to(REPO) and subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(out)]).returncode:
            raise CarryError(f"{out} is inside the checkout but not ignored: its wheels would travel twice")
        report = verify(out, entries, args.report)
    except CarryError as exc:
        print(f"carry: {exc}", file=sys.stderr)
        return 1
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    mib = 2**20
    print(f"carry: {len(report['wheels'])} wheels, {report['wheel_bytes'] / mib:.1f} MiB + working tree "
          f"{report['tree_bytes'] / mib:.1f} MiB = {(report['wheel_bytes'] + report['tree_bytes']) / mib:.1f} MiB "
          f"of 64; pip would install {len(report['pip_dry_run']['install'])}; "
          f"{len(report['resolution']['unmet_accepted'])} unmet requirements, each accepted; report {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
