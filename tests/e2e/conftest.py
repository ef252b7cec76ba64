"""A real tritonserver, started through the launcher on free ports, serving model_repository/."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from omni_backend.testing.server import TritonServerProcess

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
PROTOCOLS = ("grpc", "http")
_DTYPES = {
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.uint8): "UINT8",
}


FLUX_MODELS = ("flux", "flux_ensemble", "flux_stream", "flux_text_encoder", "flux_transformer", "flux_vae")


def repository_of(root: Path, models: tuple[str, ...]) -> Path:
    """A model repository under ``root`` holding only ``models`` (links to model_repository/'s folders).

    Each family's e2e module serves only its own models, so a new family does not slow every
    server start, and the repository index (``omni-client health``/``models``) lists only what is loaded.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in models:
        (root / name).symlink_to(REPOSITORY / name, target_is_directory=True)
    return root


def add_parameters(repository: Path, model: str, extra: str) -> None:
    """Prepend config.pbtxt ``parameters`` entries (``extra``) to a model of a copied repository."""
    path = repository / model / "config.pbtxt"
    text = path.read_text()
    path.write_text(text.replace("parameters [\n", "parameters [\n" + extra, 1))


_FAMILY_SUFFIXES = ("", "_ensemble", "_stream", "_text_encoder", "_transformer", "_vae")


def family_models(family: str) -> tuple[str, ...]:
    """The family's models in model_repository/: one model, ensemble, stream (if any) and stages."""
    return tuple(family + s for s in _FAMILY_SUFFIXES if (REPOSITORY / (family + s) / "config.pbtxt").exists())


def family_server(family: str, checkpoint_fixture: str) -> Callable[..., Iterator[TritonServerProcess]]:
    """A module-scoped fixture: a tritonserver serving only ``family``'s models, on the tiny
    checkpoint that ``checkpoint_fixture`` builds under the served name."""

    @pytest.fixture(scope="module")
    def fixture(request, model_root: Path, tmp_path_factory: pytest.TempPathFactory):
        request.getfixturevalue(checkpoint_fixture)
        repository = repository_of(tmp_path_factory.mktemp(f"{family}-repo"), family_models(family))
        with serving(repository, model_root) as process:
            yield process

    return fixture


def protocol_client(server_fixture: str) -> Callable[..., Iterator[RawClient]]:
    """A fixture: a RawClient of the server ``server_fixture`` gives, once per protocol."""

    @pytest.fixture(params=PROTOCOLS)
    def fixture(request):
        raw = RawClient(request.getfixturevalue(server_fixture), request.param)
        yield raw
        raw.close()

    return fixture


def image_params(prompt: str, seed: int, steps: int = 3, **extra) -> dict:
    """The wire values of a small image request (64x96: two patch multiples, not square)."""
    values = {
        "prompt": prompt,
        "height": np.int32(64),
        "width": np.int32(96),
        "num_inference_steps": np.int32(steps),
        "seed": np.int64(seed),
    }
    return {**values, **extra}


@contextlib.contextmanager
def serving(repository: Path, model_root: Path) -> Iterator[TritonServerProcess]:
    process = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    process.start(timeout=600)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def server(model_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The FLUX models on one server, shared by the FLUX e2e modules."""
    with serving(repository_of(tmp_path_factory.mktemp("flux-repo"), FLUX_MODELS), model_root) as process:
        yield process


def wait_until(predicate, deadline_s: float, what: str) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``deadline_s``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < deadline_s, f"{what} did not happen within {deadline_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


def wire(value) -> tuple[np.ndarray, str]:
    """One request's input with its batch dimension of 1, and its Triton datatype."""
    if isinstance(value, str | bytes):
        data = value.encode() if isinstance(value, str) else value
        return np.array([[data]], dtype=object), "BYTES"
    array = np.asarray(value)
    array = array.reshape(1, *array.shape) if array.ndim else array.reshape(1, 1)
    return array, _DTYPES[array.dtype]


class RawClient:
    """tritonclient over one protocol, taking {name: value} with no client-side checks."""

    def __init__(self, server: TritonServerProcess, protocol: str):
        self.protocol = protocol
        self.module = grpcclient if protocol == "grpc" else httpclient
        url = server.grpc_url if protocol == "grpc" else server.http_url
        # HTTP: tritonclient's network timeout is 60 s by default; a busy CPU can run a tiny edit longer
        options = {} if protocol == "grpc" else {"concurrency": 16, "network_timeout": 900.0}
        self.client = self.module.InferenceServerClient(url, **options)

    def inputs(self, values: dict) -> list:
        tensors = []
        for name, value in values.items():
            array, dtype = wire(value)
            tensor = self.module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def infer(self, model: str, values: dict, output: str = "image") -> np.ndarray:
        return self.client.infer(model, self.inputs(values)).as_numpy(output)[0]

    def infer_async(self, model: str, values: dict, callback):
        """Sends without waiting; ``callback(image or None, error or None)``."""
        if self.protocol == "grpc":

            def done(result, error):
                callback(None if error else result.as_numpy("image")[0], error)

            self.client.async_infer(model, self.inputs(values), done)
            return None
        return self.client.async_infer(model, self.inputs(values))

    def close(self) -> None:
        self.client.close()


def stream_responses(server: TritonServerProcess, model: str, values: dict, timeout: float = 600) -> list[tuple]:
    """One request to a streaming (decoupled) model over raw gRPC streaming; its (result, error) pairs, in order.

    Ends at the response flagged final or at the first error.
    """
    raw = RawClient(server, "grpc")
    responses: list[tuple] = []
    done = threading.Event()

    def callback(result, error) -> None:
        responses.append((result, error))
        final = result is not None and result.get_response().parameters["triton_final_response"].bool_param
        if error is not None or final:
            done.set()

    stream = grpcclient.InferenceServerClient(server.grpc_url)
    stream.start_stream(callback)
    try:
        stream.async_stream_infer(model, raw.inputs(values), enable_empty_final_response=True)
        assert done.wait(timeout), f"{model}: no final response within {timeout} s"
    finally:
        stream.stop_stream()
        stream.close()
        raw.close()
    return responses


def infer_concurrently(server: TritonServerProcess, jobs: list[tuple[str, str, dict]]) -> list[np.ndarray]:
    """Send every (protocol, model, values) job at once, one thread each; their images, in order."""
    clients = {p: RawClient(server, p) for p in PROTOCOLS}
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def run(i: int) -> None:
        protocol, model, values = jobs[i]
        try:
            results[i] = clients[protocol].infer(model, values)
        except Exception as exc:  # collected, raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for c in clients.values():
        c.close()
    assert not errors, errors
    return [results[i] for i in range(len(jobs))]


@pytest.fixture(params=PROTOCOLS)
def client(request, server):
    raw = RawClient(server, request.param)
    yield raw
    raw.close()
