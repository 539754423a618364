"""`mnist-pipeline predict`: bad input is refused before anything is sent (the happy path runs in test_stack)."""

import pytest

from tasks.config import load_config
from tasks.predict import PredictError, predict


def test_only_pictures_are_sent(tmp_path):
    text = tmp_path / "digit.png"
    text.write_text("not a picture")
    with pytest.raises(PredictError, match=r"digit\.png is not a PNG or JPEG picture"):
        predict([text], "mnist-classifier", load_config())
    with pytest.raises(PredictError, match=r"cannot read .*missing\.png"):
        predict([tmp_path / "missing.png"], "mnist-classifier", load_config())


def test_an_unknown_endpoint_is_named(local_sagemaker, tmp_path):
    from PIL import Image

    picture = tmp_path / "seven.png"
    Image.new("L", (28, 28)).save(picture)
    with pytest.raises(PredictError, match="no endpoint 'nowhere'; endpoints: "):
        predict([picture], "nowhere", load_config())
