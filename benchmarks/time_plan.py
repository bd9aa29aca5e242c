"""The time plan against the clock: each notebook section's planned seconds beside the measured ones.

    python benchmarks/time_plan.py --preset tiny --json runs/bench/time_plan_tiny.json         # runs tiny now
    python benchmarks/time_plan.py --preset pocket --run runs/pocket --json runs/bench/time_plan_pocket.json

With --run, the measured seconds are a finished run's `timings.json` (run on this machine, alone, for a fair
comparison), and so is the plan: the one the run printed once its data were tokenized, before the work began. With
--replan, or for a run that kept no plan, the plan is made again here with that run's tokenized lengths (the data
loaded and tokenized again, the teacher's generated answers reused from the run's cache) and this machine's
throughput (its cached probe, or `--probe` to measure again); the teacher's loading keeps the run's own estimate
(it depends on whether the embedded GGUF had been dequantized on the machine then). Without --run, the preset
runs now into a temporary folder, and its own timings.json (plan and clock) is read. Prints and writes each
section's planned and measured seconds, their ratio, and whether it is within the issue's bounds: 25% per section
and 15% in total (a factor of 2 in total for `tiny`, where start-up dominates).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

WORK_SECTIONS = ("3b. Teacher answers", "4b. Teacher cache", "5. Before training", "5b. Preflight",
                 "6. Distillation", "6b. Baseline", "6c. On-policy preview", "7. Evaluation after")


def replan(preset: str, overrides: list[str], run: Path, refresh: bool):
    """The plan of a finished run, made again: its data tokenized again (its teacher answers reused)."""
    return reloaded(preset, overrides, run, refresh).time_plan


def reloaded(preset: str, overrides: list[str], run: Path, refresh: bool = False):
    """A finished run's experiment up to its tokenized data (section 4), its plan made again on the way."""
    from pocket_teacher.experiment import Experiment, configure
    from pocket_teacher.timeplan import local_throughput

    import yaml

    if refresh:
        local_throughput(refresh=True)
    # the run's cache of generated answers: its teacher_cache.dir, else <run.out_dir>/teacher_cache (run's parent)
    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    cache = (saved.get("teacher_cache") or {}).get("dir") or run.parent / "teacher_cache"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = configure(preset, [*overrides, f"run.out_dir={tmp}", f"teacher_cache.dir={cache}"])
        exp = Experiment(cfg, progress=False)
        for method in ("configure", "load_data", "load_teacher", "teacher_answers", "load_student"):
            getattr(exp, method)()
        return exp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", default=None, help="a finished run folder of this preset (else: run it now)")
    parser.add_argument("--probe", action="store_true", help="measure this machine's throughput again first")
    parser.add_argument("--replan", action="store_true", help="with --run: plan again here (this code, this probe) "
                        "instead of reading the plan the run made before it ran")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from pocket_teacher.cli import main as cli
    from pocket_teacher.files import write_json
    from pocket_teacher.runfolder import hardware_line
    from pocket_teacher.timeplan import compared

    print(f"hardware: {hardware_line()}", flush=True)
    planned = throughput = None
    if args.run:
        run = Path(args.run)
        recorded = json.loads((run / "timings.json").read_text()).get("planned_s")
        if args.replan or not recorded:
            plan = replan(args.preset, args.set, run, args.probe)
            planned, throughput = plan.seconds(), str(plan.throughput)
            if recorded and "3. Teacher" in recorded:  # loading the teacher depends on what this machine had
                planned["3. Teacher"] = recorded["3. Teacher"]  # cached then (the first dequantization): the run's
    else:
        run = Path(tempfile.mkdtemp()) / args.preset
        argv = ["run", "--preset", args.preset, "--out", str(run), "--no-progress"]
        if cli([*argv, *(x for kv in args.set for x in ("--set", kv))]) != 0:
            sys.exit("the run failed")
    timings = json.loads((run / "timings.json").read_text())
    if planned is None:  # the plan the run itself printed, once its data were tokenized
        planned, throughput = timings["planned_s"], timings["plan"]["throughput"]
    measured = timings["sections_s"]
    rows = compared(planned, measured)
    bound = 2.0 if args.preset.startswith("tiny") else 0.15
    for row in rows:
        ratio = row["ratio"]
        if row["section"] == "total":
            row["within"] = ratio is not None and (1 / bound <= ratio <= bound if bound > 1 else
                                                   abs(ratio - 1) <= bound)
        else:
            row["within"] = (ratio is not None and abs(ratio - 1) <= 0.25) \
                if row["section"] in WORK_SECTIONS and bound < 1 else None  # loading sections, and tiny's
            # sub-second sections (start-up dominates: its bound is on the total only), are not checked
        print(f"{row['section']:<28} planned {row['planned_s']:8.1f} s  measured {row['measured_s']:8.1f} s  "
              f"ratio {ratio}  {'' if row['within'] is None else ('ok' if row['within'] else 'OFF')}")
    if args.json:
        write_json(Path(args.json), {"hardware": hardware_line(), "throughput": throughput, "preset": args.preset,
                                     "run": str(run), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
