"""Ingest throughput and end-to-end latency, measured against references in the same run.

    python benchmarks/node_ingest_latency.py [--instances 300] [--repeats 3] [--latency-runs 10]

ingest:  N CT instances (pydicom's CT_small.dcm, re-identified) over ONE association with dcmtk
         storescu (TCP_NODELAY) into the node (durable: fsync'd spool + ledger), into dcmtk storescp
         (plain files) and into Orthanc (SQLite index). Median of repeats; ratios node/Orthanc and
         node/storescp.
latency: association release of one CR (RG1_UNCR.dcm, pydicom-data) -> its derived series (interp
         x2 lanczos) found in Orthanc by QIDO-RS, median of runs; the reference is the same CR
         stored in Orthanc directly by storescu, and the node's configured quiet period is shown.
Run from the repository root with the test requirements installed (it uses tests/peers.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import series_factory as make  # noqa: E402
from tests.node_fixtures import NodeProcess, node_config  # noqa: E402
from tests.peers import Orthanc, StoreSCP, free_port, storescu  # noqa: E402


def timed_send(files, port, called_ae) -> float:
    start = time.perf_counter()
    storescu(files, port, called_ae=called_ae)
    return time.perf_counter() - start


def ingest(root: Path, n: int, repeats: int) -> None:
    files = make.ct_volume(root / "ct", "bench-ingest", n)
    orthanc = Orthanc(root / "orthanc").start()
    scp = StoreSCP(root / "storescp").start()
    node = NodeProcess(root / "node", node_config(free_port(), root / "node" / "spool", routes=[], destinations={}))
    node.start()
    rates = {"node": [], "storescp": [], "orthanc": []}
    try:
        for r in range(repeats):
            for name, port, aet in (("node", node.port, "SRNODE"), ("storescp", scp.port, "STORESCP"),
                                    ("orthanc", orthanc.dicom_port, "ORTHANC")):
                if name == "orthanc":
                    orthanc.clear()
                if name == "node":  # a fresh series each time so nothing is a duplicate
                    files = make.ct_volume(root / f"ct{r}", f"bench-ingest-{r}", n)
                rates[name].append(n / timed_send(files, port, aet))
    finally:
        node.stop()
        scp.stop()
        orthanc.kill()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"ingest: {n} instances x {repeats} repeats, one association each (instances/s, median)")
    for k, v in med.items():
        print(f"  {k:<9} {v:7.1f}   runs: {', '.join(f'{x:.0f}' for x in rates[k])}")
    print(f"  ratio node/orthanc  = {med['node'] / med['orthanc']:.2f}")
    print(f"  ratio node/storescp = {med['node'] / med['storescp']:.2f}")


def latency(root: Path, runs: int) -> None:
    orthanc = Orthanc(root / "orthanc-lat").start()
    quiet = 0.5
    node = NodeProcess(root / "node-lat", node_config(
        free_port(), root / "node-lat" / "spool", quiet_seconds=quiet,
        routes=[{"name": "chest", "match": {"Modality": ["CR", "DX"]}, "pipeline": "interp",
                 "options": {"scale": 2, "method": "lanczos"}, "send_to": ["pacs"]}],
        destinations={"pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}))
    node.start()
    through, direct = [], []
    try:
        for i in range(runs):
            [cr] = make.cr(root / f"cr{i}", f"bench-latency-{i}")
            from pydicom import dcmread

            src = dcmread(cr, stop_before_pixels=True)
            storescu([cr], node.port)
            released = time.perf_counter()
            while not [s for s in orthanc.series_of_study(src.StudyInstanceUID)
                       if s["0020000E"]["Value"][0] != src.SeriesInstanceUID]:
                if time.perf_counter() - released > 120:
                    raise SystemExit(f"no derived series after 120 s:\n{node.log()[-3000:]}")
                time.sleep(0.02)
            through.append(time.perf_counter() - released)
            [ref] = make.cr(root / f"ref{i}", f"bench-latency-ref-{i}")
            direct.append(timed_send([ref], orthanc.dicom_port, "ORTHANC"))
    finally:
        node.stop()
        orthanc.kill()
    print(f"latency: one CR, release -> derived series in Orthanc (s, median of {runs})")
    print(f"  through the node        {statistics.median(through):6.2f}  (quiet period {quiet} s included)")
    print(f"  storescu -> Orthanc     {statistics.median(direct):6.2f}  (reference: the source stored directly)")
    print(f"  node minus quiet period {statistics.median(through) - quiet:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--only", choices=["ingest", "latency"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="srnode-bench-") as tmp:
        root = Path(tmp)
        if args.only in (None, "ingest"):
            ingest(root, args.instances, args.repeats)
        if args.only in (None, "latency"):
            latency(root, args.latency_runs)


if __name__ == "__main__":
    main()
