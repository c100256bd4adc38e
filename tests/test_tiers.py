"""The test tiers of tests/conftest.py, on a throwaway suite that uses the same hooks: tier 1 (the
README's test command) leaves out the tests marked tier2, `--tier 2` runs only those, `--tier all`
every test, naming files runs them whatever their tier, and pytest-xdist's workers follow the
controller's tier."""

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run

# The folder's name starts with "test" because pytest loads the conftest.py of such folders before it
# parses the command line (the project's tests/ too): that is where --tier is defined.
SUITE = {
    "pytest.ini": "[pytest]\ntestpaths = testsuite\naddopts = -p no:cacheprovider\nmarkers =\n    tier2: long\n",
    "testsuite/conftest.py": (
        "from tests.conftest import (pytest_addoption, pytest_collection_modifyitems,  # noqa: F401\n"
        "    pytest_configure_node, pytest_report_header, pytest_terminal_summary)\n"
    ),
    "testsuite/test_one.py": "import pytest\n\ndef test_plain():\n    pass\n\n@pytest.mark.tier2\ndef test_long():\n    pass\n",
    "testsuite/test_two.py": "def test_other():\n    pass\n",
}


def passed_tests(suite: Path, *arguments: str) -> tuple[set[str], str]:
    """The names of the tests that passed (from pytest -v) and the whole output."""
    result = run([sys.executable, "-m", "pytest", "-v", *arguments], suite, PYTHONPATH=str(ROOT))
    out = result.stdout
    # One process prints `file::test PASSED`, xdist `[gw0] [ 50%] PASSED file::test`.
    return {name or xdist_name for name, xdist_name in re.findall(r"::(test_\w+) PASSED|PASSED \S+::(test_\w+)", out)}, out


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    for name, text in SUITE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_tiers_split_the_suite_and_named_files_run_whatever_their_tier(suite, workers):
    tier_one, out = passed_tests(suite, *workers)
    assert tier_one == {"test_plain", "test_other"}, out
    assert out.count("tapework test tier: 1 (`--tier 2` runs the rest, `--tier all` every test)") == 2, out  # header and summary
    assert passed_tests(suite, *workers, "--tier", "2")[0] == {"test_long"}
    assert passed_tests(suite, *workers, "--tier", "all")[0] == {"test_plain", "test_long", "test_other"}
    assert passed_tests(suite, *workers, "testsuite/test_one.py")[0] == {"test_plain", "test_long"}
    assert passed_tests(suite, *workers, "--tier", "1", "testsuite/test_one.py")[0] == {"test_plain"}
