"""Model artifacts as SageMaker hands them to its inference container: a model directory, possibly packed as
model.tar.gz (locally or in S3), with the handler in `code/inference.py` beside the files it imports."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

HANDLER = "inference.py"
# The handler and the modules beside it that it imports, as they ship in code/ (with training's models.py).
# training/train.py, which travels alone, names the same files.
HANDLER_FILES = (HANDLER, "predictor.py", "decoding.py", "json_fast.py")
HANDLER_FUNCTIONS = ("model_fn", "input_fn", "predict_fn", "output_fn")


class ArtifactError(ValueError):
    """A model artifact that cannot be served; the message names it and what is wrong."""


def add_code(model_dir: str | Path) -> None:
    """Put the handler and the model definitions into ``model_dir``/code, as training does at its end."""
    repository = Path(__file__).resolve().parents[1]
    code = Path(model_dir) / "code"
    code.mkdir(parents=True, exist_ok=True)
    for name in HANDLER_FILES:
        shutil.copy(repository / "inference" / name, code / name)
    shutil.copy(repository / "training" / "models.py", code / "models.py")


def prepare_model_dir(source: str, workdir: str | Path) -> Path:
    """The model directory for ``source``: a directory as is, a model.tar.gz (local or s3://) unpacked into a
    new folder under ``workdir``. S3 is reached as any boto3 client reaches it, through the standard
    environment (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for a local S3, the AWS_* credentials and region), as
    the SageMaker container has its own role and nothing of the pipeline's configuration."""
    if source.startswith("s3://"):
        archive = _download(source, Path(workdir))
    else:
        archive = Path(source)
        if archive.is_dir():
            return archive.resolve()
        if not archive.is_file():
            raise ArtifactError(f"{source}: no such model directory or model.tar.gz")
    target = Path(tempfile.mkdtemp(prefix="model-", dir=workdir))
    try:
        safe_extract(archive, target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def safe_extract(archive: str | Path, target: str | Path) -> None:
    """Unpack a tar archive with tarfile's "data" filter: a member that would land outside ``target`` (`..`, a
    link pointing out of it) or is a device refuses the whole archive before anything is written; absolute
    names are taken as relative to ``target``."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                # The "data" filter raises for members that would escape; check them all before writing one.
                tarfile.data_filter(member, str(target))
            tar.extractall(target, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise ArtifactError(f"{archive}: unsafe member refused: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArtifactError(f"{archive}: not a readable tar archive: {exc}") from None


def _download(uri: str, workdir: Path) -> Path:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ArtifactError(f"{uri}: not an s3://bucket/key URI")
    local = Path(tempfile.mkdtemp(prefix="download-", dir=workdir)) / "model.tar.gz"
    try:
        boto3.client("s3").download_file(bucket, key, str(local))
    except Exception as exc:  # no credentials, no such key, S3 unreachable: boto3 and botocore raise them all
        raise ArtifactError(f"{uri}: cannot download the model artifact: {exc}") from exc
    return local


def load_handler(model_dir: str | Path) -> ModuleType:
    """Import ``code/inference.py`` of a model directory with ``code/`` on sys.path, as the SageMaker container
    does, so that the handler imports the model definitions packed beside it."""
    code_dir = Path(model_dir) / "code"
    path = code_dir / HANDLER
    if not path.is_file():
        raise ArtifactError(f"{model_dir}: the artifact has no code/{HANDLER}")
    sys.path.insert(0, str(code_dir))
    # A handler's siblings (predictor.py, models.py, ...) must come from its own artifact, not from one imported before.
    for sibling in code_dir.glob("*.py"):
        if sibling.name != HANDLER:
            sys.modules.pop(sibling.stem, None)
    spec = importlib.util.spec_from_file_location("sagemaker_model_handler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in HANDLER_FUNCTIONS if not callable(getattr(module, name, None))]
    if missing:
        raise ArtifactError(f"{path}: missing handler function(s) {', '.join(missing)}")
    return module
