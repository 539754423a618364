"""The HTTP fronts of the local SageMaker service: the control plane on one port, the runtime on another.

- ``POST /`` with ``X-Amz-Target: SageMaker.<Operation>``: the SageMaker API as botocore speaks it (JSON 1.1).
  Each request is validated against botocore's own service model and each answer shaped by it
  (local_sagemaker.protocol); errors come back as SageMaker's (ValidationException, ResourceInUse, ...).
- ``GET /ping``: 200 once the endpoints the records name serve again after a start, 503 until then.
- ``GET /_local/data-capture``: the data capture's counts per endpoint (local_sagemaker.capture).
- On the runtime port, ``POST /endpoints/{EndpointName}/invocations``: InvokeEndpoint (local_sagemaker.runtime),
  as AWS keeps it on a host of its own (``runtime.sagemaker``); beside it InvokeEndpointWithResponseStream and
  InvokeEndpointAsync (local_sagemaker.async_inference).

The handlers run in a thread pool: they read and write records and start threads for the long work (jobs,
fleets), and the event loop stays free for the runtime's requests.

    python -m local_sagemaker --state-dir DIR [--host 127.0.0.1] [--port 8090] [--runtime-port 8091] [--cpus N]
        [--metrics-interval S]

S3, CloudWatch and CloudWatch Logs are reached through boto3's standard environment (``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop
from aiohttp import web

from local_aws import LOCAL_ACCOUNT, LOCAL_REGION, errors, sigv4
from local_sagemaker import protocol
from local_sagemaker.access import Access
from local_sagemaker.async_inference import AsyncInvocations
from local_sagemaker.capture import COUNTS_PATH, DataCapture
from local_sagemaker.endpoints import Endpoints
from local_sagemaker.experiments import Experiments
from local_sagemaker.models import Models
from local_sagemaker.permissions import requirements
from local_sagemaker.registry import Registry
from local_sagemaker.roles import CREDENTIALS_PATH, Roles
from local_sagemaker.routing import Router
from local_sagemaker.runtime import Runtime
from local_sagemaker.store import Store
from local_sagemaker.tags import Tags
from local_sagemaker.training import TrainingJobs
from local_sagemaker.transform import TransformJobs
from local_sagemaker.tuning import TuningJobs

log = logging.getLogger(__name__)

DEFAULT_PORT = 8090
DEFAULT_RUNTIME_PORT = 8091
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # far above any control-plane request; InvokeEndpoint checks its own 6 MB


class Service:
    """The service's state and its operations: SageMaker operation name → handler(params) → result."""

    def __init__(
        self,
        state_dir: Path,
        *,
        aws_endpoint_url: str,
        service_url: str,
        cpus: int,
        metrics_interval: float,
        region: str = LOCAL_REGION,
        workers: int | None = None,
    ):
        """``aws_endpoint_url``: the local AWS, whose IAM decides who may call; ``service_url``: this control plane's
        own URL, where the jobs' processes get their role's credentials."""
        self.store = Store(state_dir)
        self.region = region
        self.access = Access(aws_endpoint_url, region)
        self.roles = Roles(region, LOCAL_ACCOUNT)
        self.router = Router()
        self.registry = Registry(self.store, region, LOCAL_ACCOUNT)
        self.models = Models(self.store, region, LOCAL_ACCOUNT, roles=self.roles, packages=self.registry.package)
        self.experiments = Experiments(self.store, region, LOCAL_ACCOUNT)
        self.tags = Tags(self.store)
        self.training = TrainingJobs(
            self.store,
            state_dir,
            cpus,
            region,
            LOCAL_ACCOUNT,
            roles=self.roles,
            service_url=service_url,
            on_change=self.experiments.record_training_job,
        )
        self.tuning = TuningJobs(self.store, self.training, region, LOCAL_ACCOUNT)
        self.endpoints = Endpoints(
            self.store,
            self.models,
            self.router,
            state_dir,
            workers=workers or cpus,
            metrics_interval=metrics_interval,
            region=region,
            account=LOCAL_ACCOUNT,
            roles=self.roles,
            service_url=service_url,
        )
        self.transform = TransformJobs(
            self.store,
            self.models,
            state_dir,
            cpus=workers or cpus,
            region=region,
            account=LOCAL_ACCOUNT,
            roles=self.roles,
            service_url=service_url,
        )
        self.operations = {
            "CreateTrainingJob": self.training.create,
            "DescribeTrainingJob": lambda p: self.training.describe(p["TrainingJobName"]),
            "ListTrainingJobs": self.training.list,
            "StopTrainingJob": lambda p: self.training.stop(p["TrainingJobName"]),
            "CreateHyperParameterTuningJob": self.tuning.create,
            "DescribeHyperParameterTuningJob": lambda p: self.tuning.describe(p["HyperParameterTuningJobName"]),
            "ListHyperParameterTuningJobs": self.tuning.list,
            "ListTrainingJobsForHyperParameterTuningJob": self.tuning.list_training_jobs,
            "StopHyperParameterTuningJob": lambda p: self.tuning.stop(p["HyperParameterTuningJobName"]),
            "CreateTransformJob": self.transform.create,
            "DescribeTransformJob": lambda p: self.transform.describe(p["TransformJobName"]),
            "ListTransformJobs": self.transform.list,
            "StopTransformJob": lambda p: self.transform.stop(p["TransformJobName"]),
            "CreateModel": self.models.create_model,
            "DescribeModel": lambda p: self.models.describe_model(p["ModelName"]),
            "DeleteModel": lambda p: self.models.delete_model(p["ModelName"]),
            "ListModels": self.models.list_models,
            "CreateEndpointConfig": self.models.create_endpoint_config,
            "DescribeEndpointConfig": lambda p: self.models.describe_endpoint_config(p["EndpointConfigName"]),
            "DeleteEndpointConfig": lambda p: self.models.delete_endpoint_config(p["EndpointConfigName"]),
            "ListEndpointConfigs": self.models.list_endpoint_configs,
            "CreateEndpoint": self.endpoints.create_endpoint,
            "DescribeEndpoint": lambda p: self.endpoints.describe_endpoint(p["EndpointName"]),
            "UpdateEndpoint": self.endpoints.update_endpoint,
            "DeleteEndpoint": lambda p: self.endpoints.delete_endpoint(p["EndpointName"]),
            "ListEndpoints": self.endpoints.list_endpoints,
            "CreateExperiment": self.experiments.create_experiment,
            "DescribeExperiment": lambda p: self.experiments.describe_experiment(p["ExperimentName"]),
            "CreateTrial": self.experiments.create_trial,
            "DescribeTrial": lambda p: self.experiments.describe_trial(p["TrialName"]),
            "DescribeTrialComponent": lambda p: self.experiments.describe_trial_component(p["TrialComponentName"]),
            "ListTrialComponents": self.experiments.list_trial_components,
            "CreateModelPackageGroup": self.registry.create_group,
            "DescribeModelPackageGroup": lambda p: self.registry.describe_group(p["ModelPackageGroupName"]),
            "DeleteModelPackageGroup": lambda p: self.registry.delete_group(p["ModelPackageGroupName"]),
            "ListModelPackageGroups": self.registry.list_groups,
            "CreateModelPackage": self.registry.create_package,
            "DescribeModelPackage": lambda p: self.registry.describe_package(p["ModelPackageName"]),
            "ListModelPackages": self.registry.list_packages,
            "UpdateModelPackage": self.registry.update_package,
            "AddTags": self.tags.add,
            "ListTags": self.tags.list,
            "DeleteTags": self.tags.delete,
        }
        self.implemented = frozenset(self.operations)

    def call(self, request: sigv4.Request, body: bytes) -> bytes:
        """One control-plane request: who signed it, what it asks, whether IAM allows it; the answer's body."""
        principal = self.access.authenticate(request)
        operation, params = protocol.parse_request(request.headers.get("x-amz-target"), body, self.implemented)
        self.access.authorize(principal, requirements(operation, params, region=self.region, account=LOCAL_ACCOUNT))
        return protocol.serialize_response(operation, self.operations[operation](params))

    def start(self) -> None:
        self.endpoints.recover()

    def stop(self) -> None:
        self.tuning.shutdown()  # first: a tuning job stopping its own jobs starts no more
        self.training.shutdown()
        self.transform.shutdown()
        self.endpoints.shutdown()


def create_app(service: Service, runtime_host: str, runtime_port: int) -> web.Application:
    """The control plane's app; the runtime's server starts and stops with it, in the same event loop (the
    routes it follows are the service's)."""
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sagemaker-api")
    capture = DataCapture(service.roles, service.endpoints.arn)

    async def control_plane(request: web.Request) -> web.Response:
        body = await request.read()
        raw_path, _, raw_query = request.raw_path.partition("?")
        fields = {name.lower(): ",".join(request.headers.getall(name)) for name in request.headers}
        signed = sigv4.Request(request.method, raw_path, raw_query, fields, body)
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor, service.call, signed, body)
            return web.Response(body=result, headers=protocol.response_headers())
        except sigv4.AuthError as error:
            status, headers, body = errors.auth_failure("json", error)
            return web.Response(status=status, headers=dict(headers), body=body)
        except protocol.SageMakerError as error:
            status, headers, body = protocol.error_response(error)
        except Exception as error:  # a bug: SageMaker's answer for it, and the traceback in the service's log
            log.exception("%s failed", request.headers.get("X-Amz-Target"))
            status, headers, body = protocol.error_response(
                protocol.InternalFailure(f"the local SageMaker service failed: {type(error).__name__}")
            )
        return web.Response(status=status, headers=headers, body=body)

    async def credentials(request: web.Request) -> web.Response:
        # botocore's container provider sends the token it was given as the Authorization header.
        token = request.headers.get("Authorization", "")
        answer = await asyncio.get_running_loop().run_in_executor(executor, service.roles.for_token, token)
        if answer is None:
            return web.json_response({"message": "No credentials for this token"}, status=403)
        return web.json_response(answer)

    async def ping(request: web.Request) -> web.Response:
        ready = service.endpoints.ready.is_set()
        return web.json_response({"status": "Healthy" if ready else "Recovering"}, status=200 if ready else 503)

    async def capture_counts(request: web.Request) -> web.Response:
        return web.json_response(capture.counts())

    async def lifecycle(app: web.Application):
        runtime = Runtime(service.router, LOCAL_ACCOUNT, service.access, service.region)
        runtime.asynchronous = AsyncInvocations(
            service.store,
            service.models,
            service.roles,
            service.router,
            runtime.upstreams,
            service.endpoints.arn,
            service.region,
        )
        runtime.capture = capture
        capture.start()
        await runtime.start(runtime_host, runtime_port)
        service.start()
        runtime.asynchronous.recover()
        yield
        await runtime.close()
        await asyncio.get_running_loop().run_in_executor(None, service.stop)
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_post("/", control_plane)
    app.router.add_get("/ping", ping)
    app.router.add_get(COUNTS_PATH, capture_counts)
    app.router.add_get(CREDENTIALS_PATH, credentials)
    app.cleanup_ctx.append(lifecycle)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local_sagemaker", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="where the records, jobs and logs are kept")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the control plane's port")
    parser.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT, help="InvokeEndpoint's port")
    parser.add_argument("--cpus", type=int, default=0, help="cores for training jobs and servers (0: all)")
    parser.add_argument(
        "--metrics-interval", type=float, default=10.0, help="seconds between an endpoint server's CloudWatch puts"
    )
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", LOCAL_REGION))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    aws_endpoint_url = os.environ.get("AWS_ENDPOINT_URL")
    if not aws_endpoint_url:
        parser.error("AWS_ENDPOINT_URL must name the local AWS: its IAM decides who may call this service")
    service = Service(
        args.state_dir,
        aws_endpoint_url=aws_endpoint_url,
        service_url=f"http://{args.host}:{args.port}",
        cpus=args.cpus or len(os.sched_getaffinity(0)),
        metrics_interval=args.metrics_interval,
        region=args.region,
    )
    log.info(
        "Local SageMaker service on http://%s:%d, its runtime on http://%s:%d, state in %s",
        args.host,
        args.port,
        args.host,
        args.runtime_port,
        args.state_dir,
    )
    # uvloop: the runtime's raw protocols spend their time in the event loop and the transports, where uvloop
    # halves the service's CPU per invocation (bench/results/endpoint.json).
    web.run_app(
        create_app(service, args.host, args.runtime_port),
        loop=uvloop.new_event_loop(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=5,
    )
