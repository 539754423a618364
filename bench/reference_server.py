"""The naive endpoint that bench_endpoint.py measures the project's server against: Starlette, stdlib json,
torch.tensor(list), one worker, uvicorn's defaults. It serves the same model artifact.

    python bench/reference_server.py --model-dir DIR --port 8090
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(model_dir: Path) -> Starlette:
    sys.path.insert(0, str(model_dir / "code"))
    from models import build_model

    config = json.loads((model_dir / "model_config.json").read_text())
    model = build_model(config["architecture"], **config["kwargs"])
    model.load_state_dict(torch.load(model_dir / "model.pth", weights_only=True))
    model.eval()
    mean, std = config["normalization"]["mean"], config["normalization"]["std"]

    async def invocations(request: Request) -> JSONResponse:
        instances = json.loads(await request.body())["instances"]
        pixels = torch.tensor(instances, dtype=torch.float32).view(-1, 1, 28, 28)
        with torch.no_grad():
            probabilities = model((pixels / 255 - mean) / std).exp()
        predictions = [{"label": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities]
        return JSONResponse({"predictions": predictions})

    async def ping(request: Request) -> Response:
        return Response()

    return Starlette(routes=[Route("/ping", ping), Route("/invocations", invocations, methods=["POST"])])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port)
