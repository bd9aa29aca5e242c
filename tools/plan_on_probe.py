"""A finished run's time plan made with another machine's probe: what the plan says the same run takes there.

    python tools/plan_on_probe.py --preset pocket --run runs/pocket --probe-of results/time_plan_pocket_xeon.json

The run's data are tokenized again (as `benchmarks/time_plan.py --replan` does), and the plan is made with the
throughput recorded in the given file (a `benchmarks/time_plan.py` results file, or a run's timings.json) instead of
this machine's; the teacher's loading is planned as on a fresh machine (the GGUF dequantized first), as in a fresh
`make demo`. Prints each section's planned seconds and the total; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def throughput_of(path: Path):
    """The `Throughput` a results file or a run's timings.json recorded."""
    from pocket_teacher.timeplan import Throughput

    data = json.loads(path.read_text())
    got = data.get("throughput") or data["plan"]["throughput"]
    got = dict(got)
    got["stream_rows"] = tuple(tuple(p) for p in got.get("stream_rows", ()))
    return Throughput(**got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--run", required=True, help="the finished run folder whose tokenized lengths are planned")
    parser.add_argument("--probe-of", required=True, help="the file whose recorded throughput is planned with")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from time_plan import reloaded

    from pocket_teacher import timeplan
    from pocket_teacher.files import write_json

    throughput = throughput_of(Path(args.probe_of))
    exp = reloaded(args.preset, [], Path(args.run))  # the run's tokenized lengths
    timeplan._dequantized_already = lambda: False  # a fresh machine: the embedded GGUF is dequantized first
    lengths = timeplan.Lengths.of(exp.splits.train, exp.splits.eval)
    plan = timeplan.time_plan(exp.cfg, lengths=lengths, throughput=throughput)
    seconds = plan.seconds()
    for section, s in seconds.items():
        print(f"{section:<28} {s:8.1f} s")
    print(f"{'total':<28} {sum(seconds.values()):8.1f} s  on {throughput}")
    if args.json:
        write_json(Path(args.json), {"preset": args.preset, "run": args.run, "probe_of": args.probe_of,
                                     "throughput": str(throughput), "planned_s": seconds,
                                     "total_s": sum(seconds.values())})


if __name__ == "__main__":
    main()
