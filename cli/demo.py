"""`make demo` (`mnist-pipeline demo`): the local stack up, the seed sweep followed, the new endpoint asked about a
test digit, and a last line of JSON saying what came of it; everything left running."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from cli import StackError, new_console
from cli.predict import CONNECTION_WRAPPER_LOGGER, without_info_from
from cli.runs import print_best, run_conf, run_sweep
from cli.stack import local_client, read_state, stack_paths, start_and_tell, use_stack_connection
from tasks.config import PipelineConfig, load_config


def sample_digit(data_dir: str, directory: Path, index: int = 0) -> tuple[Path, int]:
    """Write test image ``index`` of the MNIST files in ``data_dir`` as a PNG (white ink on black, as MNIST is);
    return its path and true label."""
    from PIL import Image

    from training.mnist_idx import IMAGES_MAGIC, LABELS_MAGIC, MNIST_FILES, read_idx

    image = read_idx(Path(data_dir) / MNIST_FILES["test_images"], IMAGES_MAGIC)[index]
    label = int(read_idx(Path(data_dir) / MNIST_FILES["test_labels"], LABELS_MAGIC)[index])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"test-digit-{index}-label-{label}.png"
    Image.fromarray(image).save(path)
    return path, label


def serving_endpoint(name: str, config: PipelineConfig) -> dict | None:
    """``{"name", "url"}`` of the local endpoint ``name`` when it is in service (whether this run deployed to it or
    the gate kept the champion there), else None."""
    from botocore.exceptions import ClientError

    state = read_state(stack_paths(config))
    try:
        if (
            local_client(state, "sagemaker", config).describe_endpoint(EndpointName=name)["EndpointStatus"]
            != "InService"
        ):
            return None
    except ClientError:
        return None
    return {"name": name, "url": f"{state['sagemaker_runtime_endpoint']}/endpoints/{name}/invocations"}


def demo_summary(outcome: dict, config: PipelineConfig) -> dict:
    """The demo's last line: the winner, the endpoint serving, how long the sweep took, where the report is."""
    from tasks.names import DEFAULT_ENDPOINT

    best, deployment, report = outcome["best"], outcome["deployment"], outcome["report"]
    return {
        "best": {"hidden_channels": best["hidden_channels"], "test_accuracy": best["test_accuracy"]},
        "endpoint": serving_endpoint(deployment["endpoint_name"] if deployment else DEFAULT_ENDPOINT, config),
        "sweep_seconds": outcome["seconds"],
        "report": report.get("html") if isinstance(report, dict) else report,
    }


def demo_command(args) -> int:
    """`make demo`: start the stack, run the seed sweep, ask the new endpoint about a test digit; leave it running."""
    from tasks.predict import predict

    console = new_console()
    config = load_config()
    try:
        state = start_and_tell(console, config)
        outcome = run_sweep(run_conf(None, []), console, config)
    except StackError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    if outcome["state"] != "success":
        console.print(
            f"[red]The sweep {outcome['run_id']} {outcome['state']}[/]; the stack stays up: mnist-pipeline down"
        )
        return 1
    print_best(console, outcome["best"])
    summary = demo_summary(outcome, config)
    if summary["endpoint"]:
        use_stack_connection(config)
        image, label = sample_digit(outcome["data_dir"], stack_paths(config).root / "demo")
        # Airflow's hooks log to stdout, whose last line is the JSON.
        with contextlib.redirect_stdout(sys.stderr), without_info_from(CONNECTION_WRAPPER_LOGGER):
            (result,) = predict([image], summary["endpoint"]["name"], config)
        console.print(
            f"Endpoint {summary['endpoint']['name']}: {image.name} (a {label}) → {result['digit']} "
            f"with {100 * result['confidence']:.1f}% confidence. Try: mnist-pipeline predict {image}"
        )
        from tasks.deployment import capture_destination

        console.print(
            f"Its inputs and answers are captured in {capture_destination(config)}/{summary['endpoint']['name']}/: "
            "check them for drift with `mnist-pipeline drift`"
        )
    console.print(f"The stack stays up for you to explore: {state['airflow_url']}  (stop it: make down)")
    print(json.dumps(summary))
    return 0
