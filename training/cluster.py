"""Where this process stands in a SageMaker training cluster, from the SM_* environment, and DDP set-up.

SageMaker runs the entry point once per host. Each host runs one process per GPU (one process without a GPU);
rank = host index * processes per host + local rank. The master is the first host, unless MASTER_ADDR says
otherwise (the local SageMaker service runs every "host" as a process on 127.0.0.1, and everything then listens
on loopback only).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT = 29500
# How long a rank waits for the others to join or to answer: long enough for a slow host to load the data.
TIMEOUT = timedelta(minutes=10)


class ClusterError(ValueError):
    """The SM_* environment does not describe a cluster this process belongs to."""


@dataclass(frozen=True)
class Cluster:
    hosts: tuple[str, ...]
    current_host: str
    num_gpus: int  # on each host, as SageMaker counts them

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Cluster:
        env = os.environ if env is None else env
        try:
            hosts = json.loads(env.get("SM_HOSTS", '["localhost"]'))
        except ValueError as exc:
            raise ClusterError(f"SM_HOSTS is not a JSON list of host names: {exc}") from None
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise ClusterError(f"SM_HOSTS must be a non-empty JSON list of host names, not {hosts!r}")
        current = env.get("SM_CURRENT_HOST", hosts[0])
        if current not in hosts:
            raise ClusterError(f"SM_CURRENT_HOST {current!r} is not one of SM_HOSTS {hosts}")
        try:
            num_gpus = int(env.get("SM_NUM_GPUS", "0"))
        except ValueError:
            raise ClusterError(f"SM_NUM_GPUS must be a whole number, not {env['SM_NUM_GPUS']!r}") from None
        return cls(tuple(hosts), current, num_gpus)

    @property
    def processes_per_host(self) -> int:
        return self.num_gpus if self.num_gpus > 0 and torch.cuda.is_available() else 1

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.processes_per_host

    def rank(self, local_rank: int) -> int:
        return self.hosts.index(self.current_host) * self.processes_per_host + local_rank

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_process_group(cluster: Cluster, local_rank: int, backend: str) -> None:
    """Join the job's process group (only when there is more than one process).

    Everything listens where the job's network is: gloo on SageMaker's interface (SM_NETWORK_INTERFACE_NAME), and
    the rendezvous of a loopback master on loopback alone (TCPStore's server would listen on every interface).
    """
    global _listener
    address = os.environ.get("MASTER_ADDR", cluster.hosts[0])
    port = int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    rank = cluster.rank(local_rank)
    if interface := os.environ.get("SM_NETWORK_INTERFACE_NAME"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if rank == 0 and _is_loopback(address):
        _listener = socket.create_server((address, port), backlog=max(128, cluster.world_size))
    store = dist.TCPStore(
        address,
        port,
        cluster.world_size,
        is_master=rank == 0,
        timeout=TIMEOUT,
        master_listen_fd=_listener.fileno() if _listener else None,
    )
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=cluster.world_size, timeout=TIMEOUT)


_listener: socket.socket | None = None  # the rendezvous socket, kept open as long as the store serves on it


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: SageMaker's algo-1
        return address == "localhost"
