"""Triton's classification extension (`server/classification.py`): `tritonclient`'s
`InferRequestedOutput(name, class_count=k)` over HTTP (JSON and binary) and gRPC against a real
server, answered with the top k classes of each row as Triton writes them, labels included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_models
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, serving
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

LABELS = ["cat", "dog", "", "fox", "owl"]  # the third class has no label


def classifier(model_dir: Path, label_filename: str = "labels.txt") -> Path:
    """x FP32 [B, 5] -> probs = x, counts = INT32(x * 100), flags = x > 0.5 (BOOL)."""
    hundred = numpy_helper.from_array(np.array(100, dtype=np.float32), "hundred")
    half = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["probs"]),
         helper.make_node("Mul", ["x", "hundred"], ["scaled"]),
         helper.make_node("Cast", ["scaled"], ["counts"], to=TensorProto.INT32),
         helper.make_node("Greater", ["x", "half"], ["flags"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 5]),
         helper.make_tensor_value_info("counts", TensorProto.INT32, ["batch", 5]),
         helper.make_tensor_value_info("flags", TensorProto.BOOL, ["batch", 5])],
        [hundred, half],
    )  # fmt: skip
    onnx_models.save(graph, model_dir / "1" / "model.onnx")
    (model_dir / "labels.txt").write_text("\n".join(LABELS) + "\n")
    onnx_models.write_config(model_dir, {
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [5]}],
        "outputs": [
            {"name": "probs", "datatype": "FP32", "dims": [5], "label_filename": label_filename},
            {"name": "counts", "datatype": "INT32", "dims": [5]},
            {"name": "flags", "datatype": "BOOL", "dims": [5]},
        ],
    })  # fmt: skip
    return model_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("classification") / "models"
    classifier(root / "classes")
    with serving(root) as server:
        yield server


def expected(rows: np.ndarray, k: int, labels: list[str], integers: bool = False) -> list:
    """Triton's strings for the top k of each row, from the values themselves."""
    answer = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        texts = []
        for i in order:
            text = f"{int(row[i])}:{i}" if integers else f"{row[i]:f}:{i}"
            if i < len(labels) and labels[i]:
                text += f":{labels[i]}"
            texts.append(text.encode())
        answer.append(texts)
    return answer


def texts(array: np.ndarray) -> list:
    """Rows of BYTES elements as bytes (tritonclient gives str for JSON, bytes for binary)."""
    return [[v.encode() if isinstance(v, str) else v for v in row] for row in array.tolist()]


WANTED = [("probs", 3), ("counts", 2)]
X = np.array([[0.1, 0.7, 0.7, 0.05, 0.9], [0.3, 0.2, 0.25, 0.6, 0.1]], dtype=np.float32)


@pytest.mark.parametrize("protocol", ["http-json", "http-binary", "grpc"])
def test_top_classes_with_labels_as_triton_writes_them(
    served: VolleyProcess, protocol: str
) -> None:
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(served.grpc if protocol == "grpc" else served.http)
    x = module.InferInput("x", list(X.shape), "FP32")
    if protocol == "grpc":
        x.set_data_from_numpy(X)
        outputs = [grpcclient.InferRequestedOutput(name, class_count=k) for name, k in WANTED]
    else:
        binary = protocol == "http-binary"
        x.set_data_from_numpy(X, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary, class_count=k)
                   for name, k in WANTED]  # fmt: skip
    result = client.infer("classes", [x], outputs=outputs)
    probs, counts = texts(result.as_numpy("probs")), texts(result.as_numpy("counts"))
    assert probs == expected(X, 3, LABELS)  # a tie (0.7, 0.7): the lower index first
    assert probs[0] == [b"0.900000:4:owl", b"0.700000:1:dog", b"0.700000:2"]
    assert counts == expected((X * 100).astype(np.int32), 2, [], integers=True)
    client.close()


def test_more_classes_than_elements_gives_them_all_and_zero_gives_the_values(
    served: VolleyProcess,
) -> None:
    client = httpclient.InferenceServerClient(served.http)
    x = httpclient.InferInput("x", [1, 5], "FP32")
    x.set_data_from_numpy(X[:1])
    many = client.infer("classes", [x], outputs=[httpclient.InferRequestedOutput(
        "probs", class_count=50)])  # fmt: skip
    assert texts(many.as_numpy("probs")) == expected(X[:1], 5, LABELS)
    plain = client.infer("classes", [x], outputs=[httpclient.InferRequestedOutput(
        "probs", class_count=0)])  # fmt: skip
    np.testing.assert_array_equal(plain.as_numpy("probs"), X[:1])
    client.close()


@pytest.mark.parametrize(
    ("parameters", "said"),
    [
        ({"classification": -1}, "must be a whole number of classes"),
        ({"classification": "3"}, "must be a whole number of classes"),
        ({"classification": True}, "must be a whole number of classes"),
    ],
)
def test_a_bad_class_count_is_refused(served: VolleyProcess, parameters: dict, said: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [0.1] * 5}],
            "outputs": [{"name": "probs", "parameters": parameters}]}  # fmt: skip
    answer = requests.post(f"{served.url}/v2/models/classes/infer", json=body, timeout=10)
    assert answer.status_code == 400 and said in answer.json()["error"]


def test_classes_of_a_boolean_output_are_refused_over_both_protocols(
    served: VolleyProcess,
) -> None:
    cases = [(httpclient, served.http, "400"),
             (grpcclient, served.grpc, "StatusCode.INVALID_ARGUMENT")]  # fmt: skip
    for module, address, code in cases:
        client = module.InferenceServerClient(address)
        x = module.InferInput("x", [1, 5], "FP32")
        x.set_data_from_numpy(X[:1])
        flags = module.InferRequestedOutput("flags", class_count=1)
        with pytest.raises(InferenceServerException, match="classification ranks numbers") as e:
            client.infer("classes", [x], outputs=[flags])
        assert e.value.status() == code
        client.close()


def test_the_model_config_names_the_label_file_and_the_server_lists_the_extension(
    served: VolleyProcess,
) -> None:
    client = httpclient.InferenceServerClient(served.http)
    outputs = {o["name"]: o for o in client.get_model_config("classes")["output"]}
    assert outputs["probs"]["label_filename"] == "labels.txt"
    assert "label_filename" not in outputs["counts"]
    assert "classification" in client.get_server_metadata()["extensions"]
    client.close()


@pytest.mark.parametrize(
    ("label_filename", "said"),
    [("missing.txt", "must name a file"), ("../labels.txt", "must name a file in the model")],
)
def test_a_bad_label_file_stops_the_version_from_loading(
    tmp_path: Path, label_filename: str, said: str
) -> None:
    root = tmp_path / "models"
    classifier(root / "classes", label_filename)
    with serving(root) as server:
        index = requests.post(f"{server.url}/v2/repository/index", timeout=10).json()
        assert index[0]["state"] == "UNAVAILABLE" and said in index[0]["reason"], index
