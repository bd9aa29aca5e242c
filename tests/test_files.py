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

    from pocket_teacher import files
    from pocket_teacher.files import model_digest

    layer = torch.nn.Linear(3000, 700)
    before = torch.get_num_threads()
    try:
        digests = set()
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            files._DIGESTS.clear()  # computed again, not the digest kept from the last call
            digests.add(model_digest(layer))
    finally:
        torch.set_num_threads(before)
    assert len(digests) == 1
    with torch.no_grad():
        layer.weight[5, 7] = torch.nextafter(layer.weight[5, 7], torch.tensor(1.0))
    assert model_digest(layer) not in digests
    import copy

    assert model_digest(copy.deepcopy(layer).to(torch.bfloat16)) != model_digest(layer)


def test_a_frozen_models_digest_is_kept_until_a_weight_changes(monkeypatch):
    """Asked again for an unchanged frozen model (a teacher), the digest is not computed again; any write (in place,
    through .data, which leaves the version counter alone, a load, a parameter replaced) computes it afresh; a
    trainable model (fused AdamW also leaves the version counter alone) is always read again."""
    import torch

    from pocket_teacher import files

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).requires_grad_(False)
    calls = []
    real = files._digest_of
    monkeypatch.setattr(files, "_digest_of", lambda *a: calls.append(1) or real(*a))
    first = files.model_digest(model)
    assert files.model_digest(model) == first and len(calls) == 1
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: the version counter moves
    second = files.model_digest(model)
    assert second != first and len(calls) == 2
    model[0].weight.data.mul_(2)  # through .data: the same counter, other samples
    third = files.model_digest(model)
    assert third not in (first, second) and len(calls) == 3
    other = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).requires_grad_(False)
    model.load_state_dict(other.state_dict())
    assert files.model_digest(model) == files.model_digest(other) != third
    model[1].weight = torch.nn.Parameter(torch.zeros(8, 32), requires_grad=False)
    assert files.model_digest(model) != files.model_digest(other)
    trainable = torch.nn.Linear(64, 32)
    before = files.model_digest(trainable)
    trainable(torch.randn(2, 64)).sum().backward()
    torch.optim.AdamW(trainable.parameters(), fused=True).step()  # leaves the version counter as it was
    assert files.model_digest(trainable) != before


def test_the_digest_is_the_one_earlier_releases_named_caches_by():
    """Caches on disk are named by the digest: its bytes must not change with the memo (this value was computed by
    the code before it)."""
    import torch

    from pocket_teacher.files import model_digest

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).requires_grad_(False)
    with torch.no_grad():  # weights of known values, whatever torch's initialization
        for i, p in enumerate(model.parameters()):
            p.copy_((torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) - 50) / 8 * (i + 1))  # exact
    assert model_digest(model) == "ed872217b2ed0440527eab6a2697ad6f"  # computed at d3dfb09
