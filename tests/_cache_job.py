"""The tiny teacher's top-k cache of a small split, built by this process alone or, under torchrun, by all of them
together (gloo). Run as ``python tests/_cache_job.py ROOT`` (or through torch.distributed.run); process 0 prints
the cache folder and its report's status."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(root: str):
    import torch
    import torch.distributed as dist

    from pocket_teacher.config import get_preset
    from pocket_teacher.data import load_gsm_symbolic, tokenize_examples
    from pocket_teacher.models import build_tiny_model, build_tiny_tokenizer, freeze
    from pocket_teacher.teacher_cache import Fidelity, Share, build_topk_cache

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same teacher in every process and in the test
    cfg = get_preset("tiny")
    tokenizer = build_tiny_tokenizer(cfg.teacher.tiny.vocab_size)
    teacher = freeze(build_tiny_model(cfg.teacher.tiny, len(tokenizer)))
    split = tokenize_examples(load_gsm_symbolic(11, seed=5)[0], tokenizer, max_length=384)
    cache = build_topk_cache(teacher, split, root, k=16, batch_size=2, progress=False,
                             fidelity=Fidelity(rows=6, temperature=2.0), share=Share.current())
    if int(os.environ.get("RANK", "0")) == 0:
        print(cache.path)
        print(cache.report.status)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    build(sys.argv[1])
