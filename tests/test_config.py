"""The config file: shipped default valid, every mistake named with its field."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from node.config import ConfigError, load_config
from tests.paths import REPO


def write(tmp_path, data) -> str:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shipped_config_is_valid_and_paths_resolve_next_to_it():
    config = load_config(REPO / "config" / "node.yaml")
    assert config.node.ae_title == "SRNODE" and config.node.port == 11112
    assert config.queue.broker == "embedded"
    assert config.spool == (REPO / "var" / "spool").resolve()


def test_config_check_cli_accepts_shipped_config():
    out = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(REPO / "config" / "node.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "route chest" in out.stdout


@pytest.mark.parametrize("data, words", [
    ({"node": {"ae_title": "WAY_TOO_LONG_AE_TITLE"}}, ["node.ae_title", "1-16"]),
    ({"node": {"port": "eleven"}}, ["node.port"]),
    ({"node": {"prot": 1}}, ["node.prot", "Extra inputs"]),
    ({"node": {"stow_port": 8081}}, ["node.stow_port is gone", "write `http: {port: 8081}` instead"]),
    ({"node": {"port": 11112}, "http": {"port": 11112}}, ["http.port 11112 is also a DICOM port"]),
    ({"http": {"tokens": [{"name": "ops", "role": "root", "token_env": "T"}]}}, ["http.tokens.0.role"]),
    ({"http": {"tokens": [{"name": "a", "role": "admin", "token_env": "T"},
                          {"name": "b", "role": "viewer", "token_env": "T"}]}}, ["two tokens share a token_env"]),
    ({"http": {"tokens": [{"name": "a", "role": "admin"}]}}, ["http.tokens.0.token_env", "Field required"]),
    ({"retention": {"min_free_bytes": -1}}, ["retention.min_free_bytes"]),
    ({"peers": [{"ae_title": "A", "stow_auth": {"type": "basic", "username": "u", "password_env": "P"}},
                {"ae_title": "B", "stow_auth": {"type": "basic", "username": "u", "password_env": "Q"}}]},
     ["share a stow_auth username"]),
    ({"peers": [{"ae_title": "A", "stow_auth": {"type": "bearer"}}]}, ["peers.0.stow_auth", "token_env"]),
    ({"routes": [{"name": "r", "pipeline": "interp", "send_to": ["nowhere"]}]}, ["nowhere", "not a destination"]),
    ({"routes": [{"name": "r", "match": {"Modality": "CT"}, "pipeline": "nope", "send_to": ["a"]}],
      "destinations": {"a": {"type": "folder", "path": "x"}}}, ["unknown pipeline", "nope"]),
    ({"routes": [{"name": "r", "match": {"Modalty": "CT"}, "pipeline": "interp", "send_to": ["a"]}],
      "destinations": {"a": {"type": "folder", "path": "x"}}}, ["Modalty", "not a DICOM keyword"]),
    ({"routes": [{"name": "r", "pipeline": "interp", "options": {"method": "sinc"}, "send_to": ["a"]}],
      "destinations": {"a": {"type": "folder", "path": "x"}}}, ["routes.0", "method"]),
    ({"destinations": {"w": {"type": "dicomweb", "url": "ftp://x"}}}, ["url", "http"]),
    ({"destinations": {"w": {"type": "dicomweb", "url": "http://x", "auth": {"type": "bearer"}}}}, ["token_env"]),
    ({"queue": {"broker": "amqp://x"}}, ["broker", "redis://"]),
    ({"routes": [{"name": "r", "pipeline": "interp", "send_to": ["sender"]}]}, ["sender", "port"]),
])
def test_bad_config_names_the_field(tmp_path, data, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data))
    for word in words:
        assert word in str(err.value)


def test_config_check_cli_fails_with_reason(tmp_path):
    path = write(tmp_path, {"node": {"port": 0}})
    out = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", path], capture_output=True, text=True)
    assert out.returncode != 0 and "node.port" in out.stderr


@pytest.mark.parametrize("cond, words", [
    ({"min": "2mm"}, ["SliceThickness.min", "number"]),
    ({"max": True}, ["SliceThickness.max", "number"]),
    ({"pattern": 5}, ["SliceThickness.pattern", "text"]),
    ({"pattern": "*", "min": 1}, ["pattern alone"]),
])
def test_bad_match_condition_is_refused_at_load_not_at_routing(tmp_path, cond, words):
    data = {"routes": [{"name": "r", "match": {"SliceThickness": cond}, "pipeline": "interp", "send_to": ["a"]}],
            "destinations": {"a": {"type": "folder", "path": "x"}}}
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data))
    for word in words:
        assert word in str(err.value)


def test_a_model_route_without_its_weights_is_refused_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SRNODE_WEIGHTS", str(tmp_path / "no-weights"))
    from pipelines import cxr

    cxr.load_models.cache_clear()
    data = {"routes": [{"name": "chest", "match": {"Modality": "CR"}, "pipeline": "cxr", "send_to": ["a"]}],
            "destinations": {"a": {"type": "folder", "path": "x"}}}
    try:
        with pytest.raises(ConfigError, match="routes.0 .chest.: pipeline 'cxr' cannot run: weights file .* is missing"):
            load_config(write(tmp_path, data))
    finally:
        cxr.load_models.cache_clear()
