"""``srnode``: run the node, a worker, offline processing and the admin commands."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import re
import shutil
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

log = logging.getLogger("srnode")
DEFAULT_CONFIG = os.environ.get("SRNODE_CONFIG", "config/node.yaml")


def _setup_logging(level: str = "INFO") -> None:
    from node.log_format import install

    install(level)  # control characters escaped in every line (pynetdicom's and Celery's too)
    if level != "DEBUG":  # pynetdicom logs several INFO lines per instance: noise, and time on the hot path
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    import pydicom

    # pydicom's warnings about invalid values quote them: a sender's text, patient data included.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _load(path: str, check_pipelines: bool = True):
    from node.config import ConfigError, load_config

    try:
        return load_config(path, check_pipelines=check_pipelines)
    except ConfigError as exc:
        sys.exit(f"srnode: {exc}")


def _options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"srnode: --set takes key=value, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def read_inputs(inputs: list[str]) -> tuple[dict[str, list], list[str]]:
    """Files and folders -> datasets grouped by series; and the files that are not DICOM."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            sys.exit(f"srnode: {item} does not exist")
    series: dict[str, list] = defaultdict(list)
    skipped = []
    for path in files:
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped.append(str(path))
            continue
        uid = str(ds.get("SeriesInstanceUID", "")).strip() or f"(no Series Instance UID) {path.parent}"
        series[uid].append(ds)
    return series, skipped


# -- commands -------------------------------------------------------------------------------
def cmd_run(args) -> int:
    config = _load(args.config)
    _setup_logging(config.node.log_level)
    from node.server import Node

    try:
        Node(config).serve_forever()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            sys.exit(f"srnode: {_port_in_use(exc, config)}")
        why = _spool_unusable(exc, config)
        if why is None:
            raise
        sys.exit(f"srnode: cannot start: {why}")
    except sqlite3.Error as exc:
        why = _spool_unusable(exc, config)
        if why is None:
            raise
        sys.exit(f"srnode: cannot start: {why}")
    return 0


def _spool_unusable(exc: BaseException, config) -> str | None:
    """Why the spool keeps the node from starting, in one line an admin can act on; None when
    ``exc`` is something else. A disk with a little room left does not get here: the node starts
    and refuses instances below ``retention.min_free_bytes``. With none at all, not even the ledger
    can be opened (SQLite needs room for its WAL index)."""
    import shutil

    from node.spool import disk_full

    spool = config.node.spool
    try:
        free = shutil.disk_usage(spool).free
    except OSError:
        free = None
    what = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
    if disk_full(exc) or (isinstance(exc, sqlite3.Error) and free is not None and free < (1 << 20)):
        return (f"the spool's disk is full ({free} bytes free in {spool}; {what}). Free some space there "
                f"(the node takes instances above retention.min_free_bytes = {config.retention.min_free_bytes}) "
                "and start it again")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the spool {spool} is not writable ({what})"
    return None


def _port_in_use(exc: OSError, config) -> str:
    """Which listener's port is taken, said as an admin can act on it. The port is read from the failed
    bind's frames, innermost first (a socketserver's server_address, a ``port`` variable, or a config
    section's ``port``), else from the address in asyncio's message."""
    listeners = {config.node.port: ("DICOM", "node.port")}
    if config.node.tls:
        listeners[config.node.tls.port] = ("DICOM TLS", "node.tls.port")
    if getattr(config, "http", None) is not None:
        listeners[config.http.port] = ("HTTP", "http.port")
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_locals)
        tb = tb.tb_next
    candidates = [int(m) for m in re.findall(r"'?, (\d+)\)", str(exc))]
    for names in reversed(frames):
        address = getattr(names.get("self"), "server_address", None)
        candidates += [address[1]] if isinstance(address, tuple) and len(address) > 1 else []
        candidates += [names["port"]] if isinstance(names.get("port"), int) else []
        candidates += [v.port for v in names.values() if isinstance(getattr(v, "port", None), int)]
    port = next((c for c in candidates if c in listeners), None)
    if port is None:
        return (f"a port the node listens on is already in use ({exc.strerror}): "
                "check node.port, node.tls.port, http.port")
    kind, key = listeners[port]
    held_by = "another DICOM service (or another srnode)" if kind.startswith("DICOM") else "another web service"
    return f"port {port} ({kind} listener) is already in use: {held_by} may hold it; stop that or change {key}"


def cmd_worker(args) -> int:
    config = _load(args.config)
    _setup_logging(config.node.log_level)
    from node.celery_app import PIPELINE_QUEUE, configure

    app = configure(config)
    import node.tasks  # noqa: F401  (registers the task)

    argv = ["worker", f"--loglevel={config.node.log_level}", "-Q", PIPELINE_QUEUE,
            "--without-gossip", "--without-mingle", "-n", f"srnode-{os.getpid()}@%h"]
    if args.embedded or args.concurrency == 1:
        argv += ["--pool", "solo"]
    else:
        argv += ["--pool", "prefork", "--concurrency", str(args.concurrency)]
    if args.embedded:
        argv += ["--without-heartbeat"]
    app.worker_main(argv)
    return 0


def cmd_process(args) -> int:
    _setup_logging("WARNING")
    import pipelines
    from pipelines.progress import Progress

    from node.jobs import qa_folder, run_pipeline

    options = _options(args.set)
    try:
        pipelines.get(args.pipeline).validate_options(options)
    except ValueError as exc:
        sys.exit(f"srnode: {exc}")
    series, skipped = read_inputs(args.inputs)
    out = Path(args.out)
    tmp = out / "tmp-in-progress"
    summary = {"pipeline": args.pipeline, "options": options, "skipped_not_dicom": skipped, "series": []}
    for uid, datasets in series.items():
        entry = {"input_series": uid, "instances": len(datasets)}
        bar = Progress(f"series {uid[-12:]}", unit="images", every_s=10, enabled=not args.quiet)

        def progress(done: int, total: int) -> None:
            bar.update(done, total)

        try:
            outputs = run_pipeline(datasets, args.pipeline, options, tmp, progress=progress)
        except pipelines.Refusal as exc:
            entry.update(status="refused", reason=str(exc))
        except pipelines.InvalidOutput as exc:  # its outputs are left out (tmp-in-progress is emptied)
            entry.update(status="failed", reason=str(exc))
        except Exception as exc:  # report it and carry on with the next series
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        else:
            by_series = defaultdict(list)
            for o in outputs:
                target = out / o.series_uid / f"{o.sop_uid}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(o.path, target)
                by_series[o.series_uid].append(str(target))
            entry.update(status="done", outputs=[
                {"series_uid": s, "instances": len(f), "folder": str(out / s), **_move_qa(qa_folder(tmp, s), out / s)}
                for s, f in by_series.items()])
        finally:
            bar.close()
        summary["series"].append(entry)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if summary["series"] and all(s["status"] == "done" for s in summary["series"]) else 1


def _move_qa(folder: Path, target: Path) -> dict:
    """``qa.png`` and ``qa.json`` of one output series moved beside its DICOM files; the verdict for
    the summary (nothing when no QA was made)."""
    if not (folder / "qa.json").exists():
        return {}
    record = json.loads((folder / "qa.json").read_text())
    for name in ("qa.png", "qa.json"):
        os.replace(folder / name, target / name)
    return {"qa": {"consistency_psnr_db": record["consistency"]["psnr_db"], "threshold_db": record["threshold_db"],
                   "passed": record["passed"]}}


def cmd_echo(args) -> int:
    config = _load(args.config, check_pipelines=False)
    from node.dispatch import check

    if args.destination not in config.destinations:
        sys.exit(f"srnode: no destination {args.destination!r} in {args.config} (known: {sorted(config.destinations)})")
    ok, text = check(config, config.destinations[args.destination])
    print(text)
    return 0 if ok else 1


def cmd_config_check(args) -> int:
    config = _load(args.file)
    from node.tls import check_files

    problems, warnings = check_files(config)
    if problems:
        sys.exit("\n".join([f"srnode: {args.file}: {len(problems)} problem(s)", *("  " + p for p in problems)]))
    print(f"{args.file}: OK")
    for warning in warnings:
        print(f"  warning: {warning}")
    node = config.node
    plain = f"{node.bind}:{node.port}" if node.port else "no plain port"
    print(f"  listens as {node.ae_title} on {plain}, spool {config.spool}")
    if node.tls:
        clients = ("client certificate required" if node.tls.require_client_certificate
                   else "client certificate optional" if node.tls.ca_certificates else "no client certificates")
        print(f"  DICOM TLS on {node.bind}:{node.tls.port} ({clients}); "
              f"TLS-only peers: {', '.join(p.ae_title for p in config.peers if p.tls) or 'none'}")
    limits = node.limits
    print(f"  limits: PDU {limits.max_pdu_bytes} bytes, A-ASSOCIATE-RQ within {limits.association_request_timeout_s:g} s,"
          f" idle {limits.idle_timeout_s:g} s, per host {limits.max_associations_per_host} associations"
          f" + {limits.max_pending_per_host} waiting")
    print(f"  peers: {', '.join(p.ae_title + (f'@{p.host}' if p.host else '') for p in config.peers) or 'none (every association will be rejected)'}")
    if config.http is not None:
        senders = [p.ae_title for p in config.peers if p.stow_auth]
        unset = [p.ae_title for p in config.peers if p.stow_auth and not os.environ.get(p.stow_auth.secret_env)]
        print(f"  HTTP on {config.http.bind}:{config.http.port}: STOW-RS /dicom-web/studies for "
              f"{', '.join(senders) or 'no peer (give one stow_auth)'}"
              + (f"; credentials not set in this environment for {', '.join(unset)}" if unset else ""))
        tokens = [f"{t.name} ({t.role})" + ("" if os.environ.get(t.token_env) else f": {t.token_env} not set")
                  for t in config.http.tokens]
        print(f"  tokens: {', '.join(tokens) or 'none (only /healthz and STOW-RS are served)'}")
    elif any(p.stow_auth for p in config.peers):
        print("  STOW-RS is off (no http section): the peers' stow_auth is not used")
    for name, dest in config.destinations.items():
        print(f"  destination {name}: {dest.type}" + (" over TLS" if getattr(dest, "tls", None) else ""))
    for route in config.routes:
        print(f"  route {route.name}: {route.pipeline} {route.options} -> {', '.join(route.send_to)}")
    print(f"  queue: {config.queue.broker}; series complete after {config.completion.quiet_seconds} s quiet")
    return 0


def cmd_route(args) -> int:
    config = _load(args.config)
    from node.routing import SeriesFacts, explain

    series, skipped = read_inputs(args.inputs)
    for path in skipped:
        print(f"{path}: not a DICOM file, skipped")
    for uid, datasets in series.items():
        facts = SeriesFacts(datasets[0], args.calling_ae, len(datasets))
        print(f"series {uid} ({datasets[0].get('Modality', '?')}, {len(datasets)} instances)")
        chosen = False
        for verdict in explain(config, facts):
            if chosen:
                print(f"  route {verdict.route.name}: not evaluated (an earlier route matched)")
                continue
            print(f"  route {verdict.route.name}: {'MATCH' if verdict.matched else 'no match'}")
            for reason in verdict.reasons:
                print(f"    {reason}")
            if verdict.matched:
                print(f"    -> pipeline {verdict.route.pipeline} {verdict.route.options}, send to {', '.join(verdict.route.send_to)}")
                print(f"    {_job_check(datasets, verdict.route)}")
                chosen = not verdict.route.continue_
        if not any(v.matched for v in explain(config, facts)):
            print("  -> no route matches: the series would be stored and not processed")
        print(f"  {_series_check(datasets)}")
    return 0


def _job_check(datasets: list, route) -> str:
    """What the job this route makes of the series would say: the pipeline's ``run`` raises its
    refusals when called, before the first output is taken (the :class:`pipelines.Pipeline` contract),
    so calling it without taking an output is the job's own verdict; nothing is computed or written
    (the series is read, and the weights the options need are loaded)."""
    import pipelines

    try:
        pipe = pipelines.get(route.pipeline)
        outputs = pipe.run(datasets, pipe.validate_options(route.options), pipelines.RunContext(uid_seed="dry-run"))
    except pipelines.Refusal as exc:
        return f"job: REFUSED, it would say: {exc}"
    except Exception as exc:  # bad options or weights: `srnode config check` says more
        return f"job: cannot tell ({type(exc).__name__}: {exc})"
    getattr(outputs, "close", lambda: None)()
    return "job: OK, the pipeline takes this series with these options"


def _series_check(datasets: list) -> str:
    """What the pipelines' series loader makes of these instances: the volume or images, or its refusal
    (tilt, gaps, mixed matrices, ...), whatever the route."""
    from pipelines import Refusal
    from pipelines.dicom.series import Volume, load_series

    try:
        loaded = load_series(datasets)
    except Refusal as exc:
        return f"series check: REFUSED, a job would say: {exc}"
    if isinstance(loaded, Volume):
        slices, rows, columns = loaded.shape
        spacing = f", slices {loaded.slice_spacing:g} mm apart" if loaded.slice_spacing else ""
        if loaded.irregular:  # pipelines.dicom.series.in_plane_only decides from the same note
            spacing = f"; {loaded.irregular}: a route's through-plane resampling is left out (in-plane only)"
        return (f"series check: OK, a volume of {slices} slice(s) of {rows}x{columns}, pixels "
                f"{loaded.pixel_spacing[0]:g}x{loaded.pixel_spacing[1]:g} mm{spacing}")
    return f"series check: OK, {len(loaded)} projection image(s)"


def _spool(args):
    config = _load(args.config, check_pipelines=False)
    from node.spool import Spool

    spool = Spool(config.spool)
    if not spool.ledger_path.exists():
        sys.exit(f"srnode: no ledger at {spool.ledger_path} (has the node run with this config?)")
    return spool


def _ledger(args):
    from node.ledger import Ledger

    return Ledger(_spool(args).ledger_path)


def _cli_actor() -> str:
    """Who an admin action from the command line is audited as."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid {os.getuid()}"


def _duration(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = max(end - start, 0.0)
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.1f}m" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def cmd_jobs(args) -> int:
    from node.ledger import JOB_STATES

    if args.state and args.state not in JOB_STATES:
        sys.exit(f"srnode: --state {args.state!r} is not a job state; the states are {', '.join(JOB_STATES)}")
    ledger = _ledger(args)
    jobs = ledger.jobs([args.state] if args.state else None, limit=args.limit, newest_first=True)
    rows = [ledger.describe(job) for job in jobs]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no jobs")
        return 0
    now = time.time()
    print(f"{'id':>6}  {'state':<12} {'updated':<19}  {'route/pipeline':<22} {'mod':<4} {'series':<24} "
          f"{'in->out':>9}  {'queued':>6} {'ran':>6} {'sent':>6} {'total':>6}  deliveries")
    for r in rows:
        deliveries = " ".join(f"{k}={v}" for k, v in sorted(r["deliveries"].items())) or "-"
        state = r["state"] if r["progress"] is None else f"running {100 * r['progress']:.0f}%"
        counts = f"{r['instances_in'] if r['instances_in'] is not None else '?'}->" \
                 f"{r['instances_out'] if r['instances_out'] is not None else '-'}"
        end = r["delivered"] or (r["finished"] if r["state"] in ("refused", "failed") else None) or \
            (now if r["state"] in ("pending", "queued", "dispatching") else r["updated"])
        description = (r["series_description"] or "")[:24]
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated"]))
        print(f"{r['id']:>6}  {state:<12} {updated}  {(r['route'] + '/' + r['pipeline'] + ' v' + str(r['version'])):<22} "
              f"{(r['modality'] or '?'):<4} {description:<24} {counts:>9}  "
              f"{_duration(r['complete'], r['started']):>6} "
              f"{_duration(r['started'], r['finished'] or (now if r['progress'] is not None else None)):>6} "
              f"{_duration(r['finished'], r['delivered']):>6} {_duration(r['received'] or r['complete'], end):>6}"
              f"  {deliveries}" + (f"  ({r['reason']})" if r["reason"] else ""))
    return 0


def cmd_retry(args) -> int:
    from node.audit import Audit
    from node.ledger import Ledger

    spool = _spool(args)
    ledger = Ledger(spool.ledger_path)
    ids = [args.job] if args.job is not None else [j.id for j in ledger.jobs(["parked", "failed", "waiting_disk"], limit=100000)]
    if not ids:
        print("nothing parked, failed or waiting for disk space")
    for job_id in ids:
        try:
            outcome = ledger.retry(job_id)
        except KeyError as exc:
            sys.exit(f"srnode: {exc.args[0]}")
        Audit(spool.audit_dir).record("admin", actor=_cli_actor(), action="retry", job=job_id, outcome=outcome)
        print(outcome)
    return 0


def cmd_reload(args) -> int:
    import signal

    from node.reload import pid_path, read_answer, request_path
    from node.spool import Spool, write_json

    from node.config import ConfigError, NodeSection, load_config

    try:  # only the spool is needed here: the node checks the whole file itself, logs and audits
        spool = Spool(load_config(args.config, check_pipelines=False).spool)
    except ConfigError as exc:
        try:
            raw = (yaml.safe_load(Path(args.config).read_text()) or {}).get("node") or {}
            spool = Spool((Path(args.config).resolve().parent / Path(raw.get("spool") or NodeSection().spool)).resolve())
        except (OSError, yaml.YAMLError, AttributeError, TypeError):
            sys.exit(f"srnode: {exc}")
    try:
        pid = int(pid_path(spool.root).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        sys.exit(f"srnode: no node is running with the spool {spool.root} (no live pid in {pid_path(spool.root)})")
    started = time.time()
    write_json(request_path(spool.root), {"actor": _cli_actor()})
    os.kill(pid, signal.SIGHUP)
    deadline = started + args.timeout
    while time.time() < deadline:
        answer = read_answer(spool.root)
        if answer and answer.get("at", 0) >= started and answer.get("pid") == pid:
            if answer["ok"]:
                print(f"reloaded: {'; '.join(answer['changes']) or 'no change'}")
                return 0
            print("refused, the running config stays:", file=sys.stderr)
            for reason in answer["reasons"]:
                print(f"  {reason}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    sys.exit(f"srnode: the node (pid {pid}) did not answer within {args.timeout:.0f} s; see its log")


def cmd_audit(args) -> int:
    from node.audit import parse_since, read

    spool = _spool(args)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        sys.exit(f"srnode: {exc}")
    events = read(spool.audit_dir, since=since, limit=args.limit)
    if args.json:
        json.dump(events, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for e in events:
        rest = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in e.items()
                        if k not in ("ts", "at", "event"))
        print(f"{e.get('at', '?')}  {e.get('event', '?'):<22} {rest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srnode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"node config file (default {DEFAULT_CONFIG})")
        return p

    p = with_config(sub.add_parser("run", help="run the node (listener + embedded worker)"))
    p.set_defaults(func=cmd_run)
    p = with_config(sub.add_parser("worker", help="run a Celery worker for pipelines (Redis mode, other hosts)"))
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1: one worker per GPU)")
    p.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("process", help="offline: DICOM files or folders in, DICOM files out, JSON summary on stdout")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="pipeline option (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else a line every 10 s)")
    p.set_defaults(func=cmd_process)
    p = with_config(sub.add_parser("echo", help="check a destination: C-ECHO, QIDO-RS or a write test"))
    p.add_argument("destination")
    p.set_defaults(func=cmd_echo)
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a config file")
    c.add_argument("file")
    c.set_defaults(func=cmd_config_check)
    p = with_config(sub.add_parser("route", help="show which route each series would take, and why"))
    p.add_argument("--dry-run", action="store_true", required=True, help="only explain (required)")
    p.add_argument("--calling-ae", default=None, help="pretend the series came from this AE")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_route)
    p = with_config(sub.add_parser("jobs", help="recent jobs and their state"))
    p.add_argument("--state", help="only jobs in this state (pending, queued, dispatching, delivered, parked, refused, "
                                   "failed, waiting_disk; a running job is queued)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)
    p = with_config(sub.add_parser("audit", help="print the audit trail: associations, series, jobs, deliveries, "
                                                 "admin actions, config reloads"))
    p.add_argument("--since", help="age (90s, 15m, 2h, 7d), ISO date/time (UTC unless given) or epoch seconds")
    p.add_argument("--limit", type=int, default=None, help="only the newest N events")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)
    p = with_config(sub.add_parser("reload", help="make the running node re-read its config file (validated first; "
                                                  "a bad one is refused and the running config stays)"))
    p.add_argument("--timeout", type=float, default=30, help="seconds to wait for the node's answer")
    p.set_defaults(func=cmd_reload)
    p = with_config(sub.add_parser("retry", help="replay a parked or failed job, or one waiting for disk space (all of them without JOB)"))
    p.add_argument("job", type=int, nargs="?")
    p.set_defaults(func=cmd_retry)
    for name, help_text in (("train", "train a model family (cxr: the Hydra trunk, then its heads; sr3d: the "
                                      "in-plane and through-plane CNNs; sr2d: Meta-Upscale, MDRN)"),
                            ("eval", "evaluate a model family on its held-out split (cxr, sr3d, sr2d; qa: "
                                     "the consistency thresholds of every model)")):
        p = sub.add_parser(name, help=help_text, description=help_text + "; the family's own options: "
                           f"srnode {name} FAMILY --help")
        p.add_argument("family", choices=sorted(FAMILIES if name == "train" else EVALS))
        p.add_argument("rest", nargs=argparse.REMAINDER, help="the family's arguments")
        p.set_defaults(func=cmd_train if name == "train" else cmd_eval)
    return parser


FAMILIES = {family: (f"pipelines.training.train_{family}", f"pipelines.evaluation.eval_{family}")
            for family in ("cxr", "sr3d", "sr2d")}
EVALS = {**{family: modules[1] for family, modules in FAMILIES.items()}, "qa": "pipelines.evaluation.eval_qa"}


def cmd_train(args) -> int:
    return importlib.import_module(FAMILIES[args.family][0]).main(args.rest)


def cmd_eval(args) -> int:
    return importlib.import_module(EVALS[args.family]).main(args.rest)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
