"""How a script-mode training job's code is named, fetched and run, as SageMaker's training toolkit runs it: the
hyperparameters ``sagemaker_submit_directory`` (the sourcedir archive in S3, unpacked into /opt/ml/code) and
``sagemaker_program`` (the entry point, a file in it), run by the service's Python with the job's other
hyperparameters as ``--key value``. A job that names a command of its own instead runs as local_sagemaker.container
runs it; that module also holds what both kinds of job see (hyperparameters decoded, /opt/ml, the SM_* environment).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from local_sagemaker import aws, container
from local_sagemaker.archives import ArchiveError, unpack
from local_sagemaker.container import decoded_value, user_args
from local_sagemaker.jobs import JobFailed
from local_sagemaker.protocol import ValidationException

PROGRAM, SUBMIT_DIRECTORY = "sagemaker_program", "sagemaker_submit_directory"


def check_code(
    specification: Mapping,
    hyperparameters: Mapping[str, str],
    *,
    specification_name: str = "AlgorithmSpecification",
    hyperparameters_name: str = "HyperParameters",
) -> None:
    """ValidationException unless the job names code this service runs: the container's own command
    (local_sagemaker.container) or, without one, a script-mode job's sourcedir and entry point."""
    if container.command(specification, specification_name) is None:
        check_script_mode(hyperparameters, hyperparameters_name)


def check_script_mode(hyperparameters: Mapping[str, str], what: str = "HyperParameters") -> None:
    """ValidationException unless ``hyperparameters`` name a script-mode job's code, as the training toolkit reads
    them (JSON-decoded): its sourcedir, and an entry point that is a file inside it."""
    for key in (PROGRAM, SUBMIT_DIRECTORY):
        if key not in hyperparameters:
            raise ValidationException(
                f"{what} lack {key}: this local service runs the SageMaker framework containers' contract: script "
                "mode (sagemaker_program and sagemaker_submit_directory), or the command in "
                "AlgorithmSpecification.ContainerEntrypoint and ContainerArguments"
            )
    program = decoded_value(hyperparameters[PROGRAM])
    path = PurePosixPath(program) if isinstance(program, str) else PurePosixPath()
    if (
        not path.parts
        or path.is_absolute()
        or ".." in path.parts
        or program.startswith("-")
        or any(character in program for character in "\\\0\n")
    ):
        raise ValidationException(
            f"{what}: sagemaker_program {program!r} must name a file inside the job's code "
            "(a relative path, without '..')"
        )
    if not isinstance(decoded_value(hyperparameters[SUBMIT_DIRECTORY]), str):
        raise ValidationException(f"{what}: sagemaker_submit_directory must be an s3://bucket/key URI")


def program(hyperparameters: Mapping[str, str]) -> str:
    """The entry point, as the toolkit reads it: a path relative to /opt/ml/code."""
    return decoded_value(hyperparameters[PROGRAM])


def unpack_code(s3, hyperparameters: Mapping[str, str], code_dir: Path) -> None:
    """The sourcedir, read from S3 and unpacked into ``code_dir`` (the host's /opt/ml/code); JobFailed if it cannot
    be read, is not a safe archive, or is not what the content address in its key says it is."""
    uri = decoded_value(hyperparameters[SUBMIT_DIRECTORY])
    code = _read(s3, uri)
    try:
        if address := aws.content_address(uri):  # code is run only as the key that names it says
            aws.check_digest(code, address, f"{SUBMIT_DIRECTORY} {uri}")
        unpack(code, code_dir, uri)
    except (ArchiveError, ValueError) as error:
        raise JobFailed(f"ClientError: {error}: refused") from None


def _read(s3, uri: str) -> bytes:
    try:
        bucket, key = aws.split_s3_uri(uri)
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        raise JobFailed(f"ClientError: cannot read {SUBMIT_DIRECTORY} {uri}: {error}") from None


def check_entry_point(code_dir: Path, entry_point: str) -> None:
    """JobFailed unless the entry point is a file of the unpacked sourcedir (not a link out of it)."""
    code = code_dir.resolve()
    path = (code / entry_point).resolve()
    if not path.is_relative_to(code) or not path.is_file():
        raise JobFailed(f"ClientError: the entry point {entry_point} is not a file in {SUBMIT_DIRECTORY}")


def argv(entry_point: str, hyperparameters: Mapping[str, str]) -> list[str]:
    """The command that runs the entry point, in its host's code directory: the service's Python on the script,
    with the job's own hyperparameters as the toolkit passes them."""
    return [sys.executable, entry_point, *user_args(hyperparameters)]
