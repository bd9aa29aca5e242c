"""A small training job on the tiny preset, shared by the resume and multi-process tests.

Run as a script (``python tests/_train_job.py OUT_JSON CHECKPOINT_DIR [key=value ...]``) it trains and
writes the history to OUT_JSON; under torchrun each process trains its shard and rank 0 writes.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train(overrides, checkpoint_dir=None, resume=False, step_delay=0.0):
    """Train the tiny job; checkpoints go to `checkpoint_dir`, which must be <run folder>/checkpoints (the run
    folder also gets history.jsonl)."""
    from pocket_teacher.config import apply_overrides, get_preset
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
    from pocket_teacher.models import derive_student, load_teacher
    from pocket_teacher.train import HeldOut, Trainer, Vocab

    if checkpoint_dir is not None and Path(checkpoint_dir).name != "checkpoints":
        raise ValueError(f"checkpoint_dir={checkpoint_dir}: name it <run folder>/checkpoints")

    cfg = apply_overrides(get_preset("tiny"), [*overrides, f"train.resume={str(resume).lower()}"])
    teacher, tok, _ = load_teacher(cfg.teacher, "cpu")
    split = tokenize_examples(load_gsm_symbolic(16, seed=3)[0], tok, max_length=384)
    held_out = tokenize_examples(load_gsm_symbolic(4, seed=9)[0], tok, max_length=384)
    student = derive_student(teacher, num_layers=2)
    marker = os.environ.get("PROGRESS_FILE")

    class Paced(Trainer):  # marks each finished step in PROGRESS_FILE and waits, so a test can kill it mid-run
        def stream(self, row):
            super().stream(row)
            if marker:
                Path(marker).write_text(str(row["step"]))
            time.sleep(step_delay)

    return Paced(student, teacher, split, cfg, Vocab(tok.pad_token_id, len(tok)), held_out=HeldOut(held_out),
                 folder=None if checkpoint_dir is None else Path(checkpoint_dir).parent, progress=False).fit()


if __name__ == "__main__":
    out, ckdir, *overrides = sys.argv[1:]
    delay = float(os.environ.get("STEP_DELAY", "0"))
    from pocket_teacher.train import TrainingInterrupted

    try:
        result = train(overrides, None if ckdir == "-" else ckdir, step_delay=delay)
    except TrainingInterrupted as exc:  # as the CLI does: one line, exit 128 + the signal
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(result.history))
