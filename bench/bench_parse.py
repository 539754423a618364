"""Time the parse of each DAG file beyond `airflow.sdk` (target: 150 ms) and write it as JSON.

Each parse runs in a fresh interpreter, as a DAG processor's child does: `airflow.sdk` is imported first, then the
DAG file is executed and timed. The figure is split in two:
- the providers' modules (`airflow.providers.*`) the file pulls in, here the Amazon provider's SageMaker operators
  that the pipeline's operators subclass (tasks/operators.py) and its SNS notifier: any DAG that uses those
  operators pays them;
- the rest: the project's own modules and the file itself, which is what this project controls.
The reference, measured in the same run, is the providers' modules imported alone after `airflow.sdk`. The project's
own modules are also timed by themselves (`-X importtime`, the providers imported first), since what is left beyond
the providers is partly Airflow's own: the TaskFlow decorators and timetables it imports as a DAG is built.

    python bench/bench_parse.py --out bench/results/parse.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def parse_once(path: Path | None) -> dict:
    code = PARSE.format(root=str(ROOT), path=str(path), providers=PROVIDER_MODULES, providers_only=path is None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=os.environ
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/parse.json")
    args = parser.parse_args()

    # Interleaved, so that the machine's load falls alike on the reference and on each DAG.
    samples: dict[str, list[float]] = {"providers": [], **{name: [] for name in DAGS}}
    modules: dict[str, list[str]] = {}
    imports: dict[str, list[float]] = {name: [] for name in DAGS}
    for _ in range(args.repeats):
        samples["providers"].append(parse_once(None)["seconds"])
        for name in DAGS:
            parsed = parse_once(ROOT / "dags" / f"{name}.py")
            samples[name].append(parsed["seconds"])
            modules[name] = parsed["project"]
            imports[name].append(project_imports_ms(ROOT / "dags" / f"{name}.py"))
    providers_ms = 1000 * statistics.median(samples["providers"])
    dags = {}
    for name in DAGS:
        total_ms = 1000 * statistics.median(samples[name])
        dags[name] = {
            "beyond_sdk_ms": round(total_ms, 1),
            "beyond_sdk_and_providers_ms": round(total_ms - providers_ms, 1),
            # The part this project controls: its own modules' imports (the rest is Airflow's and the providers').
            "project_imports_ms": round(statistics.median(imports[name]), 1),
            "runs_ms": [round(1000 * s, 1) for s in samples[name]],
            "project_modules": modules[name],
        }
    result = {
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "target_ms": TARGET_MS,
        "providers_ms": round(providers_ms, 1),
        "providers_runs_ms": [round(1000 * s, 1) for s in samples["providers"]],
        "provider_modules": list(PROVIDER_MODULES),
        "dags": dags,
    }
    write_result(
        args.out,
        result,
        {name: (dags[name]["beyond_sdk_ms"], dags[name]["project_imports_ms"]) for name in DAGS}
        | {"providers": result["providers_ms"]},
    )


if __name__ == "__main__":
    main()
