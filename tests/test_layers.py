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


def test_layers_that_ship_alone_keep_copies_of_a_constant_that_agree():
    """The pipeline code imports no part of the local stack, so a few constants have a copy on each side: the local
    stack's account and region are those of the pipeline's default role and region, and SageMaker's name limit is
    botocore's in the pipeline's names and in the local runtime's endpoint name pattern."""
    import botocore.session

    from local_aws import LOCAL_ACCOUNT, LOCAL_REGION
    from local_sagemaker.runtime import ENDPOINT_NAME_PATTERN
    from tasks.config import PipelineConfig
    from tasks.names import MAX_NAME_LENGTH

    config = PipelineConfig()
    assert (config.region, config.role_arn.split(":")[4]) == (LOCAL_REGION, LOCAL_ACCOUNT)
    rule = botocore.session.get_session().get_service_model("sagemaker").shape_for("EndpointName").metadata
    assert (rule["max"], rule["pattern"]) == (MAX_NAME_LENGTH, ENDPOINT_NAME_PATTERN)


def test_training_ships_the_handler_files_that_the_artifact_helpers_ship():
    """training/train.py travels alone in sourcedir.tar.gz, so it names the handler's files itself: the same as
    inference/artifact.py, which the tests, the drift check and the sourcedir use."""
    import ast

    from inference.artifact import HANDLER_FILES

    tree = ast.parse((ROOT / "training" / "train.py").read_text())
    [value] = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and [target.id for target in node.targets] == ["HANDLER_FILES"]
    ]
    assert ast.literal_eval(value) == HANDLER_FILES
