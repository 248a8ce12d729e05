"""Data tests: the work directories of local `jp-peft data prepare` runs (kept after an interrupted
run, for the rerun to continue from) go to a temporary directory, not to the user's cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def work_root(tmp_path_factory):
    previous = os.environ.get("JP_PEFT_WORK_ROOT")
    os.environ["JP_PEFT_WORK_ROOT"] = str(tmp_path_factory.mktemp("prepare-work"))
    yield os.environ["JP_PEFT_WORK_ROOT"]
    if previous is None:
        del os.environ["JP_PEFT_WORK_ROOT"]
    else:
        os.environ["JP_PEFT_WORK_ROOT"] = previous
