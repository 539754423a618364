"""The SageMaker handlers (inference/inference.py) and the modules beside them, imported from a trained artifact's
code/ as the container does."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.artifact import load_handler
from tests.helpers.endpoints import npy_claiming, npy_fields

pytest_plugins = ["tests.helpers.model_artifact"]  # the model_dir, model_tarball and test_set fixtures


@pytest.fixture(scope="module")
def handler(model_dir):
    return load_handler(model_dir)


@pytest.fixture(scope="module")
def predictor(handler):
    """The artifact's own predictor module (the model wrapper), imported beside its handler."""
    return handler.predictor


@pytest.fixture(scope="module")
def decoding(handler):
    """The artifact's own request decoders, imported beside its handler."""
    return handler.decoding


@pytest.fixture(scope="module")
def json_fast(handler):
    """The artifact's own JSON fast path, imported beside its handler."""
    return handler.json_fast


@pytest.fixture(scope="module")
def model(handler, model_dir):
    return handler.model_fn(str(model_dir))


def npy(array: np.ndarray) -> bytes:
    """An application/x-npy body (pickled, as np.save writes it, only for an object array)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def predict(handler, model, body, content_type="application/json", accept="application/json") -> list[dict]:
    data = handler.input_fn(body, content_type)
    payload, content_type = handler.output_fn(handler.predict_fn(data, model), accept)
    assert content_type == "application/json"
    return json.loads(payload)["predictions"]


def labels_of(predictions: list[dict]) -> list[int]:
    return [p["label"] for p in predictions]


def test_model_fn_rebuilds_the_trained_network_and_classifies_the_test_set(handler, model, test_set):
    images, labels = test_set
    predictions = predict(handler, model, json.dumps({"instances": images.tolist()}))
    assert len(predictions) == len(images)
    assert np.mean(np.array(labels_of(predictions)) == labels) >= 0.95
    for prediction in predictions:
        probabilities = prediction["probabilities"]
        assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-4
        assert prediction["label"] == int(np.argmax(probabilities))


def test_every_content_type_and_layout_gives_the_same_answer(handler, model, test_set):
    images = test_set[0][:5]
    expected = predict(handler, model, json.dumps({"instances": images.tolist()}))
    csv = "\n".join(",".join(map(str, image.ravel())) for image in images)
    bodies = {
        "json, 784 values each": ("application/json", json.dumps({"instances": images.reshape(5, 784).tolist()})),
        "json, 1x28x28 floats": ("application/json", json.dumps({"instances": images[:, None].astype(float).tolist()})),
        "json bytes with charset": (
            "application/json; charset=utf-8",
            json.dumps({"instances": images.tolist()}).encode(),
        ),
        "npy uint8 batch": ("application/x-npy", npy(images)),
        "npy float32 flat batch": ("application/x-npy", npy(images.reshape(5, 784).astype(np.float32))),
        "csv": ("text/csv", csv),
        "csv bytes": ("text/csv", csv.encode() + b"\n"),
    }
    for name, (content_type, body) in bodies.items():
        answer = predict(handler, model, body, content_type)
        assert labels_of(answer) == labels_of(expected), name
        np.testing.assert_allclose(
            [p["probabilities"] for p in answer], [p["probabilities"] for p in expected], atol=1e-5, err_msg=name
        )
    single = predict(handler, model, npy(images[0]), "application/x-npy")
    assert labels_of(single) == labels_of(expected)[:1]


def test_traced_variants_agree_with_the_eager_model(predictor, model, test_set):
    import torch

    pixels = torch.from_numpy(test_set[0][:64].astype(np.float32)).unsqueeze(1)
    pixels = pixels.repeat(predictor.CPU_PART // 64 + 1, 1, 1, 1)  # more than one part
    with torch.inference_mode():
        expected = model.classifier(pixels)
        # Both sides of the size from which the large variant runs, measured when the model loaded.
        assert 1 <= model.large_from <= predictor.CALIBRATION_SIZES[-1] + 1
        for size in (1, model.large_from - 1, model.large_from, 64, len(pixels)):
            if size:
                torch.testing.assert_close(model(pixels[:size]), expected[:size], atol=1e-5, rtol=1e-4)
    # Tracing succeeded for seed_cnn: the speed of the endpoint depends on it.
    assert isinstance(model.small, torch.jit.ScriptModule) and isinstance(model.large, torch.jit.ScriptModule)


def test_pooling_is_rewritten_where_it_is_a_plain_2x2_max_pool(predictor):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.wide = nn.MaxPool2d(2), nn.MaxPool2d(3)

        def forward(self, x):
            return [
                F.max_pool2d(x, 2),
                F.max_pool2d(x, kernel_size=(2, 2), stride=2),
                self.plain(x),
                self.wide(x),
                F.max_pool2d(x, 2, stride=1),
                F.max_pool2d(x, 2, ceil_mode=True),
            ]

    rewritten = predictor._with_fast_pooling(Pools())
    targets = [node.target for node in rewritten.graph.nodes if node.op in ("call_function", "call_module")]
    assert targets[:3] == [predictor._max_pool_2x2] * 3 and predictor._max_pool_2x2 not in targets[3:]
    for size in (24, 7):  # an odd side: max_pool2d drops the last row and column
        maps = torch.randn(3, 4, size, size)
        for fast, expected in zip(rewritten(maps), Pools()(maps), strict=True):
            assert torch.equal(fast, expected)


@pytest.mark.parametrize(
    ("architecture", "kwargs"), [("seed_cnn", {}), ("bn_cnn", {"hidden_channels": 4}), ("mlp", {})]
)
def test_every_architecture_is_traced_and_agrees(predictor, architecture, kwargs):
    import torch

    torch.manual_seed(0)
    network = predictor.build_model(architecture, **kwargs)
    network.train()(torch.rand(64, 1, 28, 28))  # BatchNorm statistics that are not the identity
    served = predictor.Predictor(
        predictor.MnistClassifier(network.eval(), **predictor.DEFAULT_NORMALIZATION), torch.device("cpu")
    )
    assert isinstance(served.small, torch.jit.ScriptModule) and isinstance(served.large, torch.jit.ScriptModule)
    pixels = torch.rand(16, 1, 28, 28) * 255
    with torch.inference_mode():
        for size in (1, 16):
            torch.testing.assert_close(served(pixels[:size]), served.classifier(pixels[:size]))


@pytest.mark.parametrize("architecture", ["seed_cnn", "bn_cnn"])
def test_in_bfloat16_large_batches_give_the_float32_labels_and_nearly_its_probabilities(
    handler, predictor, model_dir, test_set, monkeypatch, architecture
):
    import torch

    if architecture == "bn_cnn":  # the accurate preset's network, its BatchNorm folded into the convolutions
        torch.manual_seed(0)
        network = predictor.build_model("bn_cnn", hidden_channels=4)
        network.train()(torch.rand(64, 1, 28, 28))
        exact = predictor.Predictor(
            predictor.MnistClassifier(network.eval(), **predictor.DEFAULT_NORMALIZATION), torch.device("cpu")
        )
        fast = predictor.Predictor(exact.classifier, torch.device("cpu"), "bfloat16")
    else:  # the trained artifact, loaded as a model server does with the setting in its environment
        exact = handler.model_fn(str(model_dir))
        monkeypatch.setenv(predictor.PRECISION_VARIABLE, "bfloat16")
        fast = handler.model_fn(str(model_dir))
    assert fast.precision == ("bfloat16" if predictor.bfloat16_native() else "float32")
    assert isinstance(fast.large, torch.jit.ScriptModule) and isinstance(fast.small, torch.jit.ScriptModule)
    pixels = torch.from_numpy(test_set[0].astype(np.float32)).unsqueeze(1)
    with torch.inference_mode():
        expected, answered = exact(pixels), fast(pixels)
        # A single image runs the float32 small variant either way.
        torch.testing.assert_close(fast(pixels[:1]), expected[:1], atol=1e-5, rtol=1e-4)
    assert answered.dtype == torch.float32 and answered.shape == expected.shape
    assert (answered - expected).abs().max() <= predictor.BFLOAT16_TOLERANCE
    assert torch.equal(answered, expected) == (fast.precision == "float32"), "bfloat16 arithmetic where asked"
    margin = expected.topk(2).values.diff(dim=1).abs().squeeze(1)  # a label may flip only where two are close
    flipped = answered.argmax(1) != expected.argmax(1)
    assert (margin[flipped] <= 2 * predictor.BFLOAT16_TOLERANCE).all()
    if architecture == "seed_cnn":
        assert flipped.sum() == 0, "the trained model's labels"


def test_a_bfloat16_variant_off_the_float32_model_is_not_served(predictor, model, monkeypatch):
    import torch

    if not predictor.bfloat16_native():
        pytest.skip("this CPU computes no bfloat16: float32 is served anyway")
    monkeypatch.setattr(predictor, "BFLOAT16_TOLERANCE", 0.0)  # no bfloat16 answer is that close
    served = predictor.Predictor(model.classifier, torch.device("cpu"), "bfloat16")
    assert served.precision == "float32" and served.large is model.classifier


def test_an_unknown_precision_is_refused_naming_the_setting(handler, predictor, model_dir, monkeypatch):
    monkeypatch.setenv(predictor.PRECISION_VARIABLE, "float16")
    with pytest.raises(ValueError, match=r"MNIST_INFERENCE_PRECISION='float16': use one of float32, bfloat16"):
        handler.model_fn(str(model_dir))


def test_the_pipeline_names_the_precision_setting_as_the_handler_reads_it(predictor):
    from tasks import names

    assert (names.PRECISION_VARIABLE, names.PRECISIONS) == (predictor.PRECISION_VARIABLE, predictor.PRECISIONS)


def test_the_handler_normalizes_by_default_as_training_does(predictor):
    from training.engine import MEAN, STD

    assert predictor.DEFAULT_NORMALIZATION == {"mean": MEAN, "std": STD}


def drawn_digit(label: int, seed: int, size: tuple[int, int], mode: str) -> Image.Image:
    """A synthetic digit drawn with dark ink on light paper, much larger than 28x28, away from the centre."""
    from tests.helpers.synthetic_mnist import render_digit

    glyph = Image.fromarray(render_digit(label, np.random.default_rng(seed)))
    bbox = glyph.getbbox()
    ink = glyph.crop(bbox).resize(((bbox[2] - bbox[0]) * 9, (bbox[3] - bbox[1]) * 9), Image.Resampling.BILINEAR)
    if mode == "RGBA":  # a drawing app's export: ink on a transparent background
        paper = Image.new("RGBA", size, (0, 0, 0, 0))
        paper.paste((20, 20, 60, 255), (40, 30), mask=ink)
    else:
        paper = Image.new("RGB", size, (236, 230, 214))  # cream paper, blue-black ink
        paper.paste((30, 30, 80), (size[0] - ink.width - 60, 50), mask=ink)
    return paper


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **({"quality": 85} if image_format == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize(("image_format", "mode"), [("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "RGB")])
def test_pictures_of_digits_are_converted_the_mnist_way_and_classified(handler, model, image_format, mode):
    content_type = f"image/{image_format.lower()}"
    for label in range(10):
        body = encoded(drawn_digit(label, seed=100 + label, size=(400, 330), mode=mode), image_format)
        [prediction] = predict(handler, model, body, content_type)
        assert prediction["label"] == label, f"{image_format} {mode} of a {label}"


def test_mnist_normalize_crops_scales_and_centres_by_mass(decoding):
    grey = np.full((300, 500), 250.0, dtype=np.float32)
    grey[40:240, 350:400] = 10  # a dark bar, 200 x 50, far from the centre
    pixels = decoding.mnist_normalize(grey)
    assert pixels.shape == (28, 28) and pixels.dtype == np.float32
    assert pixels.min() == 0 and pixels.max() == pytest.approx(255)
    rows, cols = np.nonzero(pixels)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 5  # aspect ratio kept
    total = pixels.sum()
    centre = (pixels.sum(1) @ np.arange(28) / total + 0.5, pixels.sum(0) @ np.arange(28) / total + 0.5)
    assert centre == pytest.approx((14, 14), abs=0.5)
    inverted = decoding.mnist_normalize(255 - grey)  # light ink on dark: used as it is
    np.testing.assert_allclose(inverted, pixels, atol=1e-3)


class Trap:
    """Unpickling it creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_object_npy_is_refused_without_being_unpickled(handler, decoding, tmp_path):
    marker = tmp_path / "unpickled"
    body = npy(np.array([Trap(marker)], dtype=object))  # np.load(..., allow_pickle=True) would create the marker
    with pytest.raises(decoding.InvalidRequest, match="allow_pickle") as error:
        handler.input_fn(body, "application/x-npy")
    assert error.value.status_code == 400
    assert not marker.exists()


def test_model_fn_loads_weights_without_unpickling_objects(handler, model_dir, tmp_path):
    import torch

    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    torch.save({"conv1.weight": Trap(marker)}, evil / "model.pth")  # torch.load(...) unrestricted would run it
    with pytest.raises(ValueError, match="not a state_dict of tensors") as error:
        handler.model_fn(str(evil))
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def png_header_claiming(width: int, height: int) -> bytes:
    """The first bytes of a PNG that declares a huge size (decoding it would need gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    )


def blank_png() -> bytes:
    return encoded(Image.new("RGB", (64, 64), "white"), "PNG")


def truncated_png() -> bytes:
    body = encoded(drawn_digit(3, seed=1, size=(200, 200), mode="RGB"), "PNG")
    return body[: len(body) // 2]


ZEROS = [0] * 784
BAD_REQUESTS = {
    "malformed JSON": ("application/json", b'{"instances": [[1, 2,', "malformed JSON"),
    "JSON nested 100,000 deep": (
        "application/json",
        b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "malformed JSON",
    ),
    "JSON not an object": ("application/json", b"[[1, 2]]", '{"instances"'),
    "JSON without instances": ("application/json", b'{"images": []}', '{"instances"'),
    "instances not a list": ("application/json", b'{"instances": 5}', "must be a list of images"),
    "empty instances": ("application/json", b'{"instances": []}', "no images"),
    "wrong image size": ("application/json", json.dumps({"instances": [[1, 2, 3]]}), "28x28 or 784"),
    "one image not in a list": ("application/json", json.dumps({"instances": ZEROS}), "28x28 or 784"),
    "images of two sizes": ("application/json", json.dumps({"instances": [ZEROS, ZEROS[:-1]]}), "one shape"),
    "strings": ("application/json", json.dumps({"instances": [["0"] * 784]}), "strings"),
    "booleans": ("application/json", json.dumps({"instances": [[True] * 784]}), "true/false"),
    "null": ("application/json", json.dumps({"instances": [[None, *ZEROS[1:]]]}), "null"),
    "NaN": ("application/json", '{"instances": [[NaN' + ", 0" * 783 + "]]}", "NaN or infinity"),
    "Infinity": ("application/json", '{"instances": [[-Infinity' + ", 0" * 783 + "]]}", "NaN or infinity"),
    "overflowing float": ("application/json", '{"instances": [[1e999' + ", 0" * 783 + "]]}", "NaN or infinity"),
    "negative pixel": ("application/json", json.dumps({"instances": [[-1, *ZEROS[1:]]]}), "within 0-255"),
    "pixel above 255": ("application/json", json.dumps({"instances": [[256, *ZEROS[1:]]]}), "within 0-255"),
    "empty body": ("application/json", b"", "empty request body"),
    "not an npy": ("application/x-npy", b"\x93NUMPY garbage", "not a numeric .npy"),
    "truncated npy": ("application/x-npy", npy(np.zeros((2, 28, 28), np.uint8))[:-10], "not a numeric .npy"),
    "npy of the wrong shape": ("application/x-npy", npy(np.zeros((3, 5))), "28x28 or 784"),
    "complex npy": ("application/x-npy", npy(np.zeros((1, 784), complex)), "complex"),
    "npy with NaN": ("application/x-npy", npy(np.full((1, 784), np.nan)), "NaN or infinity"),
    # The header alone must never decide what is allocated: 10^12 float64s declared in 128 bytes.
    "npy declaring 10^12 elements": (
        "application/x-npy",
        npy_claiming(npy_fields(shape=(10**12,))),
        "declares shape [1000000000000] of float64",
    ),
    "npy declaring more than it holds": (
        "application/x-npy",
        npy_claiming(npy_fields("|u1", (2, 784)), bytes(784)),
        "its body holds 784",
    ),
    "npy holding more than it declares": (
        "application/x-npy",
        npy_claiming(npy_fields("|u1", (1, 784)), bytes(785)),
        "its body holds 785",
    ),
    "npy of negative dimensions": (
        "application/x-npy",
        npy_claiming(npy_fields("|u1", (-1, -784)), bytes(784)),
        "declares shape [-1, -784]",
    ),
    "npy of zero-size items": ("application/x-npy", npy_claiming(npy_fields("|V0", (10**12,))), "found dtype |V0"),
    "npy of records": ("application/x-npy", npy_claiming(npy_fields([("a", "<f4")], (784,)), bytes(3136)), "found"),
    "npy of strings": ("application/x-npy", npy(np.array([["0"] * 784])), "found strings"),
    "npy shape not integers": ("application/x-npy", npy_claiming(npy_fields(shape=(2.5,))), "not a numeric .npy"),
    "npy of an unknown version": (
        "application/x-npy",
        npy_claiming(npy_fields(), bytes(6272), b"\x03\x00"),
        "format version (3, 0)",
    ),
    "npy header of a megabyte": (
        "application/x-npy",
        b"\x93NUMPY\x02\x00" + struct.pack("<I", 10**6) + b"[" * 10**6,
        "not a numeric .npy",
    ),
    "CSV of the wrong width": ("text/csv", "1,2,3\n", "28x28 or 784"),
    "CSV with ragged rows": ("text/csv", ",".join(["0"] * 784) + "\n1,2\n", "CSV must hold"),
    "CSV not numbers": ("text/csv", "a,b,c\n", "CSV must hold"),
    "CSV without rows": ("text/csv", "\n\n", "no images"),
    "CSV not UTF-8": ("text/csv", b"\xff\xfe1,2", "CSV must hold"),
    "not an image": ("image/png", b"this is not a picture", "not a PNG or JPEG"),
    "truncated image": ("image/png", truncated_png(), "could not decode"),
    "blank image": ("image/png", blank_png(), "no digit found"),
    "image too large": ("image/png", png_header_claiming(8_000, 8_000), "too large"),
    "image just above the cap": ("image/png", png_header_claiming(4_000, 3_001), "4000x3001 pixels is too large"),
    # At the cap the picture is decoded, and this one is damaged.
    "image at the cap": ("image/png", png_header_claiming(4_000, 3_000), "could not decode"),
    "decompression bomb": ("image/png", png_header_claiming(60_000, 60_000), "too large"),
    "unsupported content type": ("text/plain", b"7", "unsupported content type"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_is_a_client_error_naming_the_problem(handler, decoding, case):
    content_type, body, expected = BAD_REQUESTS[case]
    with pytest.raises(decoding.InvalidRequest) as error:
        handler.input_fn(body, content_type)
    assert expected in error.value.message
    assert error.value.status_code == (415 if case == "unsupported content type" else 400)
    # The shape of the SageMaker toolkit's BaseInferenceToolkitError, which its container answers with.
    assert error.value.phrase and str(error.value) == error.value.message


def test_an_answer_in_another_format_than_json_is_refused(handler, decoding, model):
    prediction = handler.predict_fn(handler.input_fn(npy(np.zeros((1, 784), np.uint8)), "application/x-npy"), model)
    assert handler.output_fn(prediction, "*/*")[1] == "application/json"
    with pytest.raises(decoding.InvalidRequest) as error:
        handler.output_fn(prediction, "text/csv")
    assert error.value.status_code == 406


def _random_json_bodies(count: int, seed: int = 1):
    """JSON bodies near the fast path's edge: nested arrays of integers, other numbers and values, ragged and
    empty lists, other keys, whitespace, and broken syntax."""
    rng = np.random.default_rng(seed)
    leaves = ["0", "7", "255", "256", "01", "-1", "1.5", "1e2", '"a"', '"["', "null", "true", "1000", "[3]", "{}"]

    def array(depth: int) -> str:
        if depth == 0:
            return str(rng.choice(leaves)) if rng.random() < 0.3 else str(rng.integers(0, 256))
        items = [
            array(depth - 1 if rng.random() < 0.95 else int(rng.integers(0, depth + 1)))
            for _ in range(int(rng.choice([0, 1, 2, 3])))
        ]
        space = str(rng.choice(["", " ", "\n"]))
        return "[" + space + ("," + space).join(items) + space + "]"

    breakages = [
        lambda s: s,
        lambda s: s.replace(",", ",,", 1),
        lambda s: s.replace(",", "", 1),
        lambda s: s + "]",
        lambda s: s[:-1],
        lambda s: s.replace("7", "7 7", 1),
        lambda s: s.replace("]", ",]", 1),
    ]
    wrappers = [
        '{"instances": %s}',
        ' {\n"instances" :%s}\n',
        '{"instances": %s, "x": 1}',
        '{"x": 1, "instances": %s}',
        "[%s]",
        '{"instances": %s}{}',
    ]
    for _ in range(count):
        inner = array(int(rng.integers(1, 6)))
        inner = breakages[int(rng.integers(len(breakages)))](inner) if rng.random() < 0.5 else inner
        yield (wrappers[int(rng.integers(len(wrappers)))] % inner).encode()


@pytest.mark.parametrize("parts", [1, 3])
def test_the_fast_json_path_reads_exactly_what_json_reads_or_leaves_it_to_the_general_path(json_fast, parts):
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28))
    for instances in (images, images.reshape(50, 784), images[:, np.newaxis], images[:1]):
        for separators in ((", ", ": "), (",", ":")):
            body = json.dumps({"instances": instances.tolist()}, separators=separators).encode()
            fast = json_fast.integer_pixels(body, parts)
            assert fast is not None and fast.dtype == np.uint8 and fast.shape == instances.shape
            assert (fast == instances).all()
    taken = 0
    for body in _random_json_bodies(20_000):
        fast = json_fast.integer_pixels(body, parts)  # split in up to 3 parts where the array has elements
        try:
            document = json.loads(body)
            values = np.array(document["instances"])
            readable = (
                list(document) == ["instances"]
                and values.dtype.kind == "i"
                and values.size > 0
                and values.min() >= 0
                and values.max() <= 255
            )
        except (ValueError, KeyError, TypeError):
            readable = False
        if fast is not None:  # taken: it must be exactly what the JSON says
            taken += 1
            assert readable and fast.shape == values.shape and (fast == values).all(), body
        elif readable:  # left to the general path: only integers mixed with true/false may be
            assert b"true" in body, body
    assert taken > 100


# Regular arrays with one place that is not a JSON integer 0-255, or not a number at all.
NEAR_MISSES = [
    '[[1, "7", 3]]',
    "[[1, +7, 3]]",
    "[[1, 07, 3]]",
    "[[1, 1100, 3]]",
    "[[1, 256, 3]]",
    "[[1, -7, 3]]",
    "[[1, 7.0, 3]]",
    "[[1, 7e0, 3]]",
    "[[1,\x017, 3]]",
    "[[1,\f7, 3]]",
    "[[1, true, 3]]",
    "[[1, [7], 3]]",
    "[[1, 7 3]]",
    "[[,,,]]",
    "[[1,,,1234]]",
    "[[1, 007, 3]]",
    "[[1, 7, 3],]",
    "[[1, 7, 3]]]",
    "[[1, 7, 3]",
    "[[1, 7, 3]] x",
]


@pytest.mark.parametrize("parts", [1, 3])
def test_the_fast_json_path_leaves_near_misses_to_the_general_path(json_fast, parts):
    assert json_fast.integer_pixels(b'{"instances": [[1, 7, 3]]}', parts).tolist() == [[1, 7, 3]]
    for instances in NEAR_MISSES:
        assert json_fast.integer_pixels(f'{{"instances": {instances}}}'.encode(), parts) is None, instances


def test_a_large_json_batch_is_read_in_parts_with_the_same_result(handler, decoding, json_fast):
    images = np.random.default_rng(0).integers(0, 256, (400, 28, 28))
    body = json.dumps({"instances": images.tolist()}).encode()
    assert len(body) > json_fast.PARALLEL_JSON_BYTES
    spans = json_fast._parts(body, body.index(b"[") + 1, body.rindex(b"]"), 4)
    assert len(spans) == 4 and all(body[end : end + 2] == b", " for _, end in spans[:-1])
    np.testing.assert_array_equal(json_fast.integer_pixels(body), images)
    np.testing.assert_array_equal(handler.input_fn(body, "application/json").numpy()[:, 0], images)
    # One ragged image in the second half: no part reads it as an image, and the general path names the problem.
    rows = images.tolist()
    rows[300][5].append(7)
    assert json_fast.integer_pixels(json.dumps({"instances": rows}).encode()) is None
    with pytest.raises(decoding.InvalidRequest, match="one shape"):
        handler.input_fn(json.dumps({"instances": rows}), "application/json")
