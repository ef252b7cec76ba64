"""In-process fake Triton servers (gRPC and HTTP/KServe-v2) for omni_client tests.

They speak the real wire protocols, so the tritonclient transports are exercised end to end,
but serve a trivial numpy "model" instead of a diffusion pipeline.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

#: Fake repository: name -> (kind, state, reason).
MODELS: dict[str, tuple[str, str, str]] = {
    "flux": ("image", "READY", ""),
    "wan": ("video", "READY", ""),
    "broken": ("image", "UNAVAILABLE", "failed to load: out of memory"),
}


@dataclass
class FakeServer:
    """A running fake server, as given to tests by the ``fake_server`` fixture."""

    protocol: str
    url: str
    backend: FakeBackend


class FakeInferError(Exception):
    """Inference error reported to the client with the given message."""


@dataclass
class FakeBackend:
    """The fake model logic shared by both transports; records what it receives."""

    requests: list[tuple[str, dict[str, tuple[str, list[int], np.ndarray]]]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def is_ready(self, model: str) -> bool:
        return MODELS.get(model, ("", "", ""))[1] == "READY"

    def index(self) -> list[dict[str, str]]:
        rows = []
        for name, (_, state, reason) in MODELS.items():
            row = {"name": name, "state": state}
            if state == "READY":
                row["version"] = "1"
            if reason:
                row["reason"] = reason
            rows.append(row)
        return rows

    def infer(self, model: str, tensors: dict[str, tuple[str, list[int], np.ndarray]]) -> tuple[str, np.ndarray]:
        with self.lock:
            self.requests.append((model, tensors))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._infer(model, {k: v[2] for k, v in tensors.items()})
        finally:
            with self.lock:
                self.in_flight -= 1

    def _infer(self, model: str, arrays: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
        if model not in MODELS:
            raise FakeInferError(f"Request for unknown model: '{model}' is not found")
        kind, state, _ = MODELS[model]
        if state != "READY":
            raise FakeInferError(f"Request for unknown model: '{model}' is not ready")
        if "prompt" not in arrays:
            raise FakeInferError("expected input 'prompt'")
        prompt = arrays["prompt"].reshape(-1)[0].decode("utf-8")
        if prompt.startswith("fail"):
            raise FakeInferError(f"pipeline error: cannot render {prompt!r}")
        if prompt.startswith("slow"):
            time.sleep(0.2)
        height = int(arrays.get("height", np.array([[16]])).reshape(-1)[0])
        width = int(arrays.get("width", np.array([[24]])).reshape(-1)[0])
        value = int(arrays.get("seed", np.array([[7]])).reshape(-1)[0]) % 256
        if kind == "video":
            frames = int(arrays.get("num_frames", np.array([[2]])).reshape(-1)[0])
            ramp = (value + np.arange(frames)) % 256  # frame f is filled with seed + f
            video = np.broadcast_to(ramp[None, :, None, None, None], (1, frames, height, width, 3))
            return "video", np.ascontiguousarray(video, dtype=np.uint8)
        return "image", np.full((1, height, width, 3), value, dtype=np.uint8)


def _decode(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(shape)
    return np.frombuffer(raw, dtype=triton_to_np_dtype(datatype)).reshape(shape)


class _GrpcService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method names)
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=self.backend.is_ready(request.name))

    def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        models = [service_pb2.RepositoryIndexResponse.ModelIndex(**row) for row in self.backend.index()]
        return service_pb2.RepositoryIndexResponse(models=models)

    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        tensors = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            shape = list(tensor.shape)
            tensors[tensor.name] = (tensor.datatype, shape, _decode(tensor.datatype, shape, raw))
        try:
            name, out = self.backend.infer(request.model_name, tensors)
        except FakeInferError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1")
        response.outputs.add(name=name, datatype="UINT8", shape=list(out.shape))
        response.raw_output_contents.append(out.tobytes())
        return response


def start_grpc(backend: FakeBackend) -> tuple[str, Any]:
    """Starts the fake gRPC server on a free local port; returns (url, server)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_GrpcService(backend), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return f"127.0.0.1:{port}", server


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    backend: FakeBackend

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (quiet)
        pass

    def _send(self, status: int, header: Any, binary: bytes = b"") -> None:
        body = json.dumps(header).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
        if binary:
            self.send_header("Inference-Header-Content-Length", str(len(body)))
        self.send_header("Content-Length", str(len(body) + len(binary)))
        self.end_headers()
        self.wfile.write(body + binary)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        if self.path in ("/v2/health/live", "/v2/health/ready"):
            return self._empty(200)
        match = re.fullmatch(r"/v2/models/([^/]+)(?:/versions/\d+)?/ready", self.path)
        if match:
            return self._empty(200 if self.backend.is_ready(match.group(1)) else 400)
        self._send(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v2/repository/index":
            return self._send(200, self.backend.index())
        match = re.fullmatch(r"/v2/models/([^/]+)(?:/versions/\d+)?/infer", self.path)
        if not match:
            return self._send(404, {"error": "not found"})
        json_len = int(self.headers.get("Inference-Header-Content-Length", len(body)))
        request, offset, tensors = json.loads(body[:json_len]), json_len, {}
        for tensor in request["inputs"]:
            size = tensor["parameters"]["binary_data_size"]
            raw, offset = body[offset : offset + size], offset + size
            tensors[tensor["name"]] = (
                tensor["datatype"],
                tensor["shape"],
                _decode(tensor["datatype"], tensor["shape"], raw),
            )
        try:
            name, out = self.backend.infer(match.group(1), tensors)
        except FakeInferError as exc:
            return self._send(400, {"error": str(exc)})
        raw = out.tobytes()
        output = {
            "name": name,
            "datatype": "UINT8",
            "shape": list(out.shape),
            "parameters": {"binary_data_size": len(raw)},
        }
        self._send(200, {"model_name": match.group(1), "model_version": "1", "outputs": [output]}, raw)


def start_http(backend: FakeBackend) -> tuple[str, ThreadingHTTPServer]:
    """Starts the fake HTTP server on a free local port; returns (url, server)."""
    handler = type("Handler", (_HttpHandler,), {"backend": backend})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return f"127.0.0.1:{server.server_address[1]}", server
