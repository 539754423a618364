"""The layers import one way (import_rules.json): the command line on top, the pipeline code and the local
SageMaker service beside each other and blind to each other, the shipped training and inference code alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

TOOL = ROOT.parent / "shared" / "tools" / "import_rules.py"


@pytest.mark.skipif(not TOOL.is_file(), reason=f"the import rules tool is not at {TOOL}")
def test_no_import_runs_the_wrong_way_and_no_cycle():
    result = subprocess.run(
        [sys.executable, str(TOOL), "--rules", "import_rules.json"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.stdout.startswith("0 import problem(s)"), result.stdout
