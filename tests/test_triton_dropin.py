"""Triton behaviour that clients rely on, driven with tritonclient over HTTP and gRPC.

Warmup never makes a valid model unusable; Triton's model control modes and strict readiness;
load with a config override; Triton's error texts (observed from Triton 2.51 itself, listed in
docs/triton-compatibility.md); shared-memory calls refused plainly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import ROOT, VolleyProcess, serving
from onnx_models import mlp, parsed_strings, write_config
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from server.grpc_api import InferenceServicer

CONTROL_REFUSED = "explicit model load / unload is not allowed if polling is enabled"


def numbers(rows: int, offset: int = 0) -> np.ndarray:
    return np.array([[str(offset + i + 16 * r) for i in range(16)] for r in range(rows)], object)


def string_inputs(module, rows: int = 2) -> list:
    inputs = []
    for name, offset in (("INPUT0", 0), ("INPUT1", 1)):
        tensor = module.InferInput(name, [rows, 16], "BYTES")
        tensor.set_data_from_numpy(numbers(rows, offset))
        inputs.append(tensor)
    return inputs


def clients(proc: VolleyProcess) -> list:
    return [
        httpclient.InferenceServerClient(proc.http),
        grpcclient.InferenceServerClient(proc.grpc),
    ]


def raises(call, status: str | tuple[str, ...], text: str) -> None:
    """`call` fails with the status (HTTP code or gRPC code name) and a message holding `text`."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    wanted = (status,) if isinstance(status, str) else status
    assert caught.value.status() in wanted, caught.value
    assert text in caught.value.message(), caught.value.message()


def test_a_model_that_parses_its_strings_serves_despite_the_default_warmup(
    tmp_path: Path,
) -> None:
    repository = tmp_path / "models"
    parsed_strings(repository / "simple_string" / "1" / "model.onnx")
    with serving(repository, "--strict-readiness") as proc:
        for client, module in zip(clients(proc), (httpclient, grpcclient), strict=True):
            assert client.is_server_ready() and client.is_model_ready("simple_string")
            result = client.infer("simple_string", string_inputs(module))
            a, b = numbers(2).astype(int), numbers(2, 1).astype(int)
            assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
            assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
            client.close()
        assert '"event":"warmup_skipped","model":"simple_string"' in proc.log()


def test_configured_warmup_supplies_data_and_must_succeed(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    parsed_strings(repository / "good" / "1" / "model.onnx")
    write_config(repository / "good", {"warmup": {"batch_sizes": [1, 4],
                                                  "inputs": {"INPUT0": {"value": "7"},
                                                             "INPUT1": {"value": 2}}}})  # fmt: skip
    parsed_strings(repository / "bad" / "1" / "model.onnx")
    write_config(repository / "bad", {"warmup": {"count": 1}})
    with serving(repository) as proc:
        client = httpclient.InferenceServerClient(proc.http)
        assert client.is_model_ready("good")
        assert not client.is_model_ready("bad")
        assert not client.is_server_ready()  # strict readiness: a model that should serve fails
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["bad"]["state"] == "UNAVAILABLE"
        assert "failed to load or warm up" in index["bad"]["reason"]
        client.close()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("control") / "models"
    mlp(repository / "alpha" / "1" / "model.onnx", features=8, hidden=16)
    mlp(repository / "beta" / "1" / "model.onnx", features=8, hidden=16, seed=1)
    return repository


def test_none_mode_serves_everything_and_refuses_load_and_unload(two_models: Path) -> None:
    with serving(two_models, "--model-control", "none") as proc:
        for client, code in zip(clients(proc), ("503", "StatusCode.UNAVAILABLE"), strict=True):
            assert client.is_model_ready("alpha") and client.is_model_ready("beta")
            raises(lambda c=client: c.load_model("alpha"), code, CONTROL_REFUSED)
            raises(lambda c=client: c.unload_model("alpha"), code, CONTROL_REFUSED)
            assert client.is_model_ready("alpha")
            client.close()


def test_explicit_mode_loads_only_what_it_is_asked_to(two_models: Path) -> None:
    flags = ("--model-control", "explicit", "--load-model", "alpha")
    with serving(two_models, *flags) as proc:
        http, grpc_client = clients(proc)
        assert http.is_model_ready("alpha") and not http.is_model_ready("beta")
        assert http.is_server_ready(), "a model nobody asked for does not hold readiness"
        states = {m["name"]: m["state"] for m in http.get_model_repository_index()}
        assert states == {"alpha": "READY", "beta": "UNAVAILABLE"}
        grpc_client.load_model("beta")
        assert grpc_client.is_model_ready("beta")
        http.unload_model("alpha")
        assert not http.is_model_ready("alpha") and http.is_server_ready()
        http.close()
        grpc_client.close()
    with serving(two_models, "--model-control", "explicit") as proc:
        client = httpclient.InferenceServerClient(proc.http)
        assert not client.is_model_ready("alpha") and not client.is_model_ready("beta")
        client.close()
    with serving(two_models, "--model-control", "explicit", "--load-model", "*") as proc:
        client = httpclient.InferenceServerClient(proc.http)
        assert client.is_model_ready("alpha") and client.is_model_ready("beta")
        client.close()


def test_poll_mode_picks_up_new_models_and_refuses_load(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    mlp(repository / "alpha" / "1" / "model.onnx", features=8, hidden=16)
    with serving(repository, "--model-control", "poll", "--poll-repository", "0.5") as proc:
        client = grpcclient.InferenceServerClient(proc.grpc)
        raises(lambda: client.load_model("alpha"), "StatusCode.UNAVAILABLE", CONTROL_REFUSED)
        mlp(repository / "gamma" / "1" / "model.onnx", features=8, hidden=16)
        deadline = 50
        while not client.is_model_ready("gamma") and deadline:
            deadline -= 1
            subprocess.run(["sleep", "0.2"], check=True)
        assert client.is_model_ready("gamma")
        client.close()


def test_strict_readiness_can_be_turned_off(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    mlp(repository / "alpha" / "1" / "model.onnx", features=8, hidden=16)
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    with serving(repository) as proc:
        assert requests.get(f"{proc.url}/v2/health/ready", timeout=5).status_code == 503
    with serving(repository, "--no-strict-readiness") as proc:
        assert requests.get(f"{proc.url}/v2/health/ready", timeout=5).status_code == 200
        client = httpclient.InferenceServerClient(proc.http)
        assert client.is_model_ready("alpha") and not client.is_model_ready("broken")
        client.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--model-control", "none", "--load-model", "a"), "--load-model needs"),
        (("--model-control", "explicit", "--poll-repository", "1"), "--poll-repository needs"),
    ],
)
def test_contradictory_control_flags_are_refused(flags: tuple, message: str) -> None:
    run = subprocess.run([sys.executable, "-m", "server", "serve", *flags], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert message in run.stderr


@pytest.fixture(scope="module")
def explicit(two_models: Path) -> Iterator[VolleyProcess]:
    with serving(two_models, "--model-control", "explicit", "--load-model", "*") as proc:
        yield proc


def test_load_with_a_triton_config_override(explicit: VolleyProcess) -> None:
    override = {
        "max_batch_size": 4,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [8]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 300,
                             "default_queue_policy": {"max_queue_size": 7}},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "parameters": {"note": {"string_value": "overridden"}},
    }  # fmt: skip
    http, grpc_client = clients(explicit)
    http.load_model("alpha", config=json.dumps(override))
    config = http.get_model_config("alpha")
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 300
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 7
    assert config["instance_group"][0]["count"] == 2
    assert config["parameters"]["note"]["string_value"] == "overridden"
    grpc_client.load_model("alpha", config=json.dumps({"max_batch_size": 2}))
    assert grpc_client.get_model_config("alpha").config.max_batch_size == 2
    x = httpclient.InferInput("input", [3, 8], "FP32")
    x.set_data_from_numpy(np.zeros((3, 8), np.float32))
    raises(lambda: http.infer("alpha", [x]), "400", "accepts 1 to 2")
    http.load_model("alpha")  # no override: the folder's own config again
    assert http.get_model_config("alpha")["max_batch_size"] == 64
    http.close()
    grpc_client.close()


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ("{not json", "failed to load 'alpha', config override is not valid JSON"),
        (json.dumps({"max_batch_size": "many"}), "failed to load 'alpha', config override: "
                                                 "field 'max_batch_size'"),
        (json.dumps({"input": [{"name": "nope", "data_type": "TYPE_FP32", "dims": [8]}]}),
         "failed to load 'alpha', config override: field 'inputs.0.name'"),
    ],
)  # fmt: skip
def test_a_malformed_override_fails_to_load_and_the_old_config_serves(
    explicit: VolleyProcess, config: str, text: str
) -> None:
    for client, code in zip(clients(explicit), ("400", "StatusCode.INVALID_ARGUMENT"), strict=True):
        raises(lambda c=client: c.load_model("alpha", config=config), code, text)
        assert client.is_model_ready("alpha")
        client.close()


def test_triton_error_texts(explicit: VolleyProcess) -> None:
    http, grpc_client = clients(explicit)
    for client, module, codes in (
        (http, httpclient, {"404": "404", "400": "400"}),
        (grpc_client, grpcclient, {"404": "StatusCode.NOT_FOUND",
                                   "400": "StatusCode.INVALID_ARGUMENT"}),
    ):  # fmt: skip
        x = module.InferInput("input", [1, 8], "FP32")
        x.set_data_from_numpy(np.zeros((1, 8), np.float32))
        unknown = "Request for unknown model: 'nope' is not found"
        raises(lambda c=client, x=x: c.infer("nope", [x]), codes["404"], unknown)
        raises(lambda c=client: c.get_model_metadata("nope"), codes["404"], unknown)
        raises(lambda c=client: c.get_model_config("nope"), codes["404"], unknown)
        raises(lambda c=client, x=x: c.infer("beta", [x], model_version="7"), codes["404"],
               "Request for unknown model: 'beta' version 7 is not found")  # fmt: skip
        raises(lambda c=client: c.get_inference_statistics("nope"), codes["400"],
               "requested model 'nope' is not available")  # fmt: skip
        raises(lambda c=client: c.load_model("nope"), codes["404"], "failed to load 'nope'")
        client.close()


def test_raw_and_typed_contents_together_are_refused(explicit: VolleyProcess) -> None:
    channel = grpc.insecure_channel(explicit.grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="alpha")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 8])
    tensor.contents.fp32_contents.extend([0.0] * 8)
    request.raw_input_contents.append(np.zeros(8, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "contents field must not be specified when using raw_input_contents for 'input' "
        "for model 'alpha'"
    )
    channel.close()


def test_shared_memory_calls_get_a_clear_refusal_unless_allowed(explicit: VolleyProcess) -> None:
    http, grpc_client = clients(explicit)
    assert http.get_system_shared_memory_status() == []
    assert http.get_cuda_shared_memory_status() == []
    http.unregister_system_shared_memory()
    assert len(grpc_client.get_system_shared_memory_status().regions) == 0
    grpc_client.unregister_cuda_shared_memory()
    # System shared memory is off unless --allow-client-shm (tests/test_shared_memory.py).
    raises(lambda: http.register_system_shared_memory("r", "/volley_r", 64), "501",
           "system shared memory is off in this server")  # fmt: skip
    raises(lambda: grpc_client.register_system_shared_memory("r", "/volley_r", 64),
           "StatusCode.UNIMPLEMENTED", "start it with --allow-client-shm")  # fmt: skip
    raises(lambda: grpc_client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 64),
           "StatusCode.UNIMPLEMENTED", "CUDA shared memory is not supported by Volley")  # fmt: skip
    grpc_unimplemented = "StatusCode.UNIMPLEMENTED"
    for client, module, code in ((http, httpclient, "501"),
                                 (grpc_client, grpcclient, grpc_unimplemented)):  # fmt: skip
        x = module.InferInput("input", [1, 8], "FP32")
        x.set_shared_memory("r", 32)
        raises(lambda c=client, x=x: c.infer("alpha", [x]), code, "shared memory is off")
        client.close()


def test_every_rpc_of_the_service_has_a_handler_of_volleys_own() -> None:
    # The generated servicer's defaults use grpcio's context API and would end as UNKNOWN.
    base = service_pb2_grpc.GRPCInferenceServiceServicer
    methods = [name for name in vars(base) if not name.startswith("_")]
    assert "ModelInfer" in methods and "TraceSetting" in methods
    assert [m for m in methods if getattr(InferenceServicer, m) is getattr(base, m)] == []
