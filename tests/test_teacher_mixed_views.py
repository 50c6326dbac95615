"""Teachers that train on the views they label (train_teacher.py --mixed-views, issue 37).

* the head trains on its cached trunk features of the plain, mirror and mixed views, each mixed
  view's target the smoothed mixed label lam * y_i + (1 - lam) * y_partner;
* the mixed views' trunk features are cached (fp16) and are the trunk on exactly those renderings;
* when it finishes, the teacher labels those views with its saved weights (head only) where
  distill.py looks them up, so distill.py on the same views does no labelling pass, and its
  targets are the whole teacher on each rendered view, up to fp16 features.
"""
from __future__ import annotations

import pytest
import torch

import distill
import train_teacher
from helpers_distill import distill_argv, make_course_folder, one_thread_with_cache, train_tiny_teacher, write_arch
from toolkit.data import load_course_folder
from toolkit.mixviews import (mixed_hard_targets, mixed_trunk_features, render_views, sample_mixed_views,
                              teacher_mixed_logits)
from toolkit.splits import fold_split
from toolkit.teachers import load_teacher
from toolkit.trunk import TrunkSplit, teacher_trunk_key

MIXED = 2  # mixed views per image besides the image and its mirror


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A course folder and one teacher trained on every image (--fold -1) with --mixed-views 2,
    its cache folder kept."""
    root = tmp_path_factory.mktemp("teacher_mixed")
    with one_thread_with_cache(root / "cache"):
        data = make_course_folder(root / "data")
        teacher = train_tiny_teacher(data, root / "teacher", fold=-1, frozen_stages=2,
                                     extra=["--mixed-views", str(MIXED), "--epochs", "2"])
        yield root, data, teacher


def test_the_mixed_trunk_cache_is_the_trunk_on_exactly_the_rendered_views(world):
    root, data_dir, folder = world
    cached = list((root / "cache").glob("mixed-trunk-*.pt"))
    assert len(cached) == 1
    blob = torch.load(cached[0], weights_only=True)
    data = load_course_folder(data_dir, progress=False)
    _, train_idx, _ = fold_split(data.labels, 3, 0, -1)
    params = sample_mixed_views(len(data), 2 + MIXED, train_idx, 0)[:, 2:]
    assert torch.equal(blob["rows"], train_idx) and torch.equal(blob["view_params"], params[train_idx])
    assert blob["features"].shape[:2] == (len(train_idx), MIXED) and blob["features"].dtype == torch.float16
    teacher = load_teacher(folder)
    split = TrunkSplit(teacher.backbone, 2).eval()  # frozen: the start trunk (saved in fp16)
    for row, m in [(0, 0), (5, 1), (len(train_idx) - 1, 1)]:
        i = train_idx[row:row + 1]
        with torch.no_grad():
            want = split.trunk(teacher.prepare(render_views(data.rgb, i, params[i, m])))[0]
        torch.testing.assert_close(blob["features"][row, m].float(), want, atol=2e-2, rtol=2e-2)


def test_a_corrupt_mixed_trunk_cache_is_recomputed_and_rewritten(world, monkeypatch, tmp_path):
    """The mixed views' cache goes through the trunk cache's own reader: a damaged file is
    computed again from the teacher's trunk (not an error, not a silent wrong read) and rewritten."""
    root, data_dir, folder = world
    (good,) = (root / "cache").glob("mixed-trunk-*.pt")
    want = torch.load(good, weights_only=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / good.name).write_bytes(good.read_bytes()[:1000])          # truncated: torch.load fails
    monkeypatch.setenv("TOOLKIT_CACHE", str(cache))
    data = load_course_folder(data_dir, progress=False)
    _, train_idx, _ = fold_split(data.labels, 3, 0, -1)
    params = sample_mixed_views(len(data), 2 + MIXED, train_idx, 0)[:, 2:]
    teacher = load_teacher(folder)
    key = teacher_trunk_key(teacher.config, data.fingerprint)
    features = mixed_trunk_features(teacher, TrunkSplit(teacher.backbone, 2), data.rgb, params, train_idx, key)
    torch.testing.assert_close(features.float(), want["features"].float(), atol=2e-2, rtol=2e-2)
    again = torch.load(cache / good.name, weights_only=True)
    assert torch.equal(again["features"], features) and torch.equal(again["rows"], train_idx)


def test_the_head_trains_on_the_mixed_views_with_their_mixed_labels(world, monkeypatch, tmp_path):
    """Spy on the loss: mixed views are drawn, and their targets are the smoothed mixed labels."""
    root, data_dir, _ = world
    seen = []
    real = train_teacher.soft_cross_entropy
    monkeypatch.setattr(train_teacher, "soft_cross_entropy", lambda logits, t: seen.append(t) or real(logits, t))
    monkeypatch.setenv("TOOLKIT_CACHE", str(root / "cache"))
    train_tiny_teacher(data_dir, tmp_path / "again", fold=-1, frozen_stages=2,
                       extra=["--mixed-views", str(MIXED), "--label-smoothing", "0.1"])
    targets = torch.cat(seen)
    data = load_course_folder(data_dir, progress=False)
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    smoothed_onehot = targets.max(1).values > 0.9          # plain views: 0.9 + 0.1 / C
    assert 0 < smoothed_onehot.sum() < len(targets)        # both kinds of view were drawn
    _, train_idx, _ = fold_split(data.labels, 3, 0, -1)
    params = sample_mixed_views(len(data), 2 + MIXED, train_idx, 0)[:, 2:]
    possible = 0.9 * mixed_hard_targets(data.labels, params, len(data.classes)).flatten(0, 1) + 0.1 / 3
    for t in targets[~smoothed_onehot][:10]:          # every mixed target is one of the views' mixed labels
        assert (possible - t).abs().max(1).values.min() < 1e-5


def test_distill_on_the_same_views_reads_the_teachers_own_labels(world, monkeypatch, tmp_path):
    """distill.py --views 2 + mixed, same view seed and rows: no whole-teacher pass labels
    anything, and the targets are the teacher on each rendered view (fp16 trunk features)."""
    import toolkit.teachers
    root, data_dir, folder = world
    monkeypatch.setenv("TOOLKIT_CACHE", str(root / "cache"))

    def no_whole_teacher(*args, **kwargs):
        raise AssertionError("a view was labelled by a whole-teacher pass")
    monkeypatch.setattr(toolkit.teachers, "teacher_runner", no_whole_teacher)
    arch = write_arch(tmp_path / "arch.py")
    prov = distill.main(distill_argv(data_dir, arch, tmp_path / "model.pth", tmp_path / "work", [folder],
                                     views=2 + MIXED, val_fold=-1, epochs=1))
    assert prov["ensemble"]["views"] == 2 + MIXED
    monkeypatch.undo()

    teacher = load_teacher(folder)
    data = load_course_folder(data_dir, progress=False)
    _, train_idx, _ = fold_split(data.labels, 3, 0, -1)
    params = sample_mixed_views(len(data), 2 + MIXED, train_idx, 0)[:, 2:]
    stored = teacher_mixed_logits(teacher, data.rgb, params, train_idx, "rgb", data.fingerprint)
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "empty-cache"))
    whole = teacher_mixed_logits(teacher, data.rgb, params, train_idx, "rgb", data.fingerprint, save=False)
    torch.testing.assert_close(stored.float().softmax(-1), whole.float().softmax(-1), atol=1e-2, rtol=0)


@pytest.mark.parametrize("flags, culprit", [(["--view-seed", "3"], "--view-seed"),
                                            (["--min-crop", "0.5"], "--min-crop"),
                                            (["--no-trunk-cache", "--mixed-views", "2"], "--mixed-views")])
def test_mixed_view_options_off_the_mixed_path_are_refused(flags, culprit):
    from toolkit.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=rf"^{culprit}: acts on .* only, not on this run's path; drop it$"):
        parse_config(train_teacher.TeacherConfig, flags)
