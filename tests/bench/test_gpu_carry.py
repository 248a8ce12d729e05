"""The wheels a GPU device run carries (bench/gpu/carry.txt) against what bench/gpu/carry.sh recorded
(bench/gpu/carry_report.json), offline: one version of each package and never torch, the pins agree
with pyproject.toml's, the sizes plus the working tree fit the device's 64 MiB, and pip's dry run and
the requirement check installed exactly the pinned set. Re-run `bench/gpu/carry.sh .whl` after
changing carry.txt, image_packages.txt or carry_accepted.txt: the report must follow.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not installed: the checkout's root makes `bench.gpu` importable
    sys.path.insert(0, str(REPO))

from bench.gpu import carry  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pins() -> list[dict]:
    return carry.read_carry()


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(carry.REPORT.read_text())


def test_one_version_of_each_package_and_never_torch():
    pins = carry.read_carry()  # raises on a second version, torch or a CUDA library, or a pin without a reason
    names = [carry.norm(p["name"]) for p in pins]
    assert len(names) == len(set(names))
    assert not [n for n in names if carry.NEVER.match(n)]
    assert all(p["why"] for p in pins)


def test_carry_txt_refuses_a_second_version_torch_and_a_missing_reason(tmp_path):
    cases = {"numpy==1.26.4  # a\nnumpy==2.0.0  # b\n": "pinned twice",
             "Torch==2.11.0  # the CUDA build\n": "never carried",
             "nvidia-cublas==13.1.0  # a CUDA library\n": "never carried",
             "peft>=0.15  # not a pin\n": "is not NAME==VERSION",
             "peft==0.21.2\n": "no comment saying why"}
    for text, message in cases.items():
        (tmp_path / "carry.txt").write_text(text)
        with pytest.raises(carry.CarryError, match=message):
            carry.read_carry(tmp_path / "carry.txt")


def test_pins_agree_with_pyproject(pins):
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {carry.norm(Requirement(d).name): Requirement(d).specifier for d in project}
    checked = 0
    for pin in pins:
        specifier = wanted.get(carry.norm(pin["name"]))
        if specifier is not None:
            assert specifier.contains(pin["version"], prereleases=True), (pin, str(specifier))
            checked += 1
    assert checked >= 8  # nemo_toolkit, megatron-core, nemo_run, leptonai, transformers, datasets, datatrove, ...


def test_the_report_is_of_exactly_these_pins(pins, report):
    recorded = {(w["name"], w["version"]) for w in report["wheels"]}
    assert recorded == {(carry.norm(p["name"]), p["version"]) for p in pins}, "re-run bench/gpu/carry.sh .whl"
    drops = {carry.norm(p["name"]): p["drops"] for p in pins}
    for wheel in report["wheels"]:
        assert wheel["dropped"] == drops[wheel["name"]]
        assert carry.wheel_name(Path(wheel["file"])) == (wheel["name"], wheel["version"])
        assert carry.WHEEL_TAGS.search(wheel["file"]), wheel["file"]
        assert ("bytes_saved" in wheel) == bool(wheel["dropped"])


def test_wheels_and_working_tree_fit_the_devices_64_mib(report):
    wheels = sum(w["bytes"] for w in report["wheels"])
    assert wheels == report["wheel_bytes"]
    # the tree as it is now, where this is a git checkout (CI's clone is); else as carry.sh measured it
    tree = carry.tree_bytes() if (REPO / ".git").exists() and shutil.which("git") else report["tree_bytes"]
    assert wheels + tree <= carry.LIMIT_BYTES == 64 * 2**20, (
        f"{(wheels + tree) / 2**20:.1f} MiB; largest: "
        + ", ".join(w["file"] for w in sorted(report["wheels"], key=lambda w: -w["bytes"])[:3]))


def test_pips_dry_run_installs_the_pins_once_each_and_no_torch(pins, report):
    installs = report["pip_dry_run"]["install"]
    names = [i["name"] for i in installs]
    assert len(names) == len(set(names)), "a package twice"
    assert not [n for n in names if carry.NEVER.match(n)], "torch or a CUDA library"
    assert {(i["name"], i["version"]) for i in installs} == {(carry.norm(p["name"]), p["version"]) for p in pins}
    assert {i["file"] for i in installs} == {w["file"] for w in report["wheels"]}


def test_every_requirement_resolves_against_the_image_or_is_accepted(pins, report):
    """The requirement check again, offline, from the recorded Requires-Dist of each wheel: a change to
    image_packages.txt or carry_accepted.txt that the report has not caught up with fails here."""
    requires = {w["name"]: w["requires"] for w in report["wheels"]}
    entries = [{**p, "requires": requires[carry.norm(p["name"])]} for p in pins]
    resolution = carry.resolve(entries, carry.read_image(), carry.read_accepted())
    assert resolution["unmet_accepted"] == report["resolution"]["unmet_accepted"]
    assert "torch" not in resolution["shadowed_image_packages"]


def test_the_requirement_check_fails_on_an_unlisted_conflict_and_a_stale_acceptance():
    image = {"numpy": "2.5.2", "packaging": "26.3"}
    entry = {"name": "megatron-core", "version": "0.15.3", "requires": ["numpy<2.0.0", "packaging>=24.2",
                                                                          "tqdm; extra == 'dev'"]}
    with pytest.raises(carry.CarryError, match=r"megatron-core needs numpy<2.0.0, image has 2.5.2"):
        carry.resolve([entry], image, {}, with_project=False)
    with pytest.raises(carry.CarryError, match="no carried wheel asks any more: megatron-core: einops"):
        carry.resolve([entry], image, {("megatron-core", "numpy<2.0.0"): "why", ("megatron-core", "einops"): "why"},
                      with_project=False)
    accepted = carry.resolve([entry], image, {("megatron-core", "numpy<2.0.0"): "why"}, with_project=False)
    assert accepted["unmet_accepted"] == [{"requirer": "megatron-core", "requirement": "numpy<2.0.0", "found": "2.5.2",
                                           "accepted": "why"}]
