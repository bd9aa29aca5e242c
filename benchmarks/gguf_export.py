"""What shipping costs: a finished run's student exported to GGUF at each type, read back, and scored by the run's own
evaluator on the run's held-out split: size on disk, held-out perplexity and its change against fp32, top-1
agreement and KL with the teacher.

    python benchmarks/gguf_export.py --run runs/pocket-text --preset pocket-text
    python benchmarks/gguf_export.py --run runs/pocket --preset pocket --quant q8_0 q4_0 q4_1 --json out.json

The held-out split is rebuilt from the preset (and --set overrides) exactly as the run built it; the script refuses a
preset whose data settings differ from the run's config.yaml. Files go to <run>/gguf-bench/ (kept, so llama.cpp can
be pointed at them). The fp32 row is the saved student itself (`student/`, safetensors).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed


def heldout(run: Path, preset: str, sets: list):
    """An experiment holding the run's data, teacher, tokenizer and held-out split, built from the preset and its
    overrides exactly as the run built them (refused when the run's config.yaml has other data settings); the
    run's own teacher texts and caches (runs/teacher_cache beside it) are reused, nothing is written in the run."""
    import yaml

    from pocket_teacher.experiment import Experiment, configure
    from pocket_teacher.runfolder import hardware_line

    ran = yaml.safe_load((run / "config.yaml").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        shared = run.parent / "teacher_cache"  # the run's own texts and caches: reused, not written again
        cfg = configure(preset, [*sets, f"run.out_dir={scratch}", "run.name=gguf-bench",
                                 *([f"teacher_cache.dir={shared}"] if shared.is_dir() else [])])
        if ran.get("data") != yaml.safe_load(cfg.to_yaml()).get("data"):
            raise SystemExit(f"{run}/config.yaml has other data settings than --preset {preset} "
                             f"{' '.join(sets)}: pass the run's --set overrides so the held-out split is the same.")
        print(f"hardware: {hardware_line()}", flush=True)
        exp = Experiment(cfg, progress=False)
        for step in ("load_data", "load_teacher", "teacher_answers", "load_student"):
            getattr(exp, step)()
    return exp


def run_arguments(doc: str, quants: list[str], run_help: str = "a finished run folder") -> argparse.Namespace:
    """The command line of a benchmark that scores a finished run's student by GGUF type: the run, the preset and
    overrides `heldout` rebuilds its held-out split from, the types, and the JSON file to write."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help=run_help)
    parser.add_argument("--preset", required=True, help="the preset the run used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the run's overrides")
    parser.add_argument("--quant", nargs="+", default=quants)
    parser.add_argument("--no-equalize", action="store_true",
                        help="write the weights as trained (default: quantized files have their activations "
                             "equalized, as `python -m pocket_teacher export` writes them)")
    from pocket_teacher.export import QUANTS

    parser.add_argument("--embedding-type", default=None, metavar="TYPE", choices=QUANTS,
                        help="the embedding and output layer's own type (export --embedding-type); its files are "
                             "named student-<quant>-embedding-<TYPE>.gguf")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def bench_file(run: Path, quant: str, embedding: str | None) -> Path:
    """Where a benchmark writes the student's `quant` file: <run>/gguf-bench/, named by its types."""
    from pocket_teacher.export import gguf_file_name

    return run / "gguf-bench" / gguf_file_name("student", quant, embedding)


def main() -> None:
    args = run_arguments(__doc__, ["f16", "q8_0", "q4_0", "q4_1"])

    import torch
    from transformers import AutoModelForCausalLM

    from pocket_teacher.evaluate import agreement, perplexity
    from pocket_teacher.export import export_run, load_gguf
    from pocket_teacher.files import write_json
    from pocket_teacher.runfolder import hardware_line

    run = Path(args.run)
    exp = heldout(run, args.preset, args.set)
    split, tok = exp.splits.eval, exp.tokenizer

    def score(model) -> dict:
        ppl = perplexity(model, split, pad_token_id=tok.pad_token_id, vocab_size=len(tok), progress=False)
        agree = agreement(exp.teacher, model, split, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
                          progress=False)
        return {"perplexity": ppl["perplexity"], "tokens": ppl["tokens"], "top1_agreement": agree["top1_agreement"],
                "kl_to_teacher": agree["kl"]}

    fp32 = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    size = sum(f.stat().st_size for f in (run / "student").glob("*.safetensors"))
    rows = [{"format": "fp32 safetensors", "bytes": size, **score(fp32)}]
    print(f"fp32 safetensors: {size / 2**20:.1f} MiB, {rows[0]}", flush=True)
    import json

    recorded = {r["model"]: r for r in json.loads((run / "results.json").read_text())["results"]}
    print(f"the run's own figure for this student: perplexity {recorded['student after']['perplexity']:.4f}")
    for quant in args.quant:
        start = time.perf_counter()
        report = export_run(run, "student", quant, bench_file(run, quant, args.embedding_type),
                            calibration=None if args.no_equalize else exp.calibration_rows(),
                            embedding=args.embedding_type)
        export_s = time.perf_counter() - start
        model, _ = load_gguf(report.path)
        row = {"format": f"GGUF {quant}", "bytes": report.bytes, "export_s": export_s,
               "fallbacks": [list(f) for f in report.fallbacks], "tokenizer": report.tokenizer,
               "equalized": report.equalized, "embedding": report.embedding, **score(model)}
        row["perplexity_change"] = row["perplexity"] / rows[0]["perplexity"] - 1
        row["size_vs_fp32"] = report.bytes / size
        rows.append(row)
        print(f"{report}\n  {row}", flush=True)
    if args.json:
        write_json(Path(args.json), {"hardware": hardware_line(), "settings": vars(args), "run": str(run),
                                     "parameters": sum(p.numel() for p in fp32.parameters()),
                                     "eval_rows": len(split),
                                     "run_perplexity": recorded["student after"]["perplexity"], "rows": rows})


if __name__ == "__main__":
    main()
