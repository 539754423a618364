"""Time the parse of each DAG file (target: 150 ms beyond `airflow.sdk`) and write it as JSON.

The figure the target holds is a parse as the DAG processor does it, again and again while Airflow runs: in a fresh
interpreter, the processor's own modules are imported and the garbage collector frozen (as its manager does before
its loop), the Airflow modules the file names are imported (`[dag_processor] parsing_pre_import_modules`, Airflow's
own function), and the process forks; the child parses the file and is timed. The reference, measured alike in the
same run, is a minimal TaskFlow DAG (two tasks, a cron schedule, one Param): Airflow's own floor.

Also measured, each in a fresh interpreter after `airflow.sdk` alone, as a first parse or `airflow dags test` pays:
- the file's parse, cold;
- the providers' modules the pipeline's operators and notifier subclass, imported alone;
- the project's own modules (`-X importtime`, the providers imported first).

Before the timing, each file is parsed once with bytecode writing allowed, so that every module a parse imports has
its cached bytecode, as it has after the first parse wherever Python writes it (its default).

    python bench/bench_parse.py --out bench/results/parse.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
DAGS = ("mnist_sweep", "mnist_batch_predict", "mnist_drift")
TARGET_MS = 150
# What the sweep's operators and notifier import from the providers, in the order the project's modules do.
PROVIDER_MODULES = (
    "airflow.providers.amazon.aws.operators.sagemaker",
    "airflow.providers.amazon.aws.notifications.sns",
    "airflow.providers.standard.operators.hitl",
)

# Run in a fresh interpreter: the DAG file's parse after airflow.sdk, and how long its providers' modules took.
PARSE = """
import importlib.util, json, sys, time
sys.path.insert(0, {root!r})
import airflow.sdk
before = set(sys.modules)
started = time.perf_counter()
if {providers_only!r}:
    for name in {providers!r}:
        importlib.import_module(name)
else:
    spec = importlib.util.spec_from_file_location("dag", {path!r})
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
seconds = time.perf_counter() - started
loaded = sorted(set(sys.modules) - before)
print(json.dumps({{"seconds": seconds, "project": [m for m in loaded if m.split(".")[0] in ("tasks", "data_checks")]}}))
"""

# Run in a fresh interpreter: the DAG processor's state before it forks a parse of the file, then the parse, timed in
# the forked child, whose figures come back through a pipe.
AS_THE_DAG_PROCESSOR = """
import gc, importlib.util, json, os, sys, time
sys.path.insert(0, {root!r})
import airflow.sdk
import airflow.dag_processing.manager
import structlog
from airflow.dag_processing.processor import _pre_import_airflow_modules
gc.freeze()
before = set(sys.modules)
_pre_import_airflow_modules({path!r}, structlog.get_logger())
pre_imported = set(sys.modules) - before
read, write = os.pipe()
if (pid := os.fork()) == 0:
    started = time.perf_counter()
    spec = importlib.util.spec_from_file_location("dag", {path!r})
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    seconds = time.perf_counter() - started
    parsed = len(set(sys.modules) - before - pre_imported)
    os.write(write, json.dumps({{"seconds": seconds, "parsed_modules": parsed}}).encode())
    os._exit(0)
os.close(write)
with os.fdopen(read) as pipe:
    child = json.loads(pipe.read())
_, status = os.waitpid(pid, 0)
assert status == 0, f"the parse's child ended with status {{status}}"
print(json.dumps(child | {{"pre_imported": sorted(pre_imported)}}))
"""

# Airflow's own floor: the least a TaskFlow DAG with a schedule and a form costs to parse.
REFERENCE_DAG = """
import pendulum

from airflow.sdk import Param, dag, task


@dag(schedule="0 3 * * *", start_date=pendulum.datetime(2026, 1, 1), params={"n": Param(3, type="integer", minimum=1)})
def reference():
    @task
    def first() -> int:
        return 1

    @task
    def second(value: int) -> int:
        return value

    second(first())


reference()
"""


def run_json(code: str, env: dict | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env or os.environ
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def as_the_dag_processor(path: Path, env: dict | None = None) -> dict:
    return run_json(AS_THE_DAG_PROCESSOR.format(root=str(ROOT), path=str(path)), env)


def project_imports_ms(path: Path) -> float:
    """How long the DAG file's imports of the project's own modules take (``-X importtime``: each outermost project
    module's cumulative time), the providers' modules imported first, as a DAG processor would have them."""
    code = PARSE.format(root=str(ROOT), path=str(path), providers=PROVIDER_MODULES, providers_only=False)
    code = code.replace(
        "import airflow.sdk\n", "import airflow.sdk\n" + "".join(f"import {m}\n" for m in PROVIDER_MODULES)
    )
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            rows.append((len(name) - len(name.lstrip()), name.strip(), int(cumulative)))
    # importtime lists a module after the modules it imported: read backwards, each row meets its parents first.
    total, stack = 0, []
    for level, name, cumulative in reversed(rows):
        while stack and stack[-1][0] >= level:
            stack.pop()
        inside = any(project for _, project in stack)
        project = name.split(".")[0] in ("tasks", "data_checks")
        if project and not inside:
            total += cumulative
        stack.append((level, project or inside))
    return total / 1000


def parse_once(path: Path | None, env: dict | None = None) -> dict:
    code = PARSE.format(root=str(ROOT), path=str(path), providers=PROVIDER_MODULES, providers_only=path is None)
    return run_json(code, env)


def median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/parse.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        reference = Path(scratch) / "reference.py"
        reference.write_text(REFERENCE_DAG)
        files = {"reference": reference, **{name: ROOT / "dags" / f"{name}.py" for name in DAGS}}
        writing_bytecode = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
        for path in files.values():
            as_the_dag_processor(path, writing_bytecode)
            parse_once(path, writing_bytecode)

        # Interleaved, so that the machine's load falls alike on the reference and on each DAG.
        forked: dict[str, list[float]] = {name: [] for name in files}
        cold: dict[str, list[float]] = {name: [] for name in files}
        providers, imports = [], {name: [] for name in DAGS}
        seen: dict[str, dict] = {}
        for _ in range(args.repeats):
            providers.append(parse_once(None)["seconds"])
            for name, path in files.items():
                seen[name] = as_the_dag_processor(path)
                forked[name].append(seen[name]["seconds"])
                parsed = parse_once(path)
                cold[name].append(parsed["seconds"])
                if name in imports:
                    seen[name]["project"] = parsed["project"]
                    imports[name].append(project_imports_ms(path))

    reference_ms = median_ms(forked["reference"])
    dags = {}
    for name in DAGS:
        dags[name] = {
            "dag_processor_ms": median_ms(forked[name]),
            "dag_processor_runs_ms": [round(1000 * s, 1) for s in forked[name]],
            "ratio_to_reference": round(statistics.median(forked[name]) / statistics.median(forked["reference"]), 2),
            "modules_imported_by_the_parse": seen[name]["parsed_modules"],
            "modules_imported_before_the_fork": seen[name]["pre_imported"],
            "fresh_interpreter_ms": median_ms(cold[name]),
            "fresh_interpreter_runs_ms": [round(1000 * s, 1) for s in cold[name]],
            # The part this project controls: its own modules' imports (the rest is Airflow's and the providers').
            "project_imports_ms": round(statistics.median(imports[name]), 1),
            "project_modules": seen[name]["project"],
        }
    result = {
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "target_ms": TARGET_MS,
        "reference": {
            "dag_processor_ms": reference_ms,
            "dag_processor_runs_ms": [round(1000 * s, 1) for s in forked["reference"]],
            "fresh_interpreter_ms": median_ms(cold["reference"]),
        },
        "providers_ms": median_ms(providers),
        "providers_runs_ms": [round(1000 * s, 1) for s in providers],
        "provider_modules": list(PROVIDER_MODULES),
        "dags": dags,
    }
    write_result(
        args.out,
        result,
        {name: (dags[name]["dag_processor_ms"], dags[name]["fresh_interpreter_ms"]) for name in DAGS}
        | {"reference": reference_ms, "providers": result["providers_ms"]},
    )


if __name__ == "__main__":
    main()
