"""Benchmark of one ROICtrl adapter block at SD1.5 level-1 shapes: fused vs naive vs masked-attention ROICtrl.

    python benchmarks/bench_adapter.py --max-gib 20   # the full run (~45 min on 2 idle cores): writes
                                                    #   benchmarks/results/adapter_cpu.json, adapter_cpu.png
                                                    #   and the table in docs/efficiency.md
    python benchmarks/bench_adapter.py --quick      # small shapes, seconds per case: checks it all runs
                                                    #   (files in the temp dir, docs untouched)
    python benchmarks/bench_adapter.py --report     # plot + docs table again from the existing JSON
    python benchmarks/bench_adapter.py --profile 1024px:25   # torch.profiler top ops of each method's forward

Three steps, one module each: ``adapter_measure.py`` runs every (resolution, N instances, method) case in a
fresh subprocess (what is timed and how memory is read: its docstring), ``adapter_report.py`` makes the summary
(the issue's bar), the plot and the tables from the results, ``adapter_publish.py`` writes the JSON, the plot and
the table in docs/efficiency.md. This file is the command line that chains them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from adapter_measure import COUNTS, METHODS, measure_cases, measure_interleaved, profile, worker_main
from adapter_publish import RESULTS, doc_target, publish, write_json
from adapter_report import summarise


def run(args) -> None:
    doc = measure_cases(args)
    doc["summary"] = summarise(doc["results"], None)
    write_json(doc, Path(args.json))
    print(f"wrote {args.json} ({doc['total_wall_s']:.0f} s)")
    publish(doc, Path(args.png), doc_target(args.json, args.quick))


def run_interleaved(args) -> None:
    """Adds the interleaved forward timings to the results JSON, then the report."""
    path = Path(args.json)
    doc = json.loads(path.read_text())
    doc["interleaved_fwd"] = measure_interleaved(args, doc)
    doc["summary"] = summarise(doc["results"], doc["interleaved_fwd"])
    write_json(doc, path)
    print(f"wrote {path}")
    publish(doc, Path(args.png), doc_target(args.json, args.quick))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run); files in the temp dir")
    ap.add_argument("--report", action="store_true", help="only redo the plot and docs table from --json")
    ap.add_argument("--interleaved", action="store_true",
                    help="add forward timings with the methods' calls alternating in one process to --json")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of --interleaved (default 3 at 1024 px, 5 at 512)")
    ap.add_argument("--profile", metavar="RES:N", help="print torch.profiler tables for one case, e.g. 1024px:25")
    ap.add_argument("--rows", type=int, default=20, help="rows of each --profile table")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)))
    ap.add_argument("--resolutions", default="512px,1024px")
    ap.add_argument("--max-gib", type=float, default=16.0, help="skip cases estimated above this (GiB)")
    ap.add_argument("--timeout", type=float, default=2400.0, help="seconds per case before it counts as failed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    # A quick run is a smoke test: its files go to the temp dir, never over the committed results.
    where = Path(tempfile.gettempdir()) if args.quick else RESULTS
    suffix = "_quick" if args.quick else ""
    args.json = args.json or str(where / f"adapter_cpu{suffix}.json")
    args.png = args.png or str(where / f"adapter_cpu{suffix}.png")
    if args.profile:
        profile(args)
    elif args.interleaved:
        run_interleaved(args)
    elif args.report:
        doc = json.loads(Path(args.json).read_text())
        doc["summary"] = summarise(doc["results"], doc.get("interleaved_fwd"))
        write_json(doc, Path(args.json))
        publish(doc, Path(args.png), None if doc.get("quick") else doc_target(args.json, args.quick))
    else:
        run(args)


if __name__ == "__main__":
    main()
