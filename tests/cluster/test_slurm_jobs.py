"""Which queued jobs can never start once a job they wait on has failed (slurm_jobs.unrunnable)."""

import pytest

from jp_peft.cluster.slurm_jobs import unrunnable

pytestmark = pytest.mark.unit

DEPENDS_ON = {"import": [], "a-cpt": ["import"], "a-export": ["a-cpt"], "a-sft": ["a-export"],
              "b-cpt": ["import"], "b-export": ["b-cpt"], "b-sft": ["b-export"]}


def states() -> dict[str, tuple[str, str]]:
    return {name: ("PENDING", "Dependency") for name in DEPENDS_ON}


def test_a_failed_job_dooms_its_chain_only():
    now = {**states(), "import": ("COMPLETED", "None"), "a-cpt": ("FAILED", "NonZeroExitCode"),
           "a-export": ("PENDING", "DependencyNeverSatisfied"), "b-cpt": ("RUNNING", "None")}
    assert unrunnable(now, DEPENDS_ON) == ["a-export", "a-sft"]


def test_a_cancelled_or_timed_out_job_dooms_its_dependents_too():
    now = {**states(), "import": ("COMPLETED", "None"), "a-cpt": ("TIMEOUT", "TimeLimit"),
           "b-cpt": ("COMPLETED", "None"), "b-export": ("CANCELLED", "None")}
    assert unrunnable(now, DEPENDS_ON) == ["a-export", "a-sft", "b-sft"]


def test_nothing_is_doomed_while_every_job_runs_or_completes():
    now = {**states(), "import": ("COMPLETED", "None"), "a-cpt": ("RUNNING", "None"), "b-cpt": ("COMPLETED", "None")}
    assert unrunnable(now, DEPENDS_ON) == []
    assert unrunnable({}, DEPENDS_ON) == []  # nothing submitted (everything finished earlier)
