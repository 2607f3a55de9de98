"""The bad-input battery (tests/reliability/cases.py): every case one line, no traceback, nothing written."""

from __future__ import annotations

import pytest
from cases import CASE_NAMES, CASES, make_base, run_case


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("battery"))


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_bad_input_exits_2_with_one_line_naming_the_fix(case, base):
    outcome = run_case(case, base)
    assert not outcome.problems, (outcome.problems, outcome.stderr[-3000:])


def test_the_battery_covers_at_least_40_distinct_cases():
    assert len(CASES) >= 40 and len(set(CASE_NAMES)) == len(CASES)
