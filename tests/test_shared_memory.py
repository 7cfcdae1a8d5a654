"""Triton's system shared-memory extension (`volley serve --allow-client-shm`): a client on the
same host leaves tensors in POSIX shared memory, registers the region, and names it instead of
sending the bytes; Triton's own client utilities and perf_analyzer drive it unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from conftest import VolleyProcess, child_processes, copy_shipped_models, running, serving
from fuzzing import (
    DATATYPES,
    ITEMSIZE,
    assert_grpc_client_error,
    assert_http_answer_or_client_error,
    assert_http_client_error,
    fuzz_settings,
    json_values,
    watchdog_fixtures,
)
from hypothesis import given
from hypothesis import strategies as st
from test_perf_analyzer import perf_analyzer  # noqa: F401 - a fixture
from test_repository import wait_for
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException, serialize_byte_tensor
from vision_scenes import encode, scene_image

ROWS = 8
FEATURES = 17
MAX_REQUEST_BYTES = 1_000_000  # also the most one input may take from shared memory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    repository = copy_shipped_models(tmp_path_factory.mktemp("shm"))
    limit = ("--max-request-bytes", str(MAX_REQUEST_BYTES))
    with serving(repository, "--allow-client-shm", *limit) as proc:
        yield proc


@pytest.fixture
def regions() -> Iterator[list]:
    """Shared-memory objects a test creates, destroyed after it."""
    made: list = []
    yield made
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def region(made: list, size: int) -> tuple[str, str, object]:
    """A new shared-memory object of `size` bytes: (region name, key, handle)."""
    name = f"volley-test-{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region(name, f"/{name}", size)
    made.append(handle)
    return name, f"/{name}", handle


baseline, still_serving = watchdog_fixtures("server")  # after each test: still serving


def features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(ROWS, FEATURES)).astype(np.float32)


def client(proc: VolleyProcess, protocol: str):
    if protocol == "http":
        return httpclient, httpclient.InferenceServerClient(proc.http)
    return grpcclient, grpcclient.InferenceServerClient(proc.grpc)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inputs_and_outputs_travel_through_shared_memory(
    server: VolleyProcess, regions: list, protocol: str
) -> None:
    module, c = client(server, protocol)
    rows = features(1)
    in_name, in_key, in_handle = region(regions, rows.nbytes)
    out_name, out_key, out_handle = region(regions, 64 + ROWS * 4)
    shm.set_shared_memory_region(in_handle, [rows])
    try:
        c.register_system_shared_memory(in_name, in_key, rows.nbytes)
        c.register_system_shared_memory(out_name, out_key, 64 + ROWS * 4)
        tensor = module.InferInput("features", [ROWS, FEATURES], "FP32")
        tensor.set_shared_memory(in_name, rows.nbytes)
        score = module.InferRequestedOutput("score")
        score.set_shared_memory(out_name, ROWS * 4, offset=64)
        flagged = module.InferRequestedOutput("is_fraud")
        result = c.infer("fraud", [tensor], outputs=[score, flagged])
        # The score went to shared memory (the response only names it), is_fraud came back.
        written = shm.get_contents_as_numpy(out_handle, np.float32, [ROWS, 1], offset=64)
        plain = module.InferInput("features", [ROWS, FEATURES], "FP32")
        plain.set_data_from_numpy(rows)
        expected = c.infer("fraud", [plain])
        np.testing.assert_allclose(written, expected.as_numpy("score"), rtol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("is_fraud"), expected.as_numpy("is_fraud"))
        output = result.get_output("score")
        if protocol == "http":  # no data, and no parameters, as Triton's C++ client expects
            assert output == {"name": "score", "datatype": "FP32", "shape": [ROWS, 1]}
        else:
            assert output.parameters["shared_memory_region"].string_param == out_name
            assert output.parameters["shared_memory_byte_size"].int64_param == ROWS * 4
        status = c.get_system_shared_memory_status()
        listed = (
            {r["name"]: r for r in status}
            if protocol == "http"
            else {n: {"key": r.key, "byte_size": r.byte_size} for n, r in status.regions.items()}
        )
        assert listed[in_name]["key"] == in_key
        assert listed[in_name]["byte_size"] == rows.nbytes
    finally:
        c.unregister_system_shared_memory(in_name)
        c.unregister_system_shared_memory(out_name)
        c.close()
    assert requests.get(f"{server.url}/v2/systemsharedmemory/status", timeout=5).json() == []


def test_images_for_detect_come_from_shared_memory(server: VolleyProcess, regions: list) -> None:
    blobs = [encode(scene_image(seed, (320, 240), 2.0).image) for seed in (3, 4)]
    serialized = serialize_byte_tensor(np.array(blobs, dtype=np.object_)).item()
    name, key, handle = region(regions, len(serialized))
    shm.set_shared_memory_region(handle, [np.frombuffer(serialized, dtype=np.uint8)])
    c = grpcclient.InferenceServerClient(server.grpc)
    try:
        c.register_system_shared_memory(name, key, len(serialized))
        tensor = grpcclient.InferInput("images", [2], "BYTES")
        tensor.set_shared_memory(name, len(serialized))
        from_shm = c.infer("detect", [tensor])
        plain = grpcclient.InferInput("images", [2], "BYTES")
        plain.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        expected = c.infer("detect", [plain])
        counts = expected.as_numpy("num_detections")
        assert counts.min() > 0
        np.testing.assert_array_equal(from_shm.as_numpy("num_detections"), counts)
        np.testing.assert_allclose(from_shm.as_numpy("boxes"), expected.as_numpy("boxes"))
    finally:
        c.unregister_system_shared_memory(name)
        c.close()


def refused(call, status: str, text: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == status, caught.value.message()
    assert text in caught.value.message(), caught.value.message()


def test_bad_regions_and_references_are_refused(server: VolleyProcess, regions: list) -> None:
    c = httpclient.InferenceServerClient(server.http)
    g = grpcclient.InferenceServerClient(server.grpc)
    rows = features(2)
    name, key, handle = region(regions, rows.nbytes)
    shm.set_shared_memory_region(handle, [rows])
    try:
        refused(lambda: c.register_system_shared_memory("r", "/volley-missing-object", 64),
                "400", "Unable to open shared memory region: '/volley-missing-object'")  # fmt: skip
        refused(lambda: g.register_system_shared_memory("r", "/../etc/passwd", 64),
                "StatusCode.INVALID_ARGUMENT", "is not a shared-memory object name")  # fmt: skip
        refused(lambda: c.register_system_shared_memory("r", key, rows.nbytes, offset=8),
                "400", f"exceeds the {rows.nbytes} bytes of '{key}'")  # fmt: skip
        c.register_system_shared_memory(name, key, rows.nbytes)
        duplicate = f"shared memory region '{name}' already in manager"
        refused(lambda: g.register_system_shared_memory(name, key, 16),
                "StatusCode.INVALID_ARGUMENT", duplicate)  # fmt: skip

        def infer(region_name: str, size: int, offset: int = 0, out_size: int | None = None):
            tensor = httpclient.InferInput("features", [ROWS, FEATURES], "FP32")
            tensor.set_shared_memory(region_name, size, offset)
            outputs = None
            if out_size is not None:
                output = httpclient.InferRequestedOutput("score")
                output.set_shared_memory(name, out_size)
                outputs = [output]
            return c.infer("fraud", [tensor], outputs=outputs)

        refused(lambda: infer("nope", rows.nbytes), "400",
                "Unable to find shared memory region: 'nope'")  # fmt: skip
        refused(lambda: infer(name, rows.nbytes, offset=4), "400",
                f"exceed shared memory region '{name}' ({rows.nbytes} bytes)")  # fmt: skip
        refused(lambda: infer(name, rows.nbytes - 4), "400", "input 'features' in shared memory")
        refused(lambda: infer(name, rows.nbytes, out_size=4), "400",
                "shared memory size specified with the request for output 'score' (4 bytes) "
                f"should be at least {ROWS * 4} bytes to hold the results")  # fmt: skip
        big_name, big_key, _ = region(regions, MAX_REQUEST_BYTES + 4)
        c.register_system_shared_memory(big_name, big_key, MAX_REQUEST_BYTES + 4)
        refused(lambda: infer(big_name, MAX_REQUEST_BYTES + 4), "413",
                f"exceed {MAX_REQUEST_BYTES} bytes (--max-request-bytes)")  # fmt: skip
        # A client that shrinks its object after registering gets an error, not a dead server.
        os.truncate(f"/dev/shm/{key.lstrip('/')}", 16)
        refused(lambda: infer(name, rows.nbytes), "400", f"region '{name}' was truncated")
        assert c.is_server_live() and c.is_model_ready("fraud")
        unknown = "Unable to find system shared memory region: 'nope'"
        refused(lambda: g.get_system_shared_memory_status("nope"),
                "StatusCode.NOT_FOUND", unknown)  # fmt: skip
    finally:
        c.unregister_system_shared_memory()
        c.close()
        g.close()


def test_a_grpc_input_in_shared_memory_takes_no_contents(
    server: VolleyProcess, regions: list
) -> None:
    """A gRPC input that names a registered region and also carries its values, typed or raw,
    is refused with INVALID_ARGUMENT naming the input; the same input without them is served."""
    rows = features(3)
    name, key, handle = region(regions, rows.nbytes)
    shm.set_shared_memory_region(handle, [rows])
    g = grpcclient.InferenceServerClient(server.grpc)
    g.register_system_shared_memory(name, key, rows.nbytes)

    def request(contents: str) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="fraud")
        tensor = message.inputs.add(name="features", datatype="FP32", shape=[ROWS, FEATURES])
        tensor.parameters["shared_memory_region"].string_param = name
        tensor.parameters["shared_memory_byte_size"].int64_param = rows.nbytes
        if contents == "typed":
            tensor.contents.fp32_contents.extend(rows.ravel().tolist())
        elif contents == "raw":
            message.raw_input_contents.append(rows.tobytes())
        return message

    try:
        with grpc.insecure_channel(server.grpc) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            for contents, message in (
                ("typed", "input 'features' lies in shared memory: it takes no contents"),
                ("raw", "1 raw_input_contents for 0 inputs"),
            ):
                with pytest.raises(grpc.RpcError) as refusal:
                    call(request(contents), timeout=60)
                assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT, contents
                assert message in refusal.value.details(), refusal.value.details()
            answer = call(request("none"), timeout=60)
        scores = np.frombuffer(answer.raw_output_contents[0], np.float32)
        assert scores.shape == (ROWS,) and np.all((scores >= 0) & (scores <= 1)), scores
    finally:
        g.unregister_system_shared_memory()
        g.close()


def test_off_unless_allowed(tmp_path: Path) -> None:
    """Without --allow-client-shm a region cannot be registered (501), an inference naming one
    is refused, and the server does not list the extension."""
    repository = copy_shipped_models(tmp_path)
    with serving(repository) as proc:
        c = httpclient.InferenceServerClient(proc.http)
        assert "system_shared_memory" not in c.get_server_metadata()["extensions"]
        refused(lambda: c.register_system_shared_memory("r", "/volley_r", 64), "501",
                "start it with --allow-client-shm")  # fmt: skip
        tensor = httpclient.InferInput("features", [ROWS, FEATURES], "FP32")
        tensor.set_shared_memory("r", ROWS * FEATURES * 4)
        refused(lambda: c.infer("fraud", [tensor]), "501", "system shared memory is off")
        c.close()


def fresh_infer(proc: VolleyProcess, region_name: str, size: int) -> requests.Response:
    """One fraud inference from a region, on a new connection (so on any worker)."""
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [ROWS, FEATURES],
                        "parameters": {"shared_memory_region": region_name,
                                       "shared_memory_byte_size": size}}]}  # fmt: skip
    return requests.post(f"{proc.url}/v2/models/fraud/infer", json=body, timeout=60)


def test_regions_reach_every_worker(tmp_path: Path, regions: list) -> None:
    """With --workers 2 a registration taken by one worker is made in every worker (and replayed
    to one that restarts), so requests on any connection read the region; an unregistration
    reaches them all too."""
    rows = features(3)
    name, key, handle = region(regions, rows.nbytes)
    shm.set_shared_memory_region(handle, [rows])
    repository = copy_shipped_models(tmp_path)
    with serving(repository, "--allow-client-shm", "--workers", "2") as proc:
        c = httpclient.InferenceServerClient(proc.http)
        c.register_system_shared_memory(name, key, rows.nbytes)
        plain = httpclient.InferInput("features", [ROWS, FEATURES], "FP32")
        plain.set_data_from_numpy(rows)
        expected = c.infer("fraud", [plain]).as_numpy("score").reshape(-1)
        c.close()
        for _ in range(16):  # the supervisor spreads new connections over both workers
            answer = fresh_infer(proc, name, rows.nbytes)
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(answer.json()["outputs"][0]["data"], expected, rtol=1e-6)
        again = {"key": key, "byte_size": rows.nbytes}
        duplicate = requests.post(
            f"{proc.url}/v2/systemsharedmemory/region/{name}/register", json=again, timeout=60
        )
        assert duplicate.status_code == 400 and "already in manager" in duplicate.text
        workers = [int(p) for p in child_processes_pids(proc)]
        os.kill(workers[0], signal.SIGKILL)  # its replacement must get the registration
        wait_for(lambda: len(child_processes_pids(proc)) == 2 and workers[0] not in
                 child_processes_pids(proc) and proc.log().count('"event":"worker_ready"') >= 3,
                 "the replacement worker", timeout=60)  # fmt: skip
        for _ in range(16):
            answer = fresh_infer(proc, name, rows.nbytes)
            assert answer.status_code == 200, answer.text
        requests.post(f"{proc.url}/v2/systemsharedmemory/region/{name}/unregister", timeout=60)
        for _ in range(8):
            answer = fresh_infer(proc, name, rows.nbytes)
            assert (
                answer.status_code == 400 and "Unable to find shared memory region" in answer.text
            )


def child_processes_pids(proc: VolleyProcess) -> set[int]:
    """The live worker processes of a `--workers` server."""
    return {pid for pid in child_processes(proc.proc.pid, b"server.worker") if running(pid)}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_with_system_shared_memory(
    perf_analyzer: Path,  # noqa: F811 - the fixture imported above
    server: VolleyProcess,
    tmp_path: Path,
    protocol: str,
) -> None:
    url = server.http if protocol == "http" else server.grpc
    csv = tmp_path / "out.csv"
    run = subprocess.run(
        [str(perf_analyzer), "-m", "fraud", "-u", url, "-i", protocol,
         "--shared-memory", "system", "--output-shared-memory-size", "64",
         "--concurrency-range", "2", "--measurement-interval", "1000",
         "--max-trials", "10", "--stability-percentage", "999", "-f", str(csv)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "error" not in run.stdout.lower()
    assert float(csv.read_text().splitlines()[1].split(",")[1]) > 0
    status = requests.get(f"{server.url}/v2/systemsharedmemory/status", timeout=5).json()
    assert status == []  # perf_analyzer unregisters what it registered


FUZZ_REGION = "fuzz-region"
FUZZ_BYTES = 4096
sizes = st.integers(-3, 2**70) | json_values


@pytest.fixture(scope="module")
def fuzz_region(server: VolleyProcess) -> Iterator[str]:
    """A registered region of random bytes that hostile requests point into."""
    handle = shm.create_shared_memory_region(FUZZ_REGION, f"/volley-{FUZZ_REGION}", FUZZ_BYTES)
    noise = np.random.default_rng(0).integers(0, 256, FUZZ_BYTES, dtype=np.uint8)
    shm.set_shared_memory_region(handle, [noise])
    c = httpclient.InferenceServerClient(server.http)
    c.register_system_shared_memory(FUZZ_REGION, f"/volley-{FUZZ_REGION}", FUZZ_BYTES)
    yield FUZZ_REGION
    c.unregister_system_shared_memory(FUZZ_REGION)
    c.close()
    shm.destroy_shared_memory_region(handle)


@fuzz_settings(60)
@given(
    region_name=st.sampled_from([FUZZ_REGION, FUZZ_REGION]) | st.text(max_size=20) | json_values,
    byte_size=st.integers(0, FUZZ_BYTES + 8) | sizes,
    offset=st.integers(0, FUZZ_BYTES + 8) | sizes,
    datatype=st.sampled_from(DATATYPES),
    shape=st.lists(st.integers(0, 40), max_size=3),
    output_in_shm=st.booleans(),
    model=st.sampled_from(["fraud", "detect"]),
    exact=st.booleans(),
)
def test_hostile_shared_memory_references_get_client_errors(
    server: VolleyProcess, fuzz_region: str, region_name, byte_size, offset, datatype, shape,
    output_in_shm: bool, model: str, exact: bool,
) -> None:  # fmt: skip
    """Any region name, size, offset, datatype and shape over HTTP and gRPC: an answer, or a
    4xx / client-error code with a message; random bytes read as tensors or images included
    (`exact`: the size a tensor of that shape and datatype takes, so the bytes are read)."""
    if exact:
        region_name = FUZZ_REGION
        byte_size = int(np.prod(shape)) * ITEMSIZE.get(datatype, 1)
        offset = offset if isinstance(offset, int) and 0 <= offset <= FUZZ_BYTES else 0
    parameters = {"shared_memory_region": region_name, "shared_memory_byte_size": byte_size,
                  "shared_memory_offset": offset}  # fmt: skip
    name = "features" if model == "fraud" else "images"
    body = {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                        "parameters": parameters}]}  # fmt: skip
    if output_in_shm:
        output = "score" if model == "fraud" else "boxes"
        body["outputs"] = [{"name": output, "parameters": parameters}]
    response = requests.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=60)
    assert_http_answer_or_client_error(response, model)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (byte_size, offset)):
        return  # gRPC parameters are typed: these cannot be sent
    if not isinstance(region_name, str) or not 0 <= byte_size < 2**63 or not 0 <= offset < 2**63:
        return
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    tensor.parameters["shared_memory_region"].string_param = region_name
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
    tensor.parameters["shared_memory_offset"].int64_param = offset
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            call(request, timeout=60)
        except grpc.RpcError as exc:
            assert_grpc_client_error(exc)


@fuzz_settings(40)
@given(
    name=st.text(max_size=300),
    key=st.text(max_size=40) | json_values,
    offset=sizes,
    byte_size=sizes,
)
def test_hostile_registrations_get_client_errors(
    server: VolleyProcess, name: str, key, offset, byte_size
) -> None:
    """Any region name, key, offset and size: registered (then unregistered), or a 4xx with a
    message; never a 5xx, and nothing outside /dev/shm is opened."""
    response = requests.post(
        f"{server.url}/v2/systemsharedmemory/region/{requests.utils.quote(name, safe='')}/register",
        json={"key": key, "offset": offset, "byte_size": byte_size},
        timeout=60,
    )
    if response.status_code == 200:
        assert isinstance(key, str) and "/" not in key.lstrip("/")
        requests.post(
            f"{server.url}/v2/systemsharedmemory/region/{requests.utils.quote(name, safe='')}"
            "/unregister",
            timeout=60,
        )
    else:
        assert_http_client_error(response)
