"""The shared pieces every layer stands on: IDX files, the configuration, the local AWS and process records."""

import contextlib
import gzip
import os
import re
import signal

import boto3
import numpy as np
import psutil
import pytest

from local_sagemaker import processes
from tasks.config import load_config
from training.mnist_idx import MNIST_FILES, IdxFormatError, load_mnist, read_idx, write_idx


def test_small_mnist_round_trips(small_mnist):
    arrays = load_mnist(small_mnist)
    assert arrays["train_images"].shape == (600, 28, 28)
    assert arrays["test_labels"].shape == (100,)
    assert set(np.unique(arrays["train_labels"])) == set(range(10))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(10), "body has 10 bytes"),
        (bytes([1, 2, 8, 3]) + bytes(100), "bad magic number"),
        (bytes([0, 0, 8]), "too short"),
    ],
)
def test_malformed_idx_names_the_file(tmp_path, payload, message):
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(IdxFormatError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_truncated_gzip(tmp_path, small_mnist):
    data = (small_mnist / MNIST_FILES["train_images"]).read_bytes()
    (tmp_path / MNIST_FILES["train_images"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxFormatError, match="not a complete gzip stream"):
        read_idx(tmp_path / MNIST_FILES["train_images"])


def test_missing_file(tmp_path):
    with pytest.raises(IdxFormatError, match="file not found"):
        load_mnist(tmp_path / "empty")


def test_labels_that_disagree_with_images(tmp_path, small_mnist):
    arrays = load_mnist(small_mnist)
    for role, name in MNIST_FILES.items():
        write_idx(tmp_path / name, arrays[role][:-1] if role == "test_labels" else arrays[role])
    with pytest.raises(IdxFormatError, match=r"100 images but .* has 99 labels"):
        load_mnist(tmp_path)


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("MNIST_PIPELINE_LOCAL_CPUS", "3")
    monkeypatch.setenv("MNIST_PIPELINE_AWS_CONN_ID", "aws_prod")
    config = load_config(bucket="b")
    assert (config.aws_conn_id, config.cpus, config.s3_root) == ("aws_prod", 3, "s3://b/mnist-sweep")
    with pytest.raises(ValueError, match="bucket must not be empty"):
        load_config(bucket="")


def test_the_variable_is_read_and_a_bad_one_is_an_error_naming_it(monkeypatch):
    """The Airflow Variable `mnist_pipeline` (here by Airflow's own AIRFLOW_VAR_ environment): its settings count;
    malformed, not an object, naming a setting that does not exist or a bad number, it stops the run, never
    falling back to the defaults."""
    import airflow.sdk  # noqa: F401 - load_config asks Airflow only in a process that has it

    from tasks.config import ConfigError

    for key in ("MNIST_PIPELINE_BUCKET", "MNIST_PIPELINE_LOCAL_CPUS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_MNIST_PIPELINE", '{"bucket": "from-the-variable", "local_cpus": 5}')
    config = load_config()
    assert (config.bucket, config.local_cpus) == ("from-the-variable", 5)
    monkeypatch.setenv("MNIST_PIPELINE_BUCKET", "from-the-environment")  # the environment wins
    assert load_config().bucket == "from-the-environment"
    for value, message in (
        ('{"bucket": "b",', "the Airflow Variable mnist_pipeline is not JSON"),
        ('["bucket"]', "must be a JSON object of settings, got list"),
        ('{"buckett": "typo"}', "names unknown settings: buckett"),
        (
            '{"local_cpus": "many"}',
            "the Airflow Variable mnist_pipeline's local_cpus must be a whole number, got 'many'",
        ),
    ):
        monkeypatch.setenv("AIRFLOW_VAR_MNIST_PIPELINE", value)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config()
    monkeypatch.delenv("AIRFLOW_VAR_MNIST_PIPELINE")
    monkeypatch.setenv("MNIST_PIPELINE_LOCAL_CPUS", "2.5")
    with pytest.raises(ConfigError, match=re.escape("MNIST_PIPELINE_LOCAL_CPUS must be a whole number, got '2.5'")):
        load_config()


def test_local_aws_is_a_real_s3(local_aws):
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket="foundation")
    s3.put_object(Bucket="foundation", Key="k", Body=b"v")
    assert s3.get_object(Bucket="foundation", Key="k")["Body"].read() == b"v"


def test_stop_ends_what_outlived_a_dead_group_leader_even_an_unreaped_one():
    """A group leader killed while its children run (a SIGKILLed scheduler and its executor workers): stop() ends
    them through the dead leader's record, also while the leader is a zombie its parent has not reaped yet."""
    leader, record = processes.spawn(["bash", "-c", "sleep 300 & sleep 300 & wait"], env=processes.allowed_env())
    assert processes.wait_until(lambda: len(psutil.Process(leader.pid).children()) == 2, 10)
    members = psutil.Process(leader.pid).children()
    os.kill(leader.pid, signal.SIGKILL)
    assert processes.wait_until(lambda: psutil.Process(leader.pid).status() == psutil.STATUS_ZOMBIE, 10)
    assert processes.live(record) is None
    try:
        processes.stop([record], grace=5)
        _, alive = psutil.wait_procs(members, timeout=5)
        assert alive == [], "the dead leader's children are stopped"
    finally:
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        leader.wait()


def test_state_files_are_replaced_whole_and_secrets_are_never_readable_by_others(tmp_path):
    """The stack's secrets, its stack.json and the service's records: the old file or the new one, nothing between,
    and no temporary file left, whether the write succeeds or fails."""
    import json
    import stat

    from cli.local_aws import write_private
    from cli.stack import StackPaths, read_state, write_state
    from local_sagemaker.store import write_atomically

    secret = tmp_path / "stack" / "credentials.json"
    write_private(secret, {"key": "first"})
    write_private(secret, {"key": "second"})
    assert json.loads(secret.read_text()) == {"key": "second"}
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(TypeError):
        write_private(secret, {"key": object()})  # fails before anything is written
    assert json.loads(secret.read_text()) == {"key": "second"}

    paths = StackPaths(tmp_path)
    write_state(paths, {"processes": {}})
    assert read_state(paths) == {"processes": {}}

    record = tmp_path / "records" / "job.json"
    record.mkdir(parents=True)  # a directory where the file should go: the rename fails
    with pytest.raises(OSError):
        write_atomically(record, b"{}")
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == ["credentials.json", "stack.json"]


def test_a_damaged_file_of_the_stack_is_set_aside_and_made_anew(tmp_path, capsys, monkeypatch):
    """stack.json, the password, secrets and keys files, torn or damaged: `up` sets each aside (renamed, never
    deleted), says so, and makes it anew; `status` names what was set aside, the service's records included."""
    import json

    from cli.stack import USERNAME, StackPaths, _login_and_secrets, read_state, stack_keys, status_command

    paths = StackPaths(tmp_path)
    damaged = {
        paths.state: b'{"processes": {"local-aws": {"pid": 12',  # torn by a power cut
        paths.passwords: b"",
        paths.secrets: b'{"jwt_secret": "kept"}',  # no secret_key
        paths.credentials: b"\0" * 16,
    }
    paths.root.mkdir(parents=True)
    for path, content in damaged.items():
        path.write_bytes(content)
    record = tmp_path / "sagemaker" / "training-jobs" / "torn.json.unreadable-20261207T000000.000000Z"
    record.parent.mkdir(parents=True)
    record.write_bytes(b"{")

    assert read_state(paths) is None
    password, signing = _login_and_secrets(paths)
    keys = stack_keys(paths)
    told = capsys.readouterr().err
    assert json.loads(paths.passwords.read_text()) == {USERNAME: password}
    assert json.loads(paths.secrets.read_text()) == signing and set(signing) == {"jwt_secret", "secret_key"}
    assert keys.pipeline.access_key_id.startswith("AKIA")
    for path, content in damaged.items():
        [aside] = path.parent.glob(f"{path.name}.unreadable-*")
        assert aside.read_bytes() == content
        assert f"{path} cannot be read" in told
    monkeypatch.setenv("MNIST_PIPELINE_STATE_DIR", str(tmp_path))
    assert status_command(None) == 3  # not running: stack.json was set aside
    shown = capsys.readouterr().out
    assert "torn.json.unreadable-" in shown and "stack.json.unreadable-" in shown
