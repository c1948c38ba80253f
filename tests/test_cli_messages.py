"""The CLI as an admin meets it: every --help works, and mistakes get one clear line, no traceback."""
from __future__ import annotations

import argparse

import pytest

from node import cli


def _commands() -> list[list[str]]:
    """Every subcommand (and sub-subcommand) of ``srnode``, and each train/eval family."""
    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found += [prefix + [name], *walk(child, prefix + [name])]
        return found

    commands = walk(cli.build_parser(), [])
    families = [[kind, family] for kind in ("train", "eval") for family in cli.FAMILIES]
    return commands + families


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_subcommand_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _config(tmp_path, destinations: dict, send_to: list[str]):
    import yaml

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"ae_title": "SRNODE", "port": 11112, "spool": str(tmp_path / "spool")},
        "peers": [{"ae_title": "STORESCU"}],
        "destinations": destinations,
        "routes": [{"name": "ct-route", "match": {"Modality": "CT"}, "pipeline": "interp", "options": {"scale": 2},
                    "send_to": send_to}],
    }))
    return path


def test_config_check_names_the_route_whose_destination_is_unknown(tmp_path):
    path = _config(tmp_path, {"archive": {"type": "folder", "path": str(tmp_path / "out")}}, ["archvie"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["config", "check", str(path)])
    message = str(exited.value.code)
    assert message.splitlines()[1:] == ["  route 'ct-route': send_to 'archvie' is not a destination "
                                        "(known: ['archive'] or 'sender')"]


def test_echo_to_a_dicomweb_destination_that_is_down_is_one_line(tmp_path, capsys):
    from tests.peers import free_port

    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    path = _config(tmp_path, {"web": {"type": "dicomweb", "url": url}}, ["web"])
    assert cli.main(["echo", "web", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert out == f"DICOMweb {url}: cannot connect (Connection refused): is it running?\n"


@pytest.mark.parametrize("listener", ["DICOM", "HTTP"])
def test_run_with_its_port_taken_says_which_port_in_one_line(tmp_path, listener):
    import socket
    import subprocess
    import sys

    import yaml

    from tests.paths import REPO
    from tests.peers import free_port

    path = _config(tmp_path, {"archive": {"type": "folder", "path": str(tmp_path / "out")}}, ["archive"])
    dicom_port, http_port = free_port(), free_port()
    config = yaml.safe_load(path.read_text())
    config["node"]["port"] = dicom_port
    config["http"] = {"port": http_port, "bind": "127.0.0.1"}
    path.write_text(yaml.safe_dump(config))
    taken = dicom_port if listener == "DICOM" else http_port
    with socket.socket() as holder:
        holder.bind(("0.0.0.0" if listener == "DICOM" else "127.0.0.1", taken))
        holder.listen()
        ran = subprocess.run([sys.executable, "-m", "node.cli", "run", "--config", str(path)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1
    assert "Traceback" not in ran.stderr
    held_by, key = (("another DICOM service (or another srnode)", "node.port") if listener == "DICOM"
                    else ("another web service", "http.port"))
    assert ran.stderr.splitlines()[-1] == (f"srnode: port {taken} ({listener} listener) is already in use: {held_by} "
                                           f"may hold it; stop that or change {key}")


def test_jobs_with_an_unknown_state_lists_the_states(tmp_path):
    from node.ledger import JOB_STATES

    path = _config(tmp_path, {"archive": {"type": "folder", "path": str(tmp_path / "out")}}, ["archive"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["jobs", "--config", str(path), "--state", "bogus"])
    states = ", ".join(JOB_STATES)
    assert str(exited.value.code) == f"srnode: --state 'bogus' is not a job state; the states are {states}"


def test_route_dry_run_says_whether_the_series_loader_would_refuse_the_series(tmp_path, capsys):
    from tests.synthetic import ct_series, write_all

    path = _config(tmp_path, {"archive": {"type": "folder", "path": str(tmp_path / "out")}}, ["archive"])
    (tmp_path / "gaps").mkdir()
    (tmp_path / "regular").mkdir()
    write_all(ct_series(4, offsets=[0, 5, 10, 20]), tmp_path / "gaps")
    write_all(ct_series(3), tmp_path / "regular")
    for folder, verdict in (("gaps", "series check: OK, a volume of 4 slice(s) of 128x128, pixels 0.661468x0.661468 "
                                     "mm; irregular slice spacing (gaps from 5.00 to 10.00 mm): a route's through-plane "
                                     "resampling is left out (in-plane only)"),
                            ("regular", "series check: OK, a volume of 3 slice(s) of 128x128, pixels "
                                        "0.661468x0.661468 mm, slices 5 mm apart")):
        assert cli.main(["route", "--config", str(path), "--dry-run", str(tmp_path / folder)]) == 0
        out = capsys.readouterr().out
        assert "route ct-route: MATCH" in out and out.splitlines()[-1] == f"  {verdict}"


def test_route_dry_run_gives_each_matched_route_its_own_verdict(tmp_path, capsys):
    """A tilted series: a route that only resamples between slices would be refused (with the job's own
    reason); one that also works in-plane would run (in-plane only)."""
    import yaml

    from tests.synthetic import ct_series, write_all

    path = _config(tmp_path, {"archive": {"type": "folder", "path": str(tmp_path / "out")}}, ["archive"])
    config = yaml.safe_load(path.read_text())
    config["routes"] = [
        {"name": "slices-only", "match": {"Modality": "CT"}, "pipeline": "interp", "options": {"through_scale": 2},
         "send_to": ["archive"], "continue": True},
        {"name": "both", "match": {"Modality": "CT"}, "pipeline": "interp", "options": {"scale": 2, "through_scale": 2},
         "send_to": ["archive"]},
    ]
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "tilted").mkdir()
    write_all(ct_series(4, shear_mm=2.0), tmp_path / "tilted")
    assert cli.main(["route", "--config", str(path), "--dry-run", str(tmp_path / "tilted")]) == 0
    lines = capsys.readouterr().out.splitlines()
    jobs = [(lines[i - 1], line) for i, line in enumerate(lines) if line.startswith("    job: ")]
    assert jobs == [
        ("    -> pipeline interp {'through_scale': 2}, send to archive",
         "    job: REFUSED, it would say: through-plane resampling needs regularly spaced slices along their normal; "
         "this series has gantry tilt 21.8 deg (slice positions are not along the slice normal) (an in-plane factor "
         "would still apply)"),
        ("    -> pipeline interp {'scale': 2, 'through_scale': 2}, send to archive",
         "    job: OK, the pipeline takes this series with these options")]


def test_pipelines_refuse_when_run_is_called_not_while_outputs_are_taken():
    """What the dry run's verdict rests on: ``run`` is no generator (its refusals come with the call),
    and no generator in pipelines/ raises a Refusal itself (a refusal halfway through the outputs)."""
    import ast
    import inspect

    import pipelines
    from tests.paths import REPO

    assert [name for name in pipelines.names() if inspect.isgeneratorfunction(type(pipelines.get(name)).run)] == []
    late = []
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            inner = {id(n) for sub in ast.walk(fn) if sub is not fn and isinstance(sub, (ast.FunctionDef, ast.Lambda))
                     for n in ast.walk(sub)}
            own = [n for n in ast.walk(fn) if id(n) not in inner]
            if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in own) and any(
                    isinstance(n, ast.Raise) and n.exc is not None and "Refusal" in ast.unparse(n.exc) for n in own):
                late.append(f"{path.relative_to(REPO)}: {fn.name}")
    assert late == []
