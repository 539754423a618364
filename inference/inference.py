"""SageMaker PyTorch inference handlers for the MNIST classifier: `model_fn`, `input_fn`, `predict_fn`, `output_fn`.

This file ships inside model.tar.gz as `code/inference.py`, next to the modules it imports (`code/predictor.py`,
`code/decoding.py`, `code/json_fast.py`, and `code/models.py` from training); the SageMaker PyTorch container and
the local server (`python -m inference.serve`) both import it from there, with `code/` on sys.path. It needs only
torch, numpy and Pillow, which the SageMaker PyTorch inference image already has.

Requests (one or more images of raw MNIST pixels, 0-255, white ink on black):
- `application/json`: `{"instances": [image, ...]}`, each image 28x28 nested lists or 784 numbers.
- `application/x-npy`: a numeric .npy array of one image or a batch (never unpickled).
- `text/csv`: one image per row, 784 values.
- `image/png`, `image/jpeg`: a picture of one digit, any size and colour, converted the way MNIST was made.
Response (`application/json`): `{"predictions": [{"label": 7, "probabilities": [10 floats]}, ...]}`.

Bad input raises `decoding.InvalidRequest`, which carries a 4xx status code: the SageMaker toolkit answers an
exception derived from its `BaseInferenceToolkitError` with that code, and so does the local server.
"""

from __future__ import annotations

import http

import numpy as np
import torch

if __package__:  # imported from the repository, as inference.inference
    from inference import decoding, json_fast, predictor
else:  # in the artifact's code/, which the inference toolkit puts on sys.path: these modules sit beside this file
    import decoding
    import json_fast
    import predictor


def model_fn(model_dir: str) -> predictor.Predictor:
    """Rebuild the network from model_config.json and load model.pth, without unpickling anything."""
    return predictor.load(model_dir)


def input_fn(request_body: bytes | str, content_type: str) -> torch.Tensor:
    """Decode a request into a float tensor (N, 1, 28, 28) of raw pixel values 0-255."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in decoding.CONTENT_TYPES:
        raise decoding.InvalidRequest(
            f"unsupported content type {content_type!r}; send one of {', '.join(decoding.CONTENT_TYPES)}",
            http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    if not request_body:
        raise decoding.InvalidRequest("empty request body")
    try:
        if media_type == decoding.JSON:
            batch = decoding.json_pixels(request_body)
        elif media_type == decoding.NPY:
            batch = decoding.npy_pixels(request_body)
        elif media_type == decoding.CSV:
            batch = decoding.csv_pixels(request_body)
        else:
            batch = decoding.image_pixels(request_body)[np.newaxis]
        return torch.from_numpy(decoding.checked_batch(batch))
    # Each decoder refuses what it knows to be wrong, naming it; what a library may still raise on a body built to
    # exhaust it is the sender's too, and must never count as the endpoint failing (a 5xx).
    except MemoryError:
        raise decoding.InvalidRequest(
            f"the {media_type} body is too large to decode", http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        ) from None
    except RecursionError:
        raise decoding.InvalidRequest(f"the {media_type} body is nested too deeply to decode") from None


def predict_fn(data: torch.Tensor, model: predictor.Predictor) -> torch.Tensor:
    """Class probabilities (N, 10), on the CPU."""
    with torch.inference_mode():
        return model(data)


def output_fn(prediction: torch.Tensor, accept: str | None) -> tuple[bytes, str]:
    """Serialize the probabilities and the predicted digit of each image as JSON."""
    if accept and not any(kind in accept for kind in (decoding.JSON, "*/*")):
        raise decoding.InvalidRequest(
            f"cannot answer in {accept!r}; accept {decoding.JSON}", http.HTTPStatus.NOT_ACCEPTABLE
        )
    labels = prediction.argmax(dim=1).tolist()
    body = {
        "predictions": [
            {"label": label, "probabilities": probabilities}
            for label, probabilities in zip(labels, prediction.tolist(), strict=True)
        ]
    }
    return json_fast.dumps(body), decoding.JSON
