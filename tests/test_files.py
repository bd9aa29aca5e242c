"""The shared file helpers: the checksum sees any changed byte, JSON writes leave no temp files behind."""

import json
import stat

from pocket_teacher.files import file_hash, write_json


def test_file_hash_is_stable_and_sees_one_changed_byte(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytearray(range(256)) * 40_000  # ~10 MB: several 4 MiB blocks
    path.write_bytes(data)
    first = file_hash(path)
    assert file_hash(path) == first and len(first) == 32
    data[5_000_000] ^= 1
    path.write_bytes(data)
    assert file_hash(path) != first


def test_write_json_creates_folders_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a" / "b" / "meta.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2, "path": tmp_path})  # non-JSON values are written as strings
    assert json.loads(path.read_text()) == {"x": 2, "path": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["meta.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_model_digest_is_exact_whatever_the_thread_count():
    """Resume compares the live teacher's digest, and caches are named by it: it must not depend on how a sum is
    split over threads (float sums' last digits do), and one weight changed by one ulp must change it."""
    import torch

    from pocket_teacher.files import model_digest

    layer = torch.nn.Linear(3000, 700)
    before = torch.get_num_threads()
    try:
        digests = set()
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            digests.add(model_digest(layer))
    finally:
        torch.set_num_threads(before)
    assert len(digests) == 1
    with torch.no_grad():
        layer.weight[5, 7] = torch.nextafter(layer.weight[5, 7], torch.tensor(1.0))
    assert model_digest(layer) not in digests
    import copy

    assert model_digest(copy.deepcopy(layer).to(torch.bfloat16)) != model_digest(layer)
