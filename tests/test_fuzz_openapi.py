"""schemathesis against the HTTP API's own OpenAPI schema (`/v2/openapi.json`), on a live server.

The served schema describes every FastAPI route; the infer routes (a raw ASGI fast path, not in
it) are added here with the KServe v2 request body, so schemathesis fuzzes their JSON as well.
Model and version path parameters may also take the served names, so generated requests reach
real models, not only 404s. Every answer must be a success or a 4xx with a JSON
`{"error": ...}` (503 only from readiness routes, 501 only for shared memory), and after each
test the server must still be live and ready and give fraud's answer unchanged.
"""

from __future__ import annotations

import copy
import http.client
import json

import pytest
import requests
import schemathesis
from conftest import VolleyProcess
from fuzzing import (
    DATATYPES,
    MODELS,
    TIMEOUT,
    assert_http_client_error,
    fuzz_settings,
    watchdog_fixtures,
)
from hypothesis import given
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.timeout(300)

TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"anyOf": [{"enum": list(DATATYPES)}, {"type": "string"}]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": TENSOR},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
SERVED_OR_ANY = {"anyOf": [{"enum": list(MODELS)}, {"type": "string"}]}
VERSION_OR_ANY = {"anyOf": [{"enum": ["1", "2", "0", "-1"]}, {"type": "string"}]}


def path_parameter(name: str, schema: dict) -> dict:
    """A required path parameter."""
    return {"name": name, "in": "path", "required": True, "schema": schema}


def infer_operation(with_version: bool) -> dict:
    """POST .../infer with the v2 JSON body (the fast path FastAPI does not describe)."""
    parameters = [path_parameter("model", SERVED_OR_ANY)]
    if with_version:
        parameters.append(path_parameter("version", VERSION_OR_ANY))
    return {
        "post": {
            "operationId": "model_infer" + ("_version" if with_version else ""),
            "parameters": parameters,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": INFER_REQUEST}},
            },
            "responses": {"200": {"description": "the outputs"}},
        }
    }


def completed_schema(served: dict) -> dict:
    """The served schema, plus the infer routes, with served names among the path values."""
    doc = copy.deepcopy(served)
    doc["paths"]["/v2/models/{model}/infer"] = infer_operation(False)
    doc["paths"]["/v2/models/{model}/versions/{version}/infer"] = infer_operation(True)
    for operations in doc["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "model":
                    parameter["schema"] = SERVED_OR_ANY
                elif parameter["in"] == "path" and parameter["name"] == "version":
                    parameter["schema"] = VERSION_OR_ANY
    return doc


baseline, still_serving = watchdog_fixtures("shipped")


@pytest.fixture(scope="module")
def served_schema(shipped: VolleyProcess) -> dict:
    """The schema as the server publishes it."""
    response = requests.get(f"{shipped.url}/v2/openapi.json", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def api_schema(served_schema: dict) -> schemathesis.BaseSchema:
    """The completed schema, loaded by schemathesis."""
    return schemathesis.openapi.from_dict(completed_schema(served_schema))


def check_answer(case: schemathesis.Case, response: requests.Response) -> None:
    """A success, or a 4xx with a JSON error; 503 only for readiness, 501 for shared memory
    registration (an extension Volley refuses by name) and a trace file chosen by a client."""
    if response.status_code < 400:
        return
    label = f"{case.method} {case.formatted_path}"
    if response.status_code == 503 and case.path.endswith("/ready"):
        assert response.json()["error"], label
        return
    message = assert_http_client_error(response, 501)
    if response.status_code == 501:
        shared_memory = "/register" in case.path and "shared memory" in message
        trace = case.path.endswith("/trace/setting") and "trace_file can only be" in message
        assert shared_memory or trace, (label, message)


def destructive(case: schemathesis.Case) -> bool:
    """An unload of a model the other tests need (the server would rightly obey it)."""
    return case.path.endswith("/unload") and case.path_parameters.get("model") in MODELS


def run_operations(
    schema: schemathesis.BaseSchema, base_url: str, mode: GenerationMode, examples: int
) -> list[str]:
    """Run every operation's generated cases in `mode`; the labels of those that had some."""
    ran = []
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        count = examples * (10 if operation.path.endswith("/infer") else 1)

        @fuzz_settings(max_examples=count)
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            if destructive(case):
                return
            check_answer(case, case.call(base_url=base_url, session=session, timeout=TIMEOUT))

        try:
            check()
        except Unsatisfiable:
            continue  # nothing to get wrong in `mode` (no parameters, or strings only)
        ran.append(operation.label)
    session.close()
    return ran


def test_every_route_answers_generated_requests_without_a_server_error(
    shipped: VolleyProcess, api_schema: schemathesis.BaseSchema
) -> None:
    """Schema-valid requests to every route (random names, versions, regions, bodies)."""
    ran = run_operations(api_schema, shipped.url, GenerationMode.POSITIVE, examples=25)
    assert len(ran) == len(list(api_schema.get_all_operations())), ran


def test_schema_violating_requests_are_refused_without_a_server_error(
    shipped: VolleyProcess, api_schema: schemathesis.BaseSchema
) -> None:
    """Requests that break the schema (wrong types in bodies and queries) where one can."""
    ran = run_operations(api_schema, shipped.url, GenerationMode.NEGATIVE, examples=25)
    assert "POST /v2/models/{model}/infer" in ran, ran


def test_wrong_methods_get_405_with_a_json_error(
    shipped: VolleyProcess, api_schema: schemathesis.BaseSchema
) -> None:
    """Every route asked with a method it does not take: 405 and `{"error": ...}`."""
    for result in api_schema.get_all_operations():
        operation = result.ok()
        path = operation.path.replace("{model}", "fraud").replace("{version}", "1")
        path = path.replace("{region}", "r")
        method = "DELETE" if operation.method.upper() != "DELETE" else "PUT"
        response = requests.request(method, shipped.url + path, timeout=TIMEOUT)
        assert_http_client_error(response, 405)
        assert response.status_code == 405, (method, path)


@pytest.mark.parametrize("name", ["..", "."])
def test_load_outside_the_repository_is_refused_and_leaves_no_trace(
    shipped: VolleyProcess, name: str
) -> None:
    """A load of '..' or '.' (folders outside the models) is a client error, the index never
    lists it, and readiness stays (before, both entered the index and made ready 503)."""

    def post(action: str) -> tuple[int, dict]:
        # http.client sends the path as written (requests would drop its dot segments).
        connection = http.client.HTTPConnection(shipped.http, timeout=TIMEOUT)
        try:
            connection.request("POST", f"/v2/repository/models/{name}/{action}")
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read())
        finally:
            connection.close()

    try:
        status, body = post("load")
        assert status in (400, 404) and body["error"], (status, body)
        index = requests.post(f"{shipped.url}/v2/repository/index", timeout=TIMEOUT).json()
        assert {row["name"] for row in index} == set(MODELS), index
        ready = requests.get(f"{shipped.url}/v2/health/ready", timeout=TIMEOUT)
        assert ready.status_code == 200, ready.text
    finally:
        post("unload")


VERSIONED_ROUTES = ("", "/config", "/stats", "/ready")


@pytest.mark.parametrize("version", ["²", "①", "1²"])
def test_versions_that_are_digits_but_not_numbers_are_refused(
    shipped: VolleyProcess, version: str
) -> None:
    """Unicode digits that are no decimal number ('²', '①'): 400 or 404 on every route."""
    for route in VERSIONED_ROUTES:
        url = f"{shipped.url}/v2/models/fraud/versions/{version}{route}"
        assert_http_client_error(requests.get(url, timeout=TIMEOUT))
    url = f"{shipped.url}/v2/models/fraud?version={version}"
    assert_http_client_error(requests.get(url, timeout=TIMEOUT))
