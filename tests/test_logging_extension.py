"""Triton's logging extension (`server/log_settings.py`): `tritonclient`'s `get_log_settings` and
`update_log_settings` over HTTP and gRPC, against a real server whose log shows the effect; with
`--workers 2` a change reaches both workers, and a worker that restarts keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_models
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, replace_a_worker, serving
from tritonclient.utils import InferenceServerException

STARTED_AT_INFO = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "json",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("logging") / "models"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx", features=8, hidden=16)
    onnx_models.mlp(root / "other" / "1" / "model.onnx", features=8, hidden=16)
    return root


def events(server: VolleyProcess, name: str) -> list[dict]:
    """The server's log lines of event `name`."""
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def unload_and_load(server: VolleyProcess, model: str) -> None:
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client:
        client.unload_model(model)
        client.load_model(model)


def test_settings_over_http_change_what_the_server_logs(models: Path) -> None:
    with serving(models) as server:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        assert client.get_log_settings() == STARTED_AT_INFO
        assert "logging" in client.get_server_metadata()["extensions"]

        quiet = client.update_log_settings({"log_info": False, "log_verbose_level": 2})
        assert quiet == {**STARTED_AT_INFO, "log_info": False, "log_verbose_level": 2}
        unload_and_load(server, "other")
        assert events(server, "model_unloaded") == []  # an info record, switched off

        assert client.update_log_settings({"log_info": None}) == {  # null: back to the start
            **STARTED_AT_INFO, "log_verbose_level": 2
        }  # fmt: skip
        unload_and_load(server, "other")
        assert [e["model"] for e in events(server, "model_unloaded")] == ["other"]
        assert events(server, "model_unloaded")[0]["level"] == "info"
        client.close()


def test_settings_over_grpc(models: Path) -> None:
    with serving(models) as server:
        client = grpcclient.InferenceServerClient(server.grpc)
        assert client.get_log_settings(as_json=True)["settings"] == {
            "log_file": {"string_param": ""},
            "log_info": {"bool_param": True},
            "log_warning": {"bool_param": True},
            "log_error": {"bool_param": True},
            "log_verbose_level": {"uint32_param": 0},
            "log_format": {"string_param": "json"},
        }
        answer = client.update_log_settings({"log_info": False, "log_verbose_level": 1})
        assert answer.settings["log_info"].bool_param is False
        assert answer.settings["log_verbose_level"].uint32_param == 1
        unload_and_load(server, "other")
        assert events(server, "model_unloaded") == []
        with pytest.raises(InferenceServerException, match="unknown log setting 'log_colour'"):
            client.update_log_settings({"log_colour": True})
        with pytest.raises(InferenceServerException, match="StatusCode.INVALID_ARGUMENT"):
            client.update_log_settings({"log_file": "/tmp/volley.log"})
        client.close()


@pytest.fixture(scope="module")
def server(models: Path):
    with serving(models) as proc:
        yield proc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"log_colour": True}, "unknown log setting 'log_colour'"),
        ({"log_info": 1}, "'log_info' must be a boolean"),
        ({"log_verbose_level": True}, "'log_verbose_level' must be an integer"),
        ({"log_verbose_level": -1}, "must be 0 to 4294967295"),
        ({"log_file": "/etc/passwd"}, "'log_file' can only be ''"),
        ({"log_format": "ISO8601"}, "'log_format' can only be 'json'"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(
    server: VolleyProcess, change: dict, message: str
) -> None:
    """A request with one bad setting changes none, the good ones beside it included."""
    reply = requests.post(
        f"{server.url}/v2/logging", json={"log_info": False, **change}, timeout=10
    )
    assert reply.status_code == 400
    assert message in reply.json()["error"]
    assert requests.get(f"{server.url}/v2/logging", timeout=10).json() == STARTED_AT_INFO


def test_a_change_reaches_every_worker_and_one_that_restarts(models: Path) -> None:
    with serving(models, "--workers", "2") as server:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        client.update_log_settings({"log_info": False})
        unload_and_load(server, "other")  # every worker unloads: none may say so
        assert events(server, "model_unloaded") == []

        replace_a_worker(server)
        unload_and_load(server, "other")
        assert events(server, "model_unloaded") == []  # the replacement got the settings

        assert client.get_log_settings()["log_info"] is False
        client.update_log_settings({"log_info": True})
        unload_and_load(server, "other")
        assert sorted(e["worker"] for e in events(server, "model_unloaded")) == [0, 1]
        client.close()


def test_only_an_admin_key_reads_or_changes_them(models: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n  - {name: app, key: infer-key-0123456789abcdef, scope: infer}\n"
        "  - {name: ops, key: admin-key-0123456789abcdef, scope: admin}\n"
    )
    with serving(models, "--api-keys", str(keys)) as server:
        infer = {"authorization": "Bearer infer-key-0123456789abcdef"}
        admin = {"authorization": "Bearer admin-key-0123456789abcdef"}
        url = f"{server.url}/v2/logging"
        assert (
            requests.post(url, json={"log_info": False}, headers=infer, timeout=10).status_code
            == 403
        )
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, headers=admin, timeout=10).json() == STARTED_AT_INFO
        with grpcclient.InferenceServerClient(server.grpc) as client:
            with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
                client.update_log_settings({"log_info": False}, headers=infer)
            client.update_log_settings({"log_info": False}, headers=admin)
        assert requests.get(url, headers=admin, timeout=10).json()["log_info"] is False
