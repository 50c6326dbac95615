"""toolkit.data: the uint8 cache (hit, invalidation, corruption), its speed on the real data,
stratified splits / k-fold, ClassBalancedSampler (balance, epochs, DDP slices, a real
2-process gloo run) and atomic_save."""
from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import toolkit.data as tdata
from helpers import synthetic_image
from toolkit.data import load_course_folder
from toolkit.splits import ClassBalancedSampler, stratified_folds, stratified_split
from toolkit.io import atomic_save, atomic_write


# ---- cache -------------------------------------------------------------------------------
class DecodeSpy:
    """Wraps decode_folder, counting calls; raise_on_call makes any decode an error."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.raise_on_call = False
        real = tdata.decode_folder

        def spy(*args, **kwargs):
            self.calls += 1
            if self.raise_on_call:
                raise AssertionError("decode_folder called although the cache is valid")
            return real(*args, **kwargs)
        monkeypatch.setattr(tdata, "decode_folder", spy)


@pytest.fixture
def spy(monkeypatch):
    return DecodeSpy(monkeypatch)


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.iterdir())


def assert_same_data(a, b):
    assert a.names == b.names and a.classes == b.classes and a.fingerprint == b.fingerprint
    assert torch.equal(a.grey, b.grey) and torch.equal(a.rgb, b.rgb) and torch.equal(a.labels, b.labels)


def test_first_load_writes_cache_second_reads_it(make_course, cache_dir, spy):
    folder = make_course(n=9)
    first = load_course_folder(folder, progress=False)
    assert spy.calls == 1
    files = cache_files(cache_dir)
    assert len(files) == 1 and files[0].suffix == ".pt"
    assert first.grey.dtype == torch.uint8 and tuple(first.grey.shape) == (9, 1, 100, 100)
    assert first.rgb.dtype == torch.uint8 and tuple(first.rgb.shape) == (9, 3, 100, 100)
    assert first.classes == ["apple", "book", "cat"]
    assert first.labels.tolist() == [0, 1, 2] * 3
    spy.raise_on_call = True
    second = load_course_folder(folder, progress=False)
    assert spy.calls == 1
    assert_same_data(first, second)
    assert cache_files(cache_dir) == files


def test_explicit_cache_dir_argument_is_used(make_course, tmp_path, cache_dir, spy):
    folder = make_course(n=3)
    other = tmp_path / "elsewhere"
    load_course_folder(folder, cache_dir=other, progress=False)
    assert len(list(other.glob("*.pt"))) == 1 and cache_files(cache_dir) == []


def _reload_decodes(folder, spy) -> bool:
    before = spy.calls
    data = load_course_folder(folder, progress=False)
    return spy.calls > before, data


def test_cache_kept_when_only_mtime_changes_and_rebuilt_when_bytes_change(make_course, cache_dir, spy):
    """The fingerprint is the content: new mtimes (a fresh copy of the data) keep the cache; a
    byte changed with the same size and mtime rebuilds it."""
    folder = make_course(n=6)
    before = load_course_folder(folder, progress=False)
    path = folder / "0000002.jpg"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    rebuilt, same = _reload_decodes(folder, spy)
    assert not rebuilt and same.fingerprint == before.fingerprint
    raw = bytearray(path.read_bytes())
    dqt = raw.index(b"\xff\xdb")  # first quantisation table: still a valid JPEG, other pixels
    raw[dqt + 5] = raw[dqt + 5] + 1 if raw[dqt + 5] < 255 else 254
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    rebuilt, changed = _reload_decodes(folder, spy)
    assert rebuilt and changed.fingerprint != before.fingerprint
    assert not _reload_decodes(folder, spy)[0]  # and the new cache is then used


def test_cache_rebuilt_when_size_changes_with_same_mtime(make_course, cache_dir, spy):
    folder = make_course(n=6)
    before = load_course_folder(folder, progress=False)
    path = folder / "0000002.jpg"
    st = path.stat()
    synthetic_image(100, 75, "RGB", seed=999).save(path, quality=50)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, new size + content
    assert path.stat().st_size != st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    rebuilt, after = _reload_decodes(folder, spy)
    assert rebuilt
    assert not torch.equal(before.grey[1], after.grey[1])


def test_cache_rebuilt_when_file_added(make_course, cache_dir, spy):
    folder = make_course(n=6)
    load_course_folder(folder, progress=False)
    synthetic_image(80, 100, "RGB", seed=42).save(folder / "0000007.jpg")
    with open(folder / "labels.csv", "a") as f:
        f.write("0000007.jpg;book\n")
    rebuilt, data = _reload_decodes(folder, spy)
    assert rebuilt and len(data) == 7 and data.names[-1] == "0000007.jpg"
    assert data.labels[-1].item() == data.classes.index("book")


def test_cache_rebuilt_when_labels_change(make_course, cache_dir, spy):
    folder = make_course(n=6)
    first = load_course_folder(folder, progress=False)
    text = (folder / "labels.csv").read_text().replace("0000001.jpg;apple", "0000001.jpg;cat")
    (folder / "labels.csv").write_text(text)
    rebuilt, data = _reload_decodes(folder, spy)
    assert rebuilt and data.fingerprint != first.fingerprint
    assert data.labels[0].item() == data.classes.index("cat")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_dict"])
def test_corrupt_cache_is_rebuilt_with_warning(make_course, cache_dir, spy, damage):
    folder = make_course(n=6)
    good = load_course_folder(folder, progress=False)
    (path,) = cache_files(cache_dir)
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(blob)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save(torch.zeros(3), path)
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt, data = _reload_decodes(folder, spy)
    assert rebuilt
    assert_same_data(good, data)
    # The rebuilt cache is whole again and is used next time.
    spy.raise_on_call = True
    assert_same_data(good, load_course_folder(folder, progress=False))


def test_stale_cache_with_other_fingerprint_is_not_used(make_course, cache_dir, spy):
    """A well-formed cache of other content (e.g. an older version of the folder) is ignored."""
    folder = make_course(n=6)
    good = load_course_folder(folder, progress=False)
    (path,) = cache_files(cache_dir)
    blob = torch.load(path, weights_only=True)
    blob["grey"] = torch.zeros_like(blob["grey"])
    blob["fingerprint"] = "0" * 16
    torch.save(blob, path)
    rebuilt, data = _reload_decodes(folder, spy)
    assert rebuilt and torch.equal(data.grey, good.grey)


@pytest.mark.slow  # end to end on all 9,985 shared JPEGs: a timing, not a correctness check
def test_shared_data_decode_and_cache_timing(shared_data, tmp_path, capsys, spy):
    cache = tmp_path / "cache"
    try:
        t0 = time.perf_counter()
        fresh = load_course_folder(shared_data, cache_dir=cache, progress=False)
        decode_s = time.perf_counter() - t0
        assert spy.calls == 1 and len(list(cache.glob("*.pt"))) == 1
        spy.raise_on_call = True
        t0 = time.perf_counter()
        cached = load_course_folder(shared_data, cache_dir=cache, progress=False)
        load_s = time.perf_counter() - t0
        with capsys.disabled():
            print(f"\n[timing] decode 9,985 images + write cache: {decode_s:.1f} s; "
                  f"load from cache: {load_s:.2f} s")
        assert len(fresh) == 9985
        assert torch.equal(fresh.grey, cached.grey) and torch.equal(fresh.rgb, cached.rgb)
        assert decode_s < 90, f"decoding took {decode_s:.1f} s"
        assert load_s < 3, f"loading the cache took {load_s:.2f} s"
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---- splits --------------------------------------------------------------------------------
def make_labels(counts, seed=0) -> torch.Tensor:
    """Shuffled labels with counts[c] samples of class c."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


SPLIT_COUNTS = [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 17, 50, 101, 250, 499, 0, 37]


def test_stratified_split_properties():
    labels = make_labels(SPLIT_COUNTS)
    train, val = stratified_split(labels, 0.2, seed=3)
    train2, val2 = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(train, train2) and torch.equal(val, val2)  # deterministic
    other_train, other_val = stratified_split(labels, 0.2, seed=4)
    assert not torch.equal(val, other_val)  # the seed matters
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert len(set(val.tolist())) == len(val)
    for c, n in enumerate(SPLIT_COUNTS):
        n_val = int((labels[val] == c).sum())
        assert abs(n_val - 0.2 * n) <= 1, f"class {c}: {n_val} of {n} in val"
    folds = stratified_folds(labels, 5, seed=3)
    assert torch.equal(val, (folds == 0).nonzero().flatten())
    assert torch.equal(train, (folds != 0).nonzero().flatten())


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_kfold_partitions_the_data(k):
    labels = make_labels(SPLIT_COUNTS, seed=k)
    folds = stratified_folds(labels, k, seed=0)
    assert folds.shape == labels.shape and folds.min() >= 0 and folds.max() < k
    assert torch.equal(folds, stratified_folds(labels, k, seed=0))
    # the val sets of the k folds are disjoint and cover everything exactly once
    vals = [set((folds == f).nonzero().flatten().tolist()) for f in range(k)]
    assert sum(len(v) for v in vals) == len(labels) and set().union(*vals) == set(range(len(labels)))
    for c, n in enumerate(SPLIT_COUNTS):
        per_fold = torch.bincount(folds[labels == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1, f"class {c}: {per_fold.tolist()}"
    sizes = torch.bincount(folds, minlength=k)
    assert sizes.max() - sizes.min() <= 1, sizes.tolist()


def test_tiny_and_empty_classes_do_not_crash():
    labels = torch.tensor([0] * 10 + [2] + [3] * 6)  # class 1 has no image, class 2 one
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(train) + len(val) == len(labels)
    folds = stratified_folds(labels, 5, seed=0)
    assert (folds[labels == 2] >= 0).all()
    sampler = ClassBalancedSampler(labels, train, power=0.0, num_samples=200, seed=0)
    drawn = list(sampler)
    assert len(drawn) == 200 and set(drawn) <= set(train.tolist())
    with pytest.raises(ValueError):
        stratified_folds(labels, 1)
    with pytest.raises(ValueError):
        stratified_split(labels, 0.0)


# ---- sampler -------------------------------------------------------------------------------
SAMPLER_COUNTS = [400, 100, 25, 9, 1, 64]


def assert_draw_matches(drawn_classes: list[int], probs: list[float]):
    """Every class count within 5 binomial sigmas of n * p."""
    n = len(drawn_classes)
    got = Counter(drawn_classes)
    for c, p in enumerate(probs):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(got[c] - n * p) <= 5 * sigma + 1, f"class {c}: {got[c]} vs {n * p:.0f} (+-{5 * sigma:.0f})"


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_sampler_class_frequencies(power):
    labels = make_labels(SAMPLER_COUNTS)
    sampler = ClassBalancedSampler(labels, power=power, num_samples=30_000, seed=1)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 30_000
    mass = [n ** power for n in SAMPLER_COUNTS]
    assert_draw_matches(labels[drawn].tolist(), [m / sum(mass) for m in mass])


def test_sampler_power0_is_balanced_chi_square():
    labels = make_labels(SAMPLER_COUNTS)
    drawn = list(ClassBalancedSampler(labels, power=0.0, num_samples=12_000, seed=7))
    counts = torch.bincount(labels[drawn], minlength=len(SAMPLER_COUNTS)).double()
    expected = 12_000 / len(SAMPLER_COUNTS)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.7, counts.tolist()  # chi2(5 dof) 99.99th percentile


def test_sampler_restricted_to_indices_and_default_length():
    labels = make_labels(SAMPLER_COUNTS)
    train, _ = stratified_split(labels, 0.2, seed=0)
    sampler = ClassBalancedSampler(labels, train, power=0.0, seed=0)
    drawn = list(sampler)
    assert len(drawn) == len(train) == len(sampler)
    assert set(drawn) <= set(train.tolist())


def test_sampler_epochs():
    labels = make_labels(SAMPLER_COUNTS)
    s = ClassBalancedSampler(labels, power=0.5, num_samples=500, seed=3)
    e0 = list(s)
    assert list(s) == e0  # same epoch, same draw
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    s.set_epoch(0)
    assert list(s) == e0
    resumed = ClassBalancedSampler(labels, power=0.5, num_samples=500, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == e1  # a resumed run sees the same sequence
    assert list(ClassBalancedSampler(labels, power=0.5, num_samples=500, seed=4)) != e0


@pytest.mark.parametrize("total", [1000, 1001])
def test_sampler_ddp_slices_emulated(total):
    labels = make_labels(SAMPLER_COUNTS)
    train = torch.arange(0, len(labels), 2)  # a subset, so indices must be mapped back
    ranks = []
    for rank in range(2):
        s = ClassBalancedSampler(labels, train, power=0.0, num_samples=total, seed=5, rank=rank, world_size=2)
        s.set_epoch(2)
        ranks.append(list(s))
        assert len(ranks[-1]) == len(s) == total // 2
    single = ClassBalancedSampler(labels, train, power=0.0, num_samples=total // 2 * 2, seed=5)
    single.set_epoch(2)
    glob = list(single)
    assert ranks[0] == glob[0::2] and ranks[1] == glob[1::2]
    interleaved = [i for pair in zip(*ranks) for i in pair]
    assert interleaved == glob
    assert ranks[0] != ranks[1]


# A real 2-process run: torch.multiprocessing.spawn + gloo on the CPU.
DDP_TOTAL, DDP_SEED, DDP_EPOCH = 6000, 11, 3


def _ddp_worker(rank: int, world_size: int, tmp: str):
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    try:
        labels = make_labels(SAMPLER_COUNTS)
        sampler = ClassBalancedSampler(labels, power=0.0, num_samples=DDP_TOTAL, seed=DDP_SEED,
                                       rank=rank, world_size=world_size)
        sampler.set_epoch(DDP_EPOCH)
        mine = list(sampler)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            single = ClassBalancedSampler(labels, power=0.0, num_samples=DDP_TOTAL, seed=DDP_SEED)
            single.set_epoch(DDP_EPOCH)
            glob = list(single)
            for r in range(world_size):
                assert gathered[r] == glob[r::world_size], f"rank {r} is not its slice of the draw"
            union = [i for lst in gathered for i in lst]
            assert sorted(union) == sorted(glob)
            p = 1 / len(SAMPLER_COUNTS)
            assert_draw_matches(labels[union].tolist(), [p] * len(SAMPLER_COUNTS))
            torch.save({"gathered": gathered, "glob": glob}, f"{tmp}/result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sampler_real_two_process_gloo(tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)  # rank 0 did check
    g0, g1 = result["gathered"]
    assert len(g0) == len(g1) == DDP_TOTAL // 2
    assert [i for pair in zip(g0, g1) for i in pair] == result["glob"]


# ---- atomic_save ---------------------------------------------------------------------------
def test_atomic_save_success_leaves_only_the_file(tmp_path):
    path = tmp_path / "out" / "thing.pt"
    atomic_save({"a": torch.arange(3)}, path)
    assert [p.name for p in path.parent.iterdir()] == ["thing.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))


def test_atomic_save_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "thing.pt"
    atomic_save({"v": 1}, path)
    old = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"f": lambda: None}, path)  # unpicklable: torch.save raises mid-write
    assert path.read_bytes() == old

    def half_then_raise(f):
        f.write(b"partial garbage")
        raise RuntimeError("writer died")
    with pytest.raises(RuntimeError, match="writer died"):
        atomic_write(path, half_then_raise)
    assert path.read_bytes() == old
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["thing.pt"]
