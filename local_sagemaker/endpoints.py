"""Endpoints: CreateEndpoint, DescribeEndpoint, UpdateEndpoint, DeleteEndpoint, ListEndpoints.

Each production variant of an endpoint config is served by a model server, ``python -m inference.serve`` over the
variant's model artifact (model.tar.gz from S3, unpacked once), running the artifact's own ``code/inference.py`` as
the SageMaker PyTorch container does. The servers of one config are its *fleet*. An endpoint goes Creating, then
InService once every server answers ``/ping`` (or Failed, with the server's last words as FailureReason).

UpdateEndpoint is blue/green: the new fleet comes up beside the old one and takes traffic only once it answers.
``DeploymentConfig.BlueGreenUpdatePolicy`` says how traffic moves: ALL_AT_ONCE, CANARY (a share, then the rest
after ``WaitIntervalInSeconds``) or LINEAR (equal steps, each held ``WaitIntervalInSeconds``); the old fleet is
kept ``TerminationWaitInSeconds`` after the last step, and the whole update may take at most
``MaximumExecutionTimeoutInSeconds``. While the new fleet takes traffic, the alarms of
``AutoRollbackConfiguration`` are evaluated (local_sagemaker.alarms); one that fires, a timeout, or a new fleet
that cannot come up sends all traffic back to the old fleet: the endpoint stays InService on its old config, with
the FailureReason, as on SageMaker. The old fleet stops only after its last request in flight has been answered.

Records keep each fleet's processes. When the service starts, it adopts the servers still running (pid, start
time and ``/ping``), starts again the ones that are not, and stops every other server under its state directory:
those of an update a stop interrupted, and those a crash kept out of the records (started, not yet written down).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path

from local_sagemaker import alarms, aws, capture, model_servers, processes
from local_sagemaker.listing import Listing
from local_sagemaker.model_servers import LaunchFailed
from local_sagemaker.models import Models
from local_sagemaker.protocol import ValidationException, arn, failure_reason, not_found
from local_sagemaker.roles import Roles
from local_sagemaker.routing import Router, Target
from local_sagemaker.store import Store, now
from local_sagemaker.upstreams import FORWARD_TIMEOUT

log = logging.getLogger(__name__)

KIND = "endpoints"
# Longer than the runtime's forwarding timeout: a request still in flight after this has failed already.
DRAIN_TIMEOUT = FORWARD_TIMEOUT + 5.0
BAKE_POLL_SECONDS = 0.5
DEFAULT_EXECUTION_TIMEOUT = 3600
BUSY = ("Creating", "Updating", "RollingBack", "Deleting", "SystemUpdating")
LISTING = Listing(
    "Endpoints",
    "EndpointName",
    "EndpointStatus",
    ("EndpointName", "EndpointArn", "CreationTime", "LastModifiedTime", "EndpointStatus"),
    default_order="Descending",
)


class Endpoints:
    def __init__(
        self,
        store: Store,
        models: Models,
        router: Router,
        state_dir: Path,
        *,
        workers: int,
        metrics_interval: float,
        region: str,
        account: str,
        roles: Roles,
        service_url: str,
    ):
        """``roles``: the execution roles the model servers run as (their models'); ``service_url``: where the
        servers ask for their role's credentials."""
        self.store, self.models, self.router = store, models, router
        self.roles, self.service_url = roles, service_url
        self.fleets_dir = Path(state_dir).resolve() / "endpoint-fleets"
        self.logs_dir = Path(state_dir) / "logs" / "endpoints"
        self.workers, self.metrics_interval = workers, metrics_interval
        self.region, self.account = region, account
        self.ready = threading.Event()
        self.threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def arn(self, name: str) -> str:
        return arn("endpoint", name, region=self.region, account=self.account)

    def _background(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"endpoint-{target.__name__}", daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    # -- the API ---------------------------------------------------------------------------------------------------

    def create_endpoint(self, request: dict) -> dict:
        name, config_name = request["EndpointName"], request["EndpointConfigName"]
        self.models.endpoint_config(config_name)
        created = now()
        self.store.put_new(
            KIND,
            name,
            {
                "EndpointName": name,
                "EndpointArn": self.arn(name),
                "EndpointConfigName": config_name,
                "EndpointStatus": "Creating",
                "CreationTime": created,
                "LastModifiedTime": created,
                "Tags": request.get("Tags", []),
                "Local": {"fleet": None, "pending": None},
            },
            ValidationException(f'Cannot create already existing endpoint "{self.arn(name)}".'),
        )
        self._background(self._create, name)
        return {"EndpointArn": self.arn(name)}

    def _record(self, name: str) -> dict:
        return self.store.require(KIND, name, not_found("endpoint", name, self.arn(name)))

    def describe_endpoint(self, name: str) -> dict:
        record = self._record(name)
        local = record.pop("Local")
        record.pop("Tags", None)
        fleet = local["fleet"]
        if fleet:
            record["ProductionVariants"] = [self._variant_summary(server) for server in fleet["servers"]]
        # The data capture of the config the endpoint serves (or, while it is created, is to serve).
        record["DataCaptureConfig"] = capture.summary(
            fleet.get("data_capture") if fleet else self._data_capture(record["EndpointConfigName"])
        )
        if pending := local["pending"]:
            # The new fleet's stage, as SageMaker shows it: ActivatingTraffic while traffic moves, then Baking.
            stage = {"Status": pending.get("stage", "ActivatingTraffic"), "StartTime": pending.get("stage_at", now())}
            record["PendingDeploymentSummary"] = {
                "EndpointConfigName": pending["config"],
                "ProductionVariants": [
                    {**self._variant_summary(server), "VariantStatus": [stage]} for server in pending["servers"]
                ],
                "StartTime": pending["started_at"],
            }
        return record

    def _variant_summary(self, server: dict) -> dict:
        alive = processes.live(server) is not None
        return {
            "VariantName": server["variant"],
            "DeployedImages": [{"SpecifiedImage": server["image"], "ResolvedImage": server["image"]}],
            "CurrentWeight": server["weight"],
            "DesiredWeight": server["weight"],
            "CurrentInstanceCount": server["instances"] if alive else 0,
            "DesiredInstanceCount": server["instances"],
        }

    def list_endpoints(self, params: dict) -> dict:
        return LISTING.answer(self.store.items(KIND), params)

    def update_endpoint(self, request: dict) -> dict:
        name, config_name = request["EndpointName"], request["EndpointConfigName"]
        deployment = request.get("DeploymentConfig") or {}
        with self.store.lock:
            record = self._record(name)
            if record["EndpointStatus"] != "InService":
                raise ValidationException(f'Cannot update in-progress endpoint "{self.arn(name)}".')
            self.models.endpoint_config(config_name)
            if record["EndpointConfigName"] == config_name:
                raise ValidationException(
                    f"Endpoint {name} already uses endpoint config {config_name}: nothing to update"
                )
            names = [a["AlarmName"] for a in deployment.get("AutoRollbackConfiguration", {}).get("Alarms", [])]
            watched = alarms.describe(names)
            self.store.update(KIND, name, EndpointStatus="Updating", LastModifiedTime=now(), FailureReason=None)
        self._background(self._update, name, config_name, deployment, watched)
        return {"EndpointArn": self.arn(name)}

    def delete_endpoint(self, name: str) -> dict:
        with self.store.lock:
            record = self._record(name)
            if record["EndpointStatus"] in ("Creating", "Updating", "RollingBack"):
                raise ValidationException(f'Cannot delete in-progress endpoint "{self.arn(name)}".')
            self.store.update(KIND, name, EndpointStatus="Deleting", LastModifiedTime=now())
            self.router.remove(name)  # no new request reaches its servers from now on
        self._background(self._delete, name)
        return {}

    # -- fleets ----------------------------------------------------------------------------------------------------

    def _start_server(
        self, endpoint: str, config: str, variant: dict, model_dir: Path, environment: dict, image: str, role: str
    ) -> dict:
        """Start one model server as the execution role ``role``; its record (the process, and what starts it again)."""
        log_path = self.logs_dir / f"{endpoint}--{config}--{variant['VariantName']}.log"
        aws_environment = {
            **aws.endpoint_environment(),
            **self.roles.process_environment(role, self.arn(endpoint), self.service_url),
        }
        try:
            record, url = model_servers.start(
                model_dir,
                name=endpoint,
                variant=variant["VariantName"],
                workers=self.workers,
                metrics_interval=self.metrics_interval,
                environment=environment,
                aws_environment=aws_environment,
                log_path=log_path,
                stopping=self._stopping,
            )
        except BaseException:
            self.roles.forget(aws_environment)
            raise
        return {
            **record,
            "url": url,
            "variant": variant["VariantName"],
            "config": config,
            "model_dir": str(model_dir),
            "environment": environment,
            "image": image,
            "weight": float(variant.get("InitialVariantWeight", 1.0)),
            "instances": int(variant.get("InitialInstanceCount", 1)),
            "role": role,
            "credentials_token": aws_environment["AWS_CONTAINER_AUTHORIZATION_TOKEN"],
        }

    def _role(self, config_name: str, variant_name: str) -> str:
        """The execution role of the model a variant of an endpoint config serves."""
        config = self.models.endpoint_config(config_name)
        variant = next(v for v in config["ProductionVariants"] if v["VariantName"] == variant_name)
        return self.models.model(variant["ModelName"])["ExecutionRoleArn"]

    def _stop(self, servers: list[dict], grace: float) -> None:
        """Stop model servers; their tokens open their role's credentials no more."""
        processes.stop(servers, grace=grace)
        for server in servers:
            self.roles.forget({"AWS_CONTAINER_AUTHORIZATION_TOKEN": server.get("credentials_token", "")})
        self.router.forget({server["url"] for server in servers if "url" in server})

    def _launch(self, endpoint: str, config_name: str) -> dict:
        """Start the fleet of ``config_name``; returns it once every server answers /ping."""
        config = self.models.endpoint_config(config_name)
        # What no server of the endpoint uses any more goes first (its operations run one at a time: nothing else
        # unpacks or starts from its directory meanwhile).
        local = self._record(endpoint)["Local"]
        in_use = [
            server["model_dir"] for fleet in (local["fleet"], local["pending"]) if fleet for server in fleet["servers"]
        ]
        model_servers.prune(self.fleets_dir / endpoint, in_use)
        servers: list[dict] = []
        try:
            for variant in config["ProductionVariants"]:
                model = self.models.model(variant["ModelName"])
                container = model.get("PrimaryContainer") or model["Containers"][0]
                role = model["ExecutionRoleArn"]
                try:
                    s3 = self.roles.session(role, self.arn(endpoint)).client("s3")
                except ValidationException as error:
                    raise LaunchFailed(error.message) from None
                models_dir = self.fleets_dir / endpoint / "models"
                model_dir = model_servers.model_dir(models_dir, container["ModelDataUrl"], s3)
                servers.append(
                    self._start_server(
                        endpoint,
                        config_name,
                        variant,
                        model_dir,
                        container.get("Environment", {}),
                        container.get("Image", ""),
                        role,
                    )
                )
        except BaseException as error:
            self._stop(servers, grace=processes.IDLE_STOP_GRACE_SECONDS)
            if isinstance(error, LaunchFailed | KeyboardInterrupt | SystemExit):
                raise
            raise LaunchFailed(f"{type(error).__name__}: {error}") from error
        # The config's data capture, kept with its fleet: a config may be deleted, or made again under its name,
        # while the fleet serves it.
        data_capture = config.get("DataCaptureConfig")
        return {"config": config_name, "servers": servers, "started_at": now(), "data_capture": data_capture}

    def _data_capture(self, config_name: str) -> dict | None:
        try:
            return self.models.endpoint_config(config_name).get("DataCaptureConfig")
        except ValidationException:  # deleted
            return None

    @staticmethod
    def _targets(fleet: dict, share: float = 1.0) -> list[Target]:
        return [
            Target(
                s["url"],
                s["variant"],
                fleet["config"],
                s["weight"] * share,
                capture.settings(fleet.get("data_capture"), s.get("role")),
            )
            for s in fleet["servers"]
        ]

    def _retire(self, fleet: dict | None) -> None:
        """Wait until nothing is in flight to ``fleet`` (routed away already), then stop its servers."""
        if not fleet:
            return
        urls = {server["url"] for server in fleet["servers"]}
        processes.wait_until(lambda: self.router.idle(urls), DRAIN_TIMEOUT, interval=0.02)
        self._stop(fleet["servers"], grace=processes.MODEL_SERVER_STOP_GRACE_SECONDS)

    def _fail(self, name: str, status: str, reason: str) -> None:
        """Endpoint ``name`` in ``status`` (Failed, or InService again when an update failed), saying why."""
        self.store.update(
            KIND, name, EndpointStatus=status, LastModifiedTime=now(), FailureReason=failure_reason(reason)
        )

    def _set_local(self, name: str, **local) -> None:
        with self.store.lock:
            record = self.store.get(KIND, name)
            self.store.update(KIND, name, Local={**record["Local"], **local})

    # -- the work behind the API, in threads -----------------------------------------------------------------------

    def _create(self, name: str) -> None:
        config_name = self._record(name)["EndpointConfigName"]
        try:
            fleet = self._launch(name, config_name)
        except LaunchFailed as failed:
            self._fail(name, "Failed", str(failed))
            log.warning("Endpoint %s failed: %s", name, failed)
            return
        self._set_local(name, fleet=fleet)
        self.router.set(name, self._targets(fleet))
        self.store.update(KIND, name, EndpointStatus="InService", LastModifiedTime=now())
        log.info("Endpoint %s is InService with config %s", name, config_name)

    def _update(self, name: str, config_name: str, deployment: dict, watched: list[dict]) -> None:
        old = self._record(name)["Local"]["fleet"]
        try:
            new = self._launch(name, config_name)
        except LaunchFailed as failed:
            reason = f"Failed to update endpoint {name} to config {config_name}: {failed}"
            self._fail(name, "InService", reason)
            log.warning("%s", reason)
            return
        self._set_local(name, pending=new)
        try:
            reason = self._shift(name, old, new, deployment, watched)
        except Exception as error:  # CloudWatch unreachable, say: the update cannot be watched, so it is undone
            log.exception("Endpoint %s: traffic shift failed", name)
            reason = f"the traffic shift failed: {type(error).__name__}: {error}"
        if reason is None:
            # All traffic on the new fleet; the update is done once the old one has drained and stopped.
            self.router.set(name, self._targets(new))
            self._retire(old)
            with self.store.lock:
                self._set_local(name, fleet=new, pending=None)
                self.store.update(
                    KIND,
                    name,
                    EndpointConfigName=config_name,
                    EndpointStatus="InService",
                    LastDeploymentConfig=deployment or None,
                    LastModifiedTime=now(),
                )
            log.info("Endpoint %s updated to config %s", name, config_name)
            return
        log.warning("Endpoint %s: rolling back the update to %s: %s", name, config_name, reason)
        self.store.update(KIND, name, EndpointStatus="RollingBack", LastModifiedTime=now())
        self.router.set(name, self._targets(old))
        self._retire(new)
        self._set_local(name, pending=None)
        self._fail(name, "InService", f"Update to endpoint config {config_name} rolled back: {reason}")

    def _shift(self, name: str, old: dict, new: dict, deployment: dict, watched: list[dict]) -> str | None:
        """Move traffic from ``old`` to ``new`` as the deployment config says; the reason to roll back, if any."""
        policy = deployment.get("BlueGreenUpdatePolicy", {})
        routing = policy.get("TrafficRoutingConfiguration", {"Type": "ALL_AT_ONCE"})
        wait = routing.get("WaitIntervalInSeconds", 0)
        steps = [1.0]
        if routing["Type"] == "CANARY":
            steps = [self._share(routing["CanarySize"], new), 1.0]
        elif routing["Type"] == "LINEAR":
            step = self._share(routing["LinearStepSize"], new)
            steps = [min(1.0, step * (i + 1)) for i in range(int(1 / step + 0.999999))]
        deadline = time.monotonic() + policy.get("MaximumExecutionTimeoutInSeconds", DEFAULT_EXECUTION_TIMEOUT)
        urls = {server["url"] for server in new["servers"]}
        since = time.time()
        for index, share in enumerate(steps):
            self.router.set(name, self._targets(old, 1 - share) + self._targets(new, share))
            last = index == len(steps) - 1
            hold = policy.get("TerminationWaitInSeconds", 0) if last else wait
            self._set_local(
                name, pending={**new, "stage": "Baking" if last else "ActivatingTraffic", "stage_at": now()}
            )
            log.info("Endpoint %s: %.0f%% of traffic on config %s for %s s", name, 100 * share, new["config"], hold)
            if reason := self._bake(name, urls, watched, hold, deadline, since):
                return reason
        return None

    @staticmethod
    def _share(size: dict, fleet: dict) -> float:
        instances = sum(server["instances"] for server in fleet["servers"])
        share = size["Value"] / 100 if size["Type"] == "CAPACITY_PERCENT" else size["Value"] / instances
        return min(1.0, max(share, 0.01))

    def _bake(
        self, name: str, urls: set[str], watched: list[dict], hold: float, deadline: float, update_started: float
    ) -> str | None:
        """Hold this step for ``hold`` seconds under the alarms; the reason to roll back, if any."""
        since = time.time()
        end = time.monotonic() + hold
        while True:
            # An alarm set to ALARM since the update began, by CloudWatch or by anyone (SetAlarmState: how an
            # operator, or the pipeline's failed check, stops a blue/green update on SageMaker).
            if reason := alarms.in_alarm([alarm["AlarmName"] for alarm in watched], update_started):
                return reason
            for alarm in watched:
                if reason := alarms.evaluate(alarm, name, lambda start: self.router.samples_since(urls, start), since):
                    return reason
            if time.monotonic() > deadline:
                return "MaximumExecutionTimeoutInSeconds exceeded"
            if self._stopping.is_set():
                return "the local SageMaker service is stopping"
            if time.monotonic() >= end:
                return None
            time.sleep(min(BAKE_POLL_SECONDS, max(0.0, end - time.monotonic())))

    def _delete(self, name: str) -> None:
        local = self._record(name)["Local"]
        self._retire(local["fleet"])
        self._retire(local["pending"])
        shutil.rmtree(self.fleets_dir / name, ignore_errors=True)
        self.store.delete(KIND, name)
        log.info("Endpoint %s deleted", name)

    # -- start and stop of the service -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Bring back what the records say serves (in a thread; ``ready`` is set when done)."""
        self._background(self._recover)

    def _recover(self) -> None:
        try:
            recorded = set()
            for record in self.store.items(KIND):
                recorded |= {server["pid"] for server in self._recover_one(record)}
            # Servers no record names (started by a service killed before it could write them down) serve nothing.
            strays = [s for s in processes.running_with("inference.serve", self.fleets_dir) if s["pid"] not in recorded]
            if strays:
                log.warning(
                    "Stopping %d model servers no endpoint record names: %s",
                    len(strays),
                    ", ".join(str(s["pid"]) for s in strays),
                )
                processes.stop(strays, grace=processes.IDLE_STOP_GRACE_SECONDS)
        finally:
            self.ready.set()

    def _recover_one(self, record: dict) -> list[dict]:
        """Bring one endpoint back as its record says; returns the servers it now runs on."""
        name, local = record["EndpointName"], record["Local"]
        if local["pending"]:  # an update a stop interrupted: its fleet never took over
            self._stop(local["pending"]["servers"], grace=processes.IDLE_STOP_GRACE_SECONDS)
            self._set_local(name, pending=None)
        status = record["EndpointStatus"]
        if status == "Deleting":
            self._delete(name)
            return []
        if status == "Creating" or (status == "Failed" and not local["fleet"]):
            if status == "Creating":
                self._create(name)
            return (self._record(name)["Local"]["fleet"] or {}).get("servers", [])
        fleet = local["fleet"]
        if "data_capture" not in fleet:  # recorded before fleets kept their config's data capture
            fleet["data_capture"] = self._data_capture(fleet["config"])
        servers = []
        try:
            for server in fleet["servers"]:
                adoptable = "credentials_token" in server  # a server of before the roles took the service's keys
                if adoptable and processes.live(server) is not None and processes.healthy(server["url"]):
                    # Adopted: it outlived the service that started it, and keeps its way to its role's credentials.
                    self.roles.adopt(server["credentials_token"], server["role"], self.arn(name))
                    servers.append(server)
                    continue
                self._stop([server], grace=processes.IDLE_STOP_GRACE_SECONDS)
                variant = {
                    "VariantName": server["variant"],
                    "InitialVariantWeight": server["weight"],
                    "InitialInstanceCount": server["instances"],
                }
                servers.append(
                    self._start_server(
                        name,
                        fleet["config"],
                        variant,
                        Path(server["model_dir"]),
                        server["environment"],
                        server["image"],
                        server.get("role") or self._role(fleet["config"], server["variant"]),
                    )
                )
        except LaunchFailed as failed:
            self._stop(servers, grace=processes.IDLE_STOP_GRACE_SECONDS)
            self._fail(name, "Failed", f"could not be brought back at the service's start: {failed}")
            return []
        fleet = {**fleet, "servers": servers}
        self._set_local(name, fleet=fleet)
        self.router.set(name, self._targets(fleet))
        fields = {"EndpointStatus": "InService"}
        if status in ("Updating", "RollingBack"):
            fields["FailureReason"] = "The update was interrupted by a stop of the local SageMaker service"
        self.store.update(KIND, name, **fields)
        log.info("Endpoint %s serves config %s again", name, fleet["config"])
        return servers

    def shutdown(self) -> None:
        """Stop every model server; the records stay, so the next start brings the endpoints back."""
        self._stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)
        servers = processes.running_with("inference.serve", self.fleets_dir)  # recorded or not
        with contextlib.suppress(Exception):
            processes.stop(servers, grace=processes.MODEL_SERVER_STOP_GRACE_SECONDS)
