"""Healing the quantization gap, measured: a finished run's student healed for the same extra steps twice, by
distillation (the run's alpha, the same teacher cache) and by plain fine-tuning (alpha = 1), both with the weights
quantized in the forward pass as the file holds them (activations equalized as the export writes the file, unless
--no-equalize); the held-out perplexity of the fp32 student and of its
quantized file before and after each, and the share of the gap closed.

    python benchmarks/gguf_heal.py --run runs/pocket --quant q4_0 --steps 50 --json runs/bench/gguf_heal.json

Writes <run>/student-<quant>-healed*.gguf and <run>/heal.json (as `python -m pocket_teacher export --heal-steps`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run folder")
    parser.add_argument("--quant", nargs="+", default=["q4_0"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=None, help="default: a tenth of the run's train.lr")
    parser.add_argument("--no-equalize", dest="equalize", action="store_false",
                        help="heal and write the weights as trained (files ...-unequalized.gguf)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from pocket_teacher.experiment import from_run
    from pocket_teacher.files import write_json
    from pocket_teacher.runfolder import hardware_line

    print(f"hardware: {hardware_line()}", flush=True)
    exp = from_run(args.run, progress=False)
    rows = []
    for quant in args.quant:
        for alpha in (None, 1.0):  # distillation (the run's alpha), then plain fine-tuning at equal steps
            report = exp.heal(quant, args.steps, alpha=alpha, lr=args.lr, equalize=args.equalize)
            rows.append({**report, "method": "fine-tuning (alpha=1)" if alpha == 1.0 else "distillation"})
            print(rows[-1], flush=True)
    if args.json:
        write_json(Path(args.json), {"hardware": hardware_line(), "settings": vars(args),
                                     "run_alpha": exp.trained.cfg.loss.alpha, "rows": rows})


if __name__ == "__main__":
    main()
