"""Routing rules: conditions, first match wins, continue, and the dry-run explanation."""
from __future__ import annotations

import subprocess
import sys

import yaml
from pydicom import Dataset

from node.config import Config
from node.routing import SeriesFacts, check, explain, select
from tests import series_factory as make


def config(routes) -> Config:
    return Config.model_validate({"destinations": {"a": {"type": "folder", "path": "/tmp/x"}}, "routes": routes})


def header(**attrs) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_conditions():
    assert check("Modality", ["CR", "DX"], "DX")[0]
    assert not check("Modality", "CT", "MR")[0]
    assert check("BodyPartExamined", "chest", "CHEST")[0]  # case-insensitive
    assert check("SliceThickness", {"min": 2}, "5.0")[0]
    assert not check("SliceThickness", {"min": 2}, "1.25")[0]
    assert not check("SliceThickness", {"min": 2}, None)[0]  # absent never satisfies a range
    assert check("Rows", {"min": 256, "max": 1024}, 512)[0]
    assert check("SeriesDescription", {"pattern": "*t1*"}, "Sag T1 FLAIR")[0]
    assert not check("SeriesDescription", {"pattern": "*t2*"}, "Sag T1 FLAIR")[0]
    ok, why = check("Modality", "CT", None)
    assert not ok and "absent" in why


def test_first_match_wins_unless_continue():
    routes = [
        {"name": "chest", "match": {"Modality": ["CR", "DX"]}, "pipeline": "interp", "send_to": ["a"]},
        {"name": "thick", "match": {"Modality": "CT", "SliceThickness": {"min": 2}}, "pipeline": "interp",
         "send_to": ["a"], "continue": True},
        {"name": "any-ct", "match": {"Modality": "CT"}, "pipeline": "interp", "send_to": ["a"]},
        {"name": "never", "match": {"Modality": "CT"}, "pipeline": "interp", "send_to": ["a"]},
    ]
    cfg = config(routes)
    thick = SeriesFacts(header(Modality="CT", SliceThickness="5"), "STORESCU", 30)
    thin = SeriesFacts(header(Modality="CT", SliceThickness="1"), "STORESCU", 30)
    xr = SeriesFacts(header(Modality="DX"), "STORESCU", 1)
    assert [r.name for r in select(cfg, thick)] == ["thick", "any-ct"]
    assert [r.name for r in select(cfg, thin)] == ["any-ct"]
    assert [r.name for r in select(cfg, xr)] == ["chest"]
    assert select(cfg, SeriesFacts(header(Modality="MR"), None, 3)) == []


def test_calling_ae_and_instance_count():
    cfg = config([{"name": "r", "match": {"calling_ae": "CT01", "instances": {"min": 10}}, "pipeline": "interp",
                   "send_to": ["a"]}])
    assert select(cfg, SeriesFacts(header(Modality="CT"), "CT01", 20))
    assert not select(cfg, SeriesFacts(header(Modality="CT"), "CT02", 20))
    [verdict] = explain(cfg, SeriesFacts(header(Modality="CT"), "CT01", 3))
    assert not verdict.matched and any("instances 3 is not >= 10" in r for r in verdict.reasons)


def test_route_dry_run_cli(tmp_path):
    files = make.ct_small(tmp_path / "ct", "route-cli")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "destinations": {"a": {"type": "folder", "path": "out"}},
        "routes": [
            {"name": "chest", "match": {"Modality": ["CR", "DX"]}, "pipeline": "interp", "send_to": ["a"]},
            {"name": "ct", "match": {"Modality": "CT"}, "pipeline": "interp", "send_to": ["a"]},
        ]}))
    out = subprocess.run([sys.executable, "-m", "node.cli", "route", "--config", str(cfg), "--dry-run", str(files[0])],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "route chest: no match" in out.stdout and "Modality 'CT' is not CR or DX" in out.stdout
    assert "route ct: MATCH" in out.stdout and "-> pipeline interp" in out.stdout
