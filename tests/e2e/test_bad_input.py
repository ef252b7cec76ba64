"""Bad input over both protocols: one INVALID_ARG naming the field; neighbours answered; server fine."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image

pytestmark = pytest.mark.slow

GOOD = {"prompt": "a blue square", "height": np.int32(32), "width": np.int32(32), "num_inference_steps": np.int32(2)}

BAD_INPUTS = {
    "missing_prompt": ({k: v for k, v in GOOD.items() if k != "prompt"}, "prompt"),
    "wrong_dtype": ({**GOOD, "height": np.float32(32)}, "height"),
    "negative_height": ({**GOOD, "height": np.int32(-64)}, "height"),
    "huge_width": ({**GOOD, "width": np.int32(2**31 - 1)}, "width"),
    "too_many_pixels": ({**GOOD, "height": np.int32(4096), "width": np.int32(4096)}, "height"),
    "not_a_multiple": ({**GOOD, "width": np.int32(100)}, "width"),
    "zero_steps": ({**GOOD, "num_inference_steps": np.int32(0)}, "num_inference_steps"),
    "absurd_steps": ({**GOOD, "num_inference_steps": np.int32(10**9)}, "num_inference_steps"),
    "nan_guidance": ({**GOOD, "guidance_scale": np.float32("nan")}, "guidance_scale"),
    "inf_true_cfg": ({**GOOD, "true_cfg_scale": np.float32("inf")}, "true_cfg_scale"),
    "invalid_utf8": ({**GOOD, "prompt": b"\xff\xfe a cat"}, "prompt"),
    "oversized_prompt": ({**GOOD, "prompt": "a cat " * 5000}, "prompt"),
    "two_seeds": ({**GOOD, "seed": np.array([1, 2], np.int64)}, "seed"),
}


def status_is_invalid_arg(exc: InferenceServerException) -> bool:
    return str(exc.status()) in ("StatusCode.INVALID_ARGUMENT", "400")


@pytest.mark.parametrize("model", ["flux", "flux_ensemble"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_invalid_arg_naming_the_field(client, model, case):
    values, field = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, values)
    assert status_is_invalid_arg(info.value), (info.value.status(), info.value.message())
    assert field in info.value.message(), info.value.message()


def test_valid_requests_in_the_same_batch_are_answered(client, flux_reference):
    """Bad and good requests arrive together (one dynamic batch or several): each gets its own answer."""
    bad = [BAD_INPUTS[c][0] for c in ("negative_height", "nan_guidance", "invalid_utf8")]
    good = [{**GOOD, "seed": np.int64(s)} for s in (1, 2, 3)]
    outcomes: dict[int, tuple] = {}
    done = threading.Semaphore(0)

    def collect(i):
        def callback(image, error):
            outcomes[i] = (image, error)
            done.release()

        return callback

    pending = []
    for i, values in enumerate(bad + good):
        handle = client.infer_async("flux", values, collect(i))
        if handle is not None:  # HTTP: a future-like handle
            pending.append((i, handle))
    for i, handle in pending:
        try:
            outcomes[i] = (handle.get_result().as_numpy("image")[0], None)
        except InferenceServerException as exc:
            outcomes[i] = (None, exc)
        done.release()
    for _ in range(6):
        assert done.acquire(timeout=120)
    for i in range(3):
        assert outcomes[i][0] is None and status_is_invalid_arg(outcomes[i][1])
    for i, values in enumerate(good, start=3):
        image, error = outcomes[i]
        assert error is None, error
        assert_same_image(
            image, flux_reference("a blue square", int(values["seed"]), height=32, width=32, num_inference_steps=2)
        )


def test_server_stays_ready_and_right_after_bad_input(client, server, flux_reference):
    for values, _ in BAD_INPUTS.values():
        with pytest.raises(InferenceServerException):
            client.infer("flux", values)
    assert client.client.is_server_ready()
    for model in ("flux", "flux_text_encoder", "flux_transformer", "flux_vae", "flux_ensemble"):
        assert client.client.is_model_ready(model)
    values = {**GOOD, "seed": np.int64(9)}
    assert_same_image(
        client.infer("flux", values), flux_reference("a blue square", 9, height=32, width=32, num_inference_steps=2)
    )
