"""Mixed views labelled once (issue 21): parameters stored, pixels rendered again.

* rendering: the plain view is the image, the mirror its flip, a crop is the bilinear resize of
  exactly that box, CutMix pastes the partner's pixels in the box, mixup blends; the RGB and the
  grey rendering of one view show the same crop and the same mix;
* sampling: deterministic, anchors first, partners only from the pool (never a val image);
* targets: the stored label of a view is the ensemble on exactly that rendered view; the hard-label
  control's target is lam * y_i + (1 - lam) * y_partner with the share lam of the pixels;
* distill.py --view-kind mixed end to end, distilled and --hard-labels, on the tiny world.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distill
from helpers_distill import CLASSES, distill_argv, tiny_world
from toolkit.config import ConfigError
from toolkit.data import load_course_folder, server_grey
from toolkit.ensemble import Ensemble
from toolkit.mixviews import (CUTMIX, MIX_FIELDS, MIXUP, identity_views, mix_weights, mixed_hard_targets,
                              mixed_view_targets, render_views, sample_mixed_views, teacher_mixed_logits)
from toolkit.splits import fold_split
from toolkit.teachers import load_teacher

F_ = {name: i for i, name in enumerate(MIX_FIELDS)}


def images(n=6, c=3, seed=0):
    return torch.randint(0, 256, (n, c, 100, 100), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def view(**fields):
    row = identity_views(1, 1)[0, 0].clone()
    for name, value in fields.items():
        row[F_[name]] = value
    return row.view(1, -1)


def test_plain_and_mirror_views_are_the_image_exactly():
    x = images()
    idx = torch.arange(len(x))
    assert torch.equal(render_views(x, idx, identity_views(len(x), 1)[:, 0]), x)
    mirror = identity_views(len(x), 1)[:, 0]
    mirror[:, F_["flip"]] = 1
    assert torch.equal(render_views(x, idx, mirror), x.flip(-1))


def test_a_crop_is_the_bilinear_resize_of_exactly_that_box():
    x = images(2)
    got = render_views(x, torch.tensor([1]), view(x0=10, y0=30, side=50))
    want = F.interpolate(x[1:2, :, 30:80, 10:60].float(), size=(100, 100), mode="bilinear", align_corners=False)
    # inside; on the outermost output pixels the sample point lies a quarter pixel outside the
    # box, where the crop-then-resize reads the box's edge and the render the image's next pixel
    # (a grey level at most: the two compute the same weights in a different float order, and .5 rounds either way)
    diff = (got.float() - want.round())[..., 1:-1, 1:-1].abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02
    flipped = render_views(x, torch.tensor([1]), view(x0=10, y0=30, side=50, flip=1))
    assert torch.equal(flipped, got.flip(-1))


def test_cutmix_pastes_the_partners_pixels_and_mixup_blends():
    x = images(3)
    cut = render_views(x, torch.tensor([0]), view(partner=2, kind=CUTMIX, bx0=20, bx1=60, by0=5, by1=45))
    inside = torch.zeros(100, 100, dtype=torch.bool)
    inside[5:45, 20:60] = True
    assert torch.equal(cut[0][:, inside], x[2][:, inside])
    assert torch.equal(cut[0][:, ~inside], x[0][:, ~inside])
    mix = render_views(x, torch.tensor([0]), view(partner=1, kind=MIXUP, lam_permille=250))
    assert torch.equal(mix[0], (0.25 * x[0].float() + 0.75 * x[1].float()).round().to(torch.uint8))
    assert mix_weights(view(partner=2, kind=CUTMIX, bx0=20, bx1=60, by0=5, by1=45)).item() == pytest.approx(0.84)
    assert mix_weights(view(partner=1, kind=MIXUP, lam_permille=250)).item() == pytest.approx(0.25)


def test_rgb_and_grey_renderings_show_the_same_crop_and_mix():
    rgb = images(8)
    grey = server_grey(rgb.float() / 255).mul(255).round().to(torch.uint8)                     # (N, 1, H, W)
    params = sample_mixed_views(8, 5, torch.arange(8), seed=3)
    idx = torch.arange(8).repeat_interleave(5)
    flat = params.view(-1, len(MIX_FIELDS))
    # the same geometry and mix, channel by channel: an RGB image with R = G = B renders to the grey rendering
    assert torch.equal(render_views(grey.expand(-1, 3, -1, -1).contiguous(), idx, flat),
                       render_views(grey, idx, flat).expand(-1, 3, -1, -1))
    # plain views and mixes without resampling commute with the server's per-pixel grey map exactly
    grey_of_rgb = server_grey(render_views(rgb, idx, flat).float() / 255).mul(255).round()
    plain = flat[:, F_["kind"]] == 0
    assert torch.equal(grey_of_rgb[plain], render_views(grey, idx, flat)[plain].float())


def test_sampling_is_deterministic_with_anchors_and_partners_from_the_pool():
    pool = torch.tensor([2, 3, 5, 7])
    a = sample_mixed_views(10, 6, pool, seed=1)
    assert torch.equal(a, sample_mixed_views(10, 6, pool, seed=1))
    assert not torch.equal(a, sample_mixed_views(10, 6, pool, seed=2))
    assert torch.equal(a[:, 0], identity_views(10, 1)[:, 0])
    assert (a[:, 1, F_["flip"]] == 1).all() and (a[:, 1, F_["kind"]] == 0).all()
    mixed = a[:, 2:]
    assert set(mixed[..., F_["partner"]].unique().tolist()) <= set(pool.tolist())
    assert set(mixed[..., F_["kind"]].unique().tolist()) == {CUTMIX, MIXUP}
    side = mixed[..., F_["side"]]
    assert (side >= 59).all() and (side <= 100).all()                      # area >= 0.35 of 100 x 100
    assert (mixed[..., F_["x0"]] + side <= 100).all() and (mixed[..., F_["y0"]] + side <= 100).all()
    with pytest.raises(ValueError, match="pool"):
        sample_mixed_views(4, 3, torch.tensor([], dtype=torch.long), seed=0)


def test_mixed_hard_targets_weigh_both_labels_by_their_pixels():
    labels = torch.tensor([0, 1, 2])
    params = identity_views(3, 2)
    params[0, 1] = view(partner=2, kind=MIXUP, lam_permille=700)[0]
    params[1, 1] = view(partner=0, kind=CUTMIX, bx0=0, bx1=50, by0=0, by1=100)[0]
    t = mixed_hard_targets(labels, params, 3)
    assert torch.allclose(t.sum(-1), torch.ones(3, 2))
    assert torch.allclose(t[0, 1], torch.tensor([0.7, 0.0, 0.3]))
    assert torch.allclose(t[1, 1], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.equal(t[:, 0], F.one_hot(labels, 3).float())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("mixviews"), trunk_teacher=True) as world:
        yield world


@pytest.mark.parametrize("target_input", ["rgb", "grey"])
def test_stored_targets_are_the_ensemble_on_exactly_the_rendered_view(world, shared_cache, target_input):
    data = load_course_folder(world.data, progress=False)
    teachers = [load_teacher(f) for f in world.teachers]
    ensemble = Ensemble(teachers)
    folds, train_idx, val_idx = fold_split(data.labels, 3, 0, 0)
    params = sample_mixed_views(len(data), 4, train_idx, seed=0)
    targets, metrics, records = mixed_view_targets(ensemble, data, params, folds, train_idx, val_idx, oof=False,
                                                   target_input=target_input)
    assert targets.shape == (len(train_idx), 4, len(CLASSES)) and targets.dtype == torch.float16
    source = data.rgb if target_input == "rgb" else data.grey
    i = train_idx.repeat_interleave(4)
    k = torch.arange(4).repeat(len(train_idx))
    pixels = render_views(source, i, params[i, k])
    with torch.no_grad():
        want = ensemble(pixels.expand(-1, 3, -1, -1)).exp().view(len(train_idx), 4, -1)
    assert torch.allclose(targets.float(), want, atol=2e-3)
    assert metrics["target_input"] == target_input and len(records) == len(teachers)
    # labelled once: the second call reads the cache, the same bits
    again = teacher_mixed_logits(teachers[0], source, params, train_idx, target_input, data.fingerprint)
    assert torch.equal(again, teacher_mixed_logits(teachers[0], source, params, train_idx, target_input,
                                                   data.fingerprint, save=False))


def test_plain_and_mirror_labels_come_from_the_teachers_trunk_caches(world, shared_cache, monkeypatch):
    """A frozen-trunk teacher labels the anchor views with its head on its own trunk cache (no
    trunk pass), the mixed views whole; both equal the teacher on the rendered view."""
    import toolkit.mixviews as mixviews
    data = load_course_folder(world.data, progress=False)
    teacher = load_teacher(world.trunk)
    folds, train_idx, val_idx = fold_split(data.labels, 3, 0, 1)
    params = sample_mixed_views(len(data), 4, train_idx, seed=5)
    assert mixviews.stored_anchor_columns([teacher], params, data.fingerprint) == [0, 1]
    rendered = []
    real = mixviews.teacher_mixed_logits
    monkeypatch.setattr(mixviews, "teacher_mixed_logits",
                        lambda t, im, p, *a, **k: rendered.append(p.shape[1]) or real(t, im, p, *a, **k))
    targets, metrics, _ = mixed_view_targets(Ensemble([teacher]), data, params, folds, train_idx, val_idx, oof=False)
    assert rendered == [2]                                   # the two mixed columns only; val from the cache too
    i, k = train_idx.repeat_interleave(4), torch.arange(4).repeat(len(train_idx))
    with torch.no_grad():
        want = teacher(render_views(data.rgb, i, params[i, k])).softmax(-1).view(len(train_idx), 4, -1)
    assert torch.allclose(targets.float(), want, atol=1e-2)   # trunk features are stored in fp16
    with torch.no_grad():
        val_acc = (teacher(data.rgb[val_idx]).argmax(-1) == data.labels[val_idx]).float().mean().item()
    assert metrics["ensemble_val_acc"] == pytest.approx(val_acc, abs=1e-4)


@pytest.mark.parametrize("scratch", [False, True])
def test_distill_on_mixed_views_end_to_end(world, shared_cache, tmp_path, scratch):
    out = tmp_path / "model.pth"
    teachers = () if scratch else world.teachers
    prov = distill.main(distill_argv(world.data, world.arch, out, tmp_path / "work", teachers, views=4,
                                     view_kind="mixed", hard_labels=scratch, student_frozen_stages=1))
    saved = json.loads(out.with_suffix(".provenance.json").read_text())
    assert saved["recipe"] == ("hard labels" if scratch else "mixed kd")
    assert saved["config"]["view_kind"] == "mixed" and prov["student_val"] == saved["student_val"]
    if not scratch:
        assert saved["ensemble"]["views"] == 4 and 0 <= saved["ensemble"]["target_train_acc"] <= 1


def test_mixed_views_refuse_online_mode_and_mixup(world, tmp_path):
    for flags, culprit in (({"mode": "online"}, "--view-kind: .*--mode cached"), ({"mixup": 0.2}, "--mixup: ")):
        with pytest.raises(ConfigError, match=culprit):
            distill.main(distill_argv(world.data, world.arch, tmp_path / "m.pth", tmp_path / "w", world.teachers,
                                      view_kind="mixed", **flags))
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "w").exists()


def test_a_recipe_gives_the_student_mixed_views_and_leaves_the_teachers_views():
    import train_teacher
    from helpers_distill import ROOT
    from toolkit.config import parse_config
    recipe = str(ROOT / "recipes" / "mixed.yaml")
    student = parse_config(distill.DistillConfig, ["--recipe", recipe])
    assert (student.view_kind, student.views) == ("mixed", 6)
    control = parse_config(distill.DistillConfig, ["--recipe", recipe, "--hard-labels"])
    assert (control.view_kind, control.views) == ("mixed", 6)  # the hard-label control gets the same views
    assert parse_config(train_teacher.TeacherConfig, ["--recipe", recipe]).views == 2


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("teacher_split", ["folds", "all"])
def test_pipeline_with_a_mixed_recipe_pairs_student_and_control_on_the_same_views(tmp_path, monkeypatch, one_thread,
                                                                                  teacher_split):
    """The whole pipeline on tiny data, real scripts: teachers with frozen trunks (fold teachers, or
    one per recipe on every image but the held-out fold), then the student and its hard-label
    control on the recipe's mixed views, held-out fold 0 of 3, and the report."""
    import pipeline
    import yaml
    from helpers_distill import make_course_folder, write_arch
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the report looks for nested estimates under ./runs
    data = make_course_folder(tmp_path / "data", counts={"book": 9, "car": 9, "cat": 9})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "folds": 3, "views": 2, "teachers": ["test_efficientnet@32"], "teacher_split": teacher_split,
        "teacher": {"pretrained": "none", "epochs": 1, "batch_size": 8, "frozen_stages": 2, "warmup_epochs": 0.5,
                    "device": "cpu", "trivial_augment": False},
        "student": {"epochs": 1, "batch_size": 8, "lr": 0.3, "warmup_epochs": 0.5, "student_init": "none",
                    "student_frozen_stages": 1, "arch": str(write_arch(tmp_path / "arch.py")), "device": "cpu",
                    "view_kind": "mixed", "views": 4}}))
    work, report = tmp_path / "work", tmp_path / "report"
    pipeline.main(["--data", str(data), "--recipe", str(recipe), "--teachers-root", str(tmp_path / "teachers"),
                   "--heldout-fold", "0", "--hard-label-control", "--work-dir", str(work),
                   "--out", str(tmp_path / "model.pth"), "--report-dir", str(report),
                   *(["--no-report"] if teacher_split == "folds" else [])])
    student = json.loads((tmp_path / "model.provenance.json").read_text())
    control = json.loads((work / "scratch" / "model.provenance.json").read_text())
    assert student["recipe"] == "mixed kd" and control["recipe"] == "hard labels"
    for prov in (student, control):
        assert (prov["config"]["view_kind"], prov["config"]["views"], prov["config"]["view_seed"]) == ("mixed", 4, 0)
    assert student["ensemble"]["val_seen_by_teachers"] == 0 and student["ensemble"]["views"] == 4
    assert (work / "heldout_pairs.csv").read_text().splitlines()[0] == "fold,seed,distilled,hard_label"
    folders = sorted(t["folder"] for t in student["teachers"])
    if teacher_split == "folds":
        assert [Path(f).name for f in folders] == ["test_efficientnet_32px_f1", "test_efficientnet_32px_f2"]
    else:  # one teacher, in-sample on every training image, never on the held-out fold
        assert [Path(f).name for f in folders] == ["test_efficientnet_32px_all"]
        saved = yaml.safe_load((Path(folders[0]) / "config.yaml").read_text())
        assert (saved["fold"], saved["exclude_folds"]) == (-1, [0])
        assert (report / "report.md").is_file()
