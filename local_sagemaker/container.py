"""What a training job's container sees, as a SageMaker framework image has it: its hyperparameters as the training
toolkit reads them (each value JSON-decoded when it parses), each host's /opt/ml (the config files, the channels, the
model and output directories) and SM_* environment, and the job's own command, AlgorithmSpecification's
ContainerEntrypoint and ContainerArguments, run as the image runs it (script mode's entry point is
local_sagemaker.script_mode's).

The SageMaker Python SDK's ModelTrainer sends ``["/bin/bash"]`` and ``["-c", "chmod +x
/opt/ml/input/data/sm_drivers/sm_train.sh && /opt/ml/input/data/sm_drivers/sm_train.sh"]``, with its driver scripts
in the ``sm_drivers`` channel: in a training container they read ``/opt/ml/input/config/*.json``, write the SM_*
environment, and run the user's entry script from the ``code`` channel.

A job here is processes on the host, not a container, and this module decides the two things that differ:

- **What may run.** Scripts the job brought (files of its channels, under /opt/ml), by the interpreters a framework
  image has: a script itself, a Python (``python``, ``python3``, ``python3.N``, by any path: the service's own
  interpreter runs it, as it runs script mode's entry point) on a script, or a shell (``bash``, ``sh``) on a script
  or with a ``-c`` line that only runs scripts (``chmod +x S && S``, ``bash S``, ``python3 S``: plain words joined
  by ``&&``). Anything else (a program of the host, ``python -c``, a ``-c`` line with other commands, pipes,
  redirections, quoting or expansions) is a ValidationException when the job is created, so that a request alone
  never names a program of the machine the service runs on. The scripts are the job's code and run as a training
  container runs them, as script mode runs train.py.
- **Where /opt/ml is.** Each host's /opt/ml is a directory of the job's. Its path replaces ``/opt/ml`` in the
  command, in the environment (SM_*, and the training toolkit's SAGEMAKER_BASE_DIR), and in the files of the channel
  that holds the command's script: the SDK's drivers spell ``/opt/ml/...`` as constants that no variable moves.
  Other channels are data and are never rewritten; user code finds its directories in the SM_* environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from local_sagemaker import processes
from local_sagemaker.protocol import ValidationException
from local_sagemaker.store import write_atomically

log = logging.getLogger(__name__)

# The loopback interface's name (Linux: lo, macOS: lo0): every local "host" of a job talks over it.
LOOPBACK_INTERFACE = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")
OPT_ML = PurePosixPath("/opt/ml")
_PYTHON = re.compile(r"python(3(\.\d+)?)?")
SHELLS = ("bash", "sh")
_PYTHON_OPTIONS = frozenset({"-u", "-B", "-O", "-OO"})
_SHELL_OPTIONS = re.compile(r"-[eux]+")
# A word of a -c line, and a job directory that may stand in one: nothing a shell would expand, split or redirect.
PLAIN = re.compile(r"[A-Za-z0-9_./+=:,@%-]+")
# /opt/ml as a whole path component (not /opt/mlflow, not /x/opt/ml), in text and in bytes.
_OPT_ML_TEXT = re.compile(r"(?<![\w./-])/opt/ml(?![\w.-])")
_OPT_ML_BYTES = re.compile(rb"(?<![\w./-])/opt/ml(?![\w.-])")
ALLOWED = (
    "a script under /opt/ml that the job's channels bring, run by itself, by a Python (python, python3) or by a "
    "shell (bash, sh), or a shell's -c line of such scripts joined by && (as the SageMaker Python SDK's ModelTrainer "
    "sends)"
)


@dataclasses.dataclass(frozen=True)
class Command:
    """A command the service will run: ``argv`` as the request gave it, ``line`` the commands of a shell's -c line
    (each a tuple of words) if it has one, ``scripts`` the /opt/ml paths of the scripts it runs."""

    argv: tuple[str, ...]
    line: tuple[tuple[str, ...], ...] | None
    scripts: tuple[PurePosixPath, ...]

    def channels(self) -> set[str]:
        """The channels holding the scripts (``/opt/ml/input/data/<channel>/...``): the image's code, in which
        /opt/ml is mapped."""
        found = set()
        for script in self.scripts:
            parts = script.relative_to(OPT_ML).parts
            if len(parts) > 3 and parts[:2] == ("input", "data"):
                found.add(parts[2])
        return found

    def argv_for(self, root: Path, python: str = sys.executable) -> list[str]:
        """The command to run for the host whose /opt/ml is ``root``: Python is ``python``, a shell is the host's,
        every /opt/ml path is under ``root``."""
        if _interpreter(self.argv[0]) is None:  # the script itself
            return [map_text(word, root) for word in self.argv]
        executable = _executable(self.argv[0], python)
        if self.line is None:
            return [executable, *(map_text(word, root) for word in self.argv[1:])]
        c_index = self.argv.index("-c")
        line = " && ".join(
            " ".join(
                shlex.quote(_executable(word, python) if index == 0 and _interpreter(word) else map_text(word, root))
                for index, word in enumerate(command)
            )
            for command in self.line
        )
        return [executable, *self.argv[1:c_index], "-c", line, *(map_text(w, root) for w in self.argv[c_index + 2 :])]


def command(specification: Mapping, what: str = "AlgorithmSpecification") -> Command | None:
    """The checked command of an AlgorithmSpecification, or None when it gives none (a script-mode job). Without a
    ContainerEntrypoint the arguments are the command, as a framework image's entrypoint runs them."""
    argv = [*(specification.get("ContainerEntrypoint") or ()), *(specification.get("ContainerArguments") or ())]
    if not argv:
        return None

    def refuse(why: str):
        raise ValidationException(
            f"{what}: ContainerEntrypoint and ContainerArguments {argv!r}: {why}. This local "
            f"SageMaker service runs processes on its own machine, and runs only {ALLOWED}"
        )

    if any(not isinstance(word, str) or "\0" in word or "\n" in word for word in argv):
        refuse("a word holds a NUL or a newline")
    interpreter = _interpreter(argv[0])
    if interpreter is None:
        if not argv[0].startswith(f"{OPT_ML}/"):
            refuse(f"{argv[0]!r} is neither an interpreter of a framework image nor a script under /opt/ml")
        return Command(tuple(argv), None, (_script(argv[0], refuse),))
    rest = _after_options(argv[1:], interpreter)
    if interpreter == "python" or rest[:1] != ["-c"]:
        if not rest:
            refuse(f"{argv[0]} runs no script")
        return Command(tuple(argv), None, (_script(rest[0], refuse),))
    if len(rest) < 2:
        refuse("-c has no command line")
    line = _line(rest[1], refuse)
    scripts = tuple(script for words in line for script in _line_scripts(words, refuse))
    return Command(tuple(argv), line, scripts)


def _interpreter(word: str) -> str | None:
    """The interpreter ``word`` names, by any path (the image's): "python", a shell's name, or None."""
    name = PurePosixPath(word).name
    if _PYTHON.fullmatch(name):
        return "python"
    return name if name in SHELLS else None


def _executable(word: str, python: str) -> str:
    interpreter = _interpreter(word)
    if interpreter == "python":
        return python
    return shutil.which(interpreter) or f"/bin/{interpreter}"


def _after_options(words: list[str], interpreter: str) -> list[str]:
    """What follows the interpreter's options (the harmless ones: any other is taken for the script, and refused)."""
    index = 0
    while index < len(words) and (
        words[index] in _PYTHON_OPTIONS if interpreter == "python" else bool(_SHELL_OPTIONS.fullmatch(words[index]))
    ):
        index += 1
    return words[index:]


def _script(word: str, refuse) -> PurePosixPath:
    path = PurePosixPath(word)
    if not path.is_absolute() or ".." in path.parts or not path.is_relative_to(OPT_ML) or path == OPT_ML:
        refuse(f"{word!r} is not a script under /opt/ml")
    return path


def _line(text: str, refuse) -> tuple[tuple[str, ...], ...]:
    """A -c line's commands: plain words, joined by ``&&``."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as error:
        refuse(f"the -c line cannot be read: {error}")
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token == "&&":
            commands.append([])
        elif PLAIN.fullmatch(token):
            commands[-1].append(token)
        else:
            refuse(f"the -c line holds {token!r}: only plain words joined by && run here")
    if any(not words for words in commands):
        refuse("the -c line has an empty command")
    return tuple(tuple(words) for words in commands)


def _line_scripts(words: tuple[str, ...], refuse) -> list[PurePosixPath]:
    """The scripts one command of a -c line runs: ``chmod +x S`` (none), ``S ...``, or an interpreter on ``S ...``."""
    if words[0] == "chmod":
        if len(words) != 3 or words[1] != "+x":
            refuse(f"{' '.join(words)!r}: chmod may only make a script executable (chmod +x S)")
        _script(words[2], refuse)
        return []
    interpreter = _interpreter(words[0])
    if interpreter is None:
        return [_script(words[0], refuse)]
    rest = _after_options(list(words[1:]), interpreter)
    if not rest:
        refuse(f"{' '.join(words)!r} runs no script")
    return [_script(rest[0], refuse)]


def map_text(text: str, root: Path) -> str:
    """``text`` with each /opt/ml path under ``root`` instead."""
    return _OPT_ML_TEXT.sub(lambda _: str(root), text)


def map_files(directory: Path, root: Path) -> int:
    """Put ``root`` for /opt/ml in every file under ``directory`` that names it; how many changed. Each is replaced
    by a new file, so that copies hard-linked from it keep theirs."""
    changed = 0
    replacement = str(root).encode()
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        mapped = _OPT_ML_BYTES.sub(lambda _: replacement, data)
        if mapped != data:
            write_atomically(path, mapped, mode=path.stat().st_mode & 0o777)
            changed += 1
    return changed


# -- what a training container sees: hyperparameters, environment, /opt/ml ---------------------------------------


def decoded_value(value: str):
    """A hyperparameter as SageMaker's training toolkit reads it: JSON-decoded when it parses (the SDK's framework
    estimators send ``"\\"train.py\\""``), else the string itself."""
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def user_hyperparameters(hyperparameters: Mapping[str, str]) -> dict:
    """The script's hyperparameters, decoded: all but the sagemaker_* ones, which are the toolkit's own."""
    return {key: decoded_value(value) for key, value in hyperparameters.items() if not key.startswith("sagemaker_")}


def user_args(hyperparameters: Mapping[str, str]) -> list[str]:
    """The script's arguments as the training toolkit makes them: ``--key value`` for each of its hyperparameters
    (``-k`` for a one-letter key), sorted; a value is its decoded form printed (a mapping as ``k=v,...``)."""
    args = []
    for key, value in sorted(user_hyperparameters(hyperparameters).items()):
        if isinstance(value, Mapping):
            value = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
        args += [f"--{key}" if len(key) > 1 else f"-{key}", "" if value is None else str(value)]
    return args


def _env_value(value) -> str:
    """A decoded hyperparameter as the toolkit's SM_HP_* shows it: a string as itself, anything else as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _gpu_count() -> int:
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def host_roots(ml_dir: Path, count: int) -> list[Path]:
    """Each host's /opt/ml: the job's directory for the first, a directory in it for each other."""
    return [ml_dir, *(ml_dir / "hosts" / f"algo-{index}" for index in range(2, count + 1))]


def host_environments(
    *,
    job_name: str,
    job_arn: str,
    roots: Sequence[Path],
    program: str | None,
    hyperparameters: Mapping[str, str],
    channels: Sequence[str],
    cpus: int,
    region: str,
    aws: Mapping[str, str] | None = None,
    environment: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """The environment of each host's process (``roots``: their /opt/ml): what SageMaker and its training toolkit
    set, plus loopback DDP, over an allow-listed base (never the service's own credentials or anything of
    Airflow's) and the request's Environment; ``program``: a script-mode job's entry point (None: the container's
    command runs, its Python first on PATH as in an image); ``aws``: how the job's role reaches AWS."""
    hosts = [f"algo-{i + 1}" for i in range(len(roots))]
    hps = user_hyperparameters(hyperparameters)
    gpus_per_host = _gpu_count() // len(roots)
    threads = max(1, cpus // len(roots))
    service = {
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "AWS_REGION": region,
        **(aws or {}),
        "TRAINING_JOB_NAME": job_name,
        "TRAINING_JOB_ARN": job_arn,
        "SM_HOSTS": json.dumps(hosts),
        "SM_NUM_CPUS": str(threads),
        "SM_NUM_GPUS": str(gpus_per_host),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HPS": json.dumps(hps),
        "SM_NETWORK_INTERFACE_NAME": LOOPBACK_INTERFACE,
        # The hosts' names resolve only inside SageMaker's network: here every host is a process on loopback,
        # and the rendezvous and gloo listen on loopback alone (training/cluster.py).
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(processes.free_port()),
        **{f"SM_HP_{key.upper()}": _env_value(value) for key, value in hps.items()},
    }
    if program is not None:
        service |= {
            "SM_USER_ENTRY_POINT": program,
            "SM_MODULE_DIR": str(decoded_value(hyperparameters["sagemaker_submit_directory"])),
            "SM_USER_ARGS": json.dumps(user_args(hyperparameters)),
        }
    else:  # an image's python3 (and pip) come first on its PATH: here, the service's interpreter's
        inherited = processes.allowed_env().get("PATH")
        service["PATH"] = os.pathsep.join(filter(None, (str(Path(sys.executable).parent), inherited)))
    base = processes.allowed_env({**(environment or {}), **service})
    environments = []
    for index, (host, root) in enumerate(zip(hosts, roots, strict=True)):
        env = {
            **base,
            "SM_CURRENT_HOST": host,
            "SAGEMAKER_BASE_DIR": str(root),  # the training toolkit's /opt/ml
            "SM_MODEL_DIR": str(root / "model"),
            "SM_OUTPUT_DIR": str(root / "output"),
            "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
            "SM_INPUT_DIR": str(root / "input"),
            "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
            **{f"SM_CHANNEL_{name.upper()}": str(root / "input" / "data" / name) for name in channels},
        }
        if program is not None:
            env["PYTHONPATH"] = str(root / "code")
        if gpus_per_host:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * gpus_per_host + g) for g in range(gpus_per_host))
        env["SM_TRAINING_ENV"] = json.dumps(
            {
                "job_name": job_name,
                "current_host": host,
                "hosts": hosts,
                "hyperparameters": hps,
                "channel_input_dirs": {name: env[f"SM_CHANNEL_{name.upper()}"] for name in channels},
                "model_dir": env["SM_MODEL_DIR"],
                "output_data_dir": env["SM_OUTPUT_DATA_DIR"],
                "output_dir": env["SM_OUTPUT_DIR"],
                "input_dir": env["SM_INPUT_DIR"],
                "input_config_dir": env["SM_INPUT_CONFIG_DIR"],
                "num_cpus": threads,
                "num_gpus": gpus_per_host,
                "network_interface_name": LOOPBACK_INTERFACE,
                **({"module_dir": env["SM_MODULE_DIR"], "user_entry_point": program} if program is not None else {}),
            }
        )
        environments.append(env)
    return environments


def lay_out(record: Mapping, roots: list[Path], channels: list[str], command: Command | None) -> None:
    """Each host's /opt/ml: the config files SageMaker writes there (hyperparameters.json as sent,
    inputdataconfig.json, resourceconfig.json naming the host), the channels (the first host's as downloaded, the
    others' hard-linked copies), and one model and output data directory for all, which are what is uploaded;
    then, for a container's command, /opt/ml mapped in the channel of its script."""
    first = roots[0]
    hosts = [f"algo-{index + 1}" for index in range(len(roots))]
    specification = record["AlgorithmSpecification"]
    input_config = {}
    for channel in record.get("InputDataConfig", []):
        source = channel["DataSource"].get("S3DataSource", {})
        input_config[channel["ChannelName"]] = {
            "TrainingInputMode": channel.get("InputMode") or specification.get("TrainingInputMode", "File"),
            "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
            "RecordWrapperType": channel.get("RecordWrapperType", "None"),
            **{key: channel[key] for key in ("ContentType", "CompressionType") if key in channel},
        }
    instance_type = record["ResourceConfig"].get("InstanceType", "local")
    for directory in ("model", "output/data", "input/config", "input/data", "logs"):
        (first / directory).mkdir(parents=True, exist_ok=True)
    for root in roots[1:]:
        for directory in ("output", "input/config", "input/data"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "model").symlink_to(first / "model")
        (root / "output" / "data").symlink_to(first / "output" / "data")
        if (first / "code").is_dir():
            (root / "code").symlink_to(first / "code")
        for name in channels:
            shutil.copytree(first / "input" / "data" / name, root / "input" / "data" / name, copy_function=os.link)
    for host, root in zip(hosts, roots, strict=True):
        config = root / "input" / "config"
        (config / "hyperparameters.json").write_text(json.dumps(record.get("HyperParameters", {}), indent=2))
        (config / "inputdataconfig.json").write_text(json.dumps(input_config, indent=2))
        group = {"instance_group_name": "homogeneousCluster", "instance_type": instance_type, "hosts": hosts}
        (config / "resourceconfig.json").write_text(
            json.dumps(
                {
                    "current_host": host,
                    "current_instance_type": instance_type,
                    "current_group_name": "homogeneousCluster",
                    "hosts": hosts,
                    "instance_groups": [group],
                    "network_interface_name": LOOPBACK_INTERFACE,
                },
                indent=2,
            )
        )
    for name in sorted(command.channels() & set(channels)) if command else ():
        for root in roots:
            changed = map_files(root / "input" / "data" / name, root)
            log.info("Channel %s: /opt/ml mapped to %s in %d files", name, root, changed)
