"""Ensemble fitting on out-of-fold predictions: recipes, weights, greedy selection."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from toolkit.ensemble_fit import (fit_weights, greedy_selection, mixture_log_probs, recipe_groups, recipe_key,
                                  recipe_oof_log_probs)


def _members(n=400, c=5, seed=0):
    """Three members on n images: 'good' (right 90 %), 'weak' (right 50 %), 'noise' (random)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)

    def member(p_right, scale):
        right = torch.rand(n, generator=g) < p_right
        pred = torch.where(right, labels, torch.randint(0, c, (n,), generator=g))
        return F.one_hot(pred, c).float() * scale + 0.3 * torch.randn(n, c, generator=g)
    logits = torch.stack([member(0.9, 3.0), member(0.5, 3.0), member(0.0, 0.0)])
    return logits.log_softmax(-1), labels


def test_mixture_weights_zero_drops_member_exactly():
    log_p, _ = _members()
    mixed = mixture_log_probs(log_p, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(mixed, log_p[0], atol=1e-6)
    half = mixture_log_probs(log_p, torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(half.exp(), (log_p[0].exp() + log_p[1].exp()) / 2, atol=1e-6)


def test_fit_weights_prefers_the_good_member_and_beats_equal_weights():
    log_p, y = _members()
    w = fit_weights(log_p, y)
    assert w.shape == (3,) and abs(w.sum().item() - 1) < 1e-5 and (w >= 0).all()
    assert w[0] > w[1] > w[2] - 1e-6 and w[0] > 0.5
    equal = F.nll_loss(mixture_log_probs(log_p, torch.full((3,), 1 / 3)), y)
    fitted = F.nll_loss(mixture_log_probs(log_p, w), y)
    assert fitted < equal - 0.05


@pytest.mark.parametrize("metric", ["nll", "error"])
def test_greedy_selection_starts_from_best_and_is_deterministic(metric):
    log_p, y = _members()
    w = greedy_selection(log_p, y, rounds=10, metric=metric)
    assert abs(w.sum().item() - 1) < 1e-6
    assert w[0] == w.max() and w[2] == 0          # the noise member is never worth adding
    assert torch.equal(w, greedy_selection(log_p, y, rounds=10, metric=metric))
    # weights are pick counts over at most `rounds` picks: multiples of 1/picks
    picks = round(1 / w[w > 0].min().item()) if (w > 0).sum() > 1 else 1
    assert torch.allclose(w * picks, (w * picks).round(), atol=1e-5)


def test_greedy_selection_only_one_member_when_alone_is_best():
    log_p, y = _members()
    w = greedy_selection(log_p[[0, 2]], y, rounds=5, metric="nll")
    assert torch.equal(w, torch.tensor([1.0, 0.0]))


def test_greedy_selection_rejects_unknown_metric():
    log_p, y = _members()
    with pytest.raises(ValueError, match="metric"):
        greedy_selection(log_p, y, metric="acc")


def _teacher(model, size, fold, **extra):
    cfg = {"model": model, "input_size": size, "fold": fold, "out": f"teachers/x_f{fold}", "epochs": 6,
           "data_fingerprint": f"fp{fold}", "trunk_cache_key": f"k{size}", **extra}
    return SimpleNamespace(config=cfg, model_name=model)


def test_recipe_key_ignores_fold_and_output_but_not_the_recipe():
    a0, a1 = _teacher("efficientnet_lite0", 224, 0), _teacher("efficientnet_lite0", 224, 1)
    assert recipe_key(a0.config) == recipe_key(a1.config)
    assert recipe_key(a0.config).startswith("lite0@224/")
    assert recipe_key(a0.config) != recipe_key(_teacher("efficientnet_lite0", 160, 0).config)
    assert recipe_key(a0.config) != recipe_key(_teacher("efficientnet_lite0", 224, 0, epochs=12).config)
    assert recipe_key(a0.config) != recipe_key(_teacher("efficientnet_lite2", 224, 0).config)


def test_recipe_oof_log_probs_uses_each_images_out_of_fold_teacher():
    teachers = [_teacher("efficientnet_lite0", 224, f) for f in (0, 1)] + \
               [_teacher("efficientnet_lite2", 260, f) for f in (0, 1)]
    groups = recipe_groups(teachers)
    assert list(groups.values()) == [[0, 1], [2, 3]]
    n, c = 6, 4
    folds = torch.tensor([0, 1, 0, 1, 0, 1])
    logits = torch.randn(4, n, c)
    mask = torch.stack([folds == 0, folds == 1, folds == 0, folds == 1])   # teacher f holds out fold f
    log_p, covered = recipe_oof_log_probs(logits, mask, groups)
    assert log_p.shape == (2, n, c) and covered.all()
    for i in range(n):
        f = int(folds[i])
        assert torch.allclose(log_p[0, i], logits[f, i].log_softmax(-1), atol=1e-5)
        assert torch.allclose(log_p[1, i], logits[2 + f, i].log_softmax(-1), atol=1e-5)
    mask[1] = False                                   # recipe 0 has no out-of-fold teacher for fold 1
    _, covered = recipe_oof_log_probs(logits, mask, groups)
    assert torch.equal(covered, folds == 0)


# ----------------------------------------------------------------------------------------
# Inside the soft-target pass: fitted on the training images' out-of-fold predictions only
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_recipes(tmp_path_factory):
    """A tiny course folder and two 3-fold recipes of random tiny teachers (they differ in
    'epochs' and in their weights), so the two recipes predict differently."""
    from helpers_distill import build_tiny_teacher, make_course_folder
    from toolkit.data import load_course_folder
    from toolkit.teachers import load_teacher
    root = tmp_path_factory.mktemp("recipes")
    # its own cache: a module fixture runs before conftest's per-test TOOLKIT_CACHE, never in ~/.cache
    data = load_course_folder(make_course_folder(root / "data"), progress=False, cache_dir=root / "cache")
    teachers = [load_teacher(build_tiny_teacher(root / f"r{r}_f{f}", seed=10 * r + f,
                                                config={"fold": f, "folds": 3, "epochs": r + 1}))
                for r in range(2) for f in range(3)]
    return data, teachers


@pytest.mark.parametrize("weighting", ["fit", "greedy"])
def test_soft_targets_fit_on_training_images_only(two_recipes, weighting, monkeypatch, tmp_path):
    """Weights and temperature see the training images' out-of-fold predictions, never a val image."""
    import toolkit.ensemble as E
    from toolkit.augment import sample_view_params
    from toolkit.splits import stratified_folds
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    data, teachers = two_recipes
    folds = stratified_folds(data.labels, 3, 0)
    train_idx, val_idx = (folds != 0).nonzero().flatten(), (folds == 0).nonzero().flatten()
    seen = {}

    def spy(name, real):
        def wrapped(log_probs, labels, *a, **k):
            seen[name] = (log_probs.clone(), labels.clone())
            return real(log_probs, labels, *a, **k)
        return wrapped
    fit_name = "fit_weights" if weighting == "fit" else "greedy_selection"
    monkeypatch.setattr(E, fit_name, spy("weights", getattr(E, fit_name)))
    monkeypatch.setattr(E, "fit_temperature", spy("temperature", E.fit_temperature))
    params = sample_view_params(len(data), 2, 4, 0)
    targets, metrics, _ = E.view_soft_targets(E.Ensemble(teachers), data, params, folds, train_idx, val_idx,
                                              calibrate=True, weighting=weighting)
    w = metrics["recipe_weights"]
    assert len(w) == 2 and abs(sum(w.values()) - 1) < 1e-3 and metrics["temperature"] > 0
    for name in ("weights", "temperature"):
        _, labels = seen[name]
        assert torch.equal(labels, data.labels[train_idx])        # all training images, no val image
    log_p, _ = seen["weights"]
    assert log_p.shape == (2, len(train_idx), 3)                   # (recipes, images, classes)
    # the recipe predictions fitted on are each image's out-of-fold teacher's
    member = torch.stack([E.identity_view_logits(t, data.rgb, data.fingerprint) for t in teachers])
    i = int(train_idx[0])
    f = int(folds[i])
    torch.testing.assert_close(log_p[0, 0], member[f, i].log_softmax(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(log_p[1, 0], member[3 + f, i].log_softmax(-1), atol=1e-4, rtol=0)


def test_soft_targets_with_fitted_weights_are_the_weighted_oof_mixture(two_recipes, monkeypatch, tmp_path):
    from toolkit.augment import sample_view_params
    from toolkit.splits import stratified_folds
    from toolkit.ensemble import Ensemble, oof_teacher_mask, teacher_view_logits, view_soft_targets
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    data, teachers = two_recipes
    folds = stratified_folds(data.labels, 3, 0)
    train_idx, val_idx = (folds != 0).nonzero().flatten(), (folds == 0).nonzero().flatten()
    params = sample_view_params(len(data), 2, 4, 0)
    targets, metrics, _ = view_soft_targets(Ensemble(teachers), data, params, folds, train_idx, val_idx,
                                            weighting="fit")
    w = list(metrics["recipe_weights"].values())
    member = torch.stack([teacher_view_logits(t, data.rgb, params, data.fingerprint) for t in teachers]).softmax(-1)
    mask = oof_teacher_mask(teachers, folds, data.labels)
    for i in (int(train_idx[0]), int(val_idx[0])):
        f = mask[:, i].nonzero().flatten().tolist()      # one teacher of each recipe holds image i out
        assert len(f) == 2 and f[0] < 3 <= f[1]
        expected = (w[0] * member[f[0], i] + w[1] * member[f[1], i]) / (w[0] + w[1])
        torch.testing.assert_close(targets[i].float(), expected, atol=2e-3, rtol=0)


def test_soft_targets_refuse_unknown_weighting(two_recipes):
    from toolkit.backbones import TeacherError
    from toolkit.ensemble import Ensemble, view_soft_targets
    data, teachers = two_recipes
    with pytest.raises(TeacherError, match="equal, fit or greedy"):
        view_soft_targets(Ensemble(teachers), data, torch.zeros(len(data), 1, 3), torch.zeros(len(data)),
                          torch.arange(3), torch.arange(0), weighting="best")
