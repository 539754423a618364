"""What parsing each DAG file costs the DAG processor, which parses every file again and again.

The DAG processor imports the Airflow modules a DAG file names once, before it forks each parse of the file
(`[dag_processor] parsing_pre_import_modules`). A parse then pays only for what the file does not name: the tests
below parse each file as the processor does and hold that to the project's own light modules and Airflow's TaskFlow
machinery. The AWS SDK and the Amazon provider, which the pipeline's operators subclass, must be among the modules
imported before the fork; the libraries only tasks use must not be imported at all.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DAG_FILES = sorted((ROOT / "dags").glob("mnist_*.py"))
# Imported at most by the modules the DAG processor imports before it forks a parse, never by the parse itself.
BEFORE_THE_FORK = ("airflow.providers.amazon", "boto3", "botocore", "airflow.providers.standard.operators.hitl")
# Imported by no parse at all: what tasks import when they run.
NEVER = ("torch", "pandas", "great_expectations", "sagemaker", "numpy", "matplotlib")

# In a fresh interpreter: what the DAG processor imports for the file before it forks, then the parse, and which
# modules each imported.
PARSE_AS_THE_DAG_PROCESSOR_DOES = """
import importlib, importlib.util, json, sys
import airflow.sdk
from airflow.utils.file import iter_airflow_imports
path = sys.argv[1]
before = set(sys.modules)
for name in iter_airflow_imports(path):
    importlib.import_module(name)
pre_imported = set(sys.modules) - before
spec = importlib.util.spec_from_file_location("dag", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
parsed = set(sys.modules) - before - pre_imported
print(json.dumps({"pre_imported": sorted(pre_imported), "parsed": sorted(parsed)}))
"""


@functools.cache
def imports_of_a_parse(path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PARSE_AS_THE_DAG_PROCESSOR_DOES, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def under(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(f"{p}.") for p in prefixes)]


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda path: path.stem)
def test_a_parse_imports_neither_the_aws_sdk_nor_the_amazon_provider(path):
    """Whatever a DAG file's operators import from the providers is named in the file, so the DAG processor has it
    before it forks the parse: a module of the project that starts importing more of a provider fails here."""
    imports = imports_of_a_parse(path)
    assert under(imports["parsed"], BEFORE_THE_FORK) == [], (
        f"parsing {path.name} imported these itself; name their modules in the file, as mnist_sweep.py does"
    )


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda path: path.stem)
def test_no_parse_imports_what_only_tasks_use(path):
    imports = imports_of_a_parse(path)
    assert under(imports["pre_imported"] + imports["parsed"], NEVER) == []
