"""toolkit.augment: view re-indexing against numpy, grey/RGB correspondence, mixup/cutmix
targets and TrivialAugment on small batches."""
import numpy as np
import pytest
import torch

from toolkit.augment import (apply_views, batch_flip_lr, batch_random_translate, mixup_cutmix,
                             random_view_params, sample_view_params, to_float, trivial_augment)
from toolkit.data import rgb_to_server_grey


def rand_uint8(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def np_view(img, flip, dx, dy):
    """Reference in numpy: (C, H, W) -> mirror, np.pad(mode='edge'), crop shifted by (dx, dy)."""
    C, H, W = img.shape
    if flip:
        img = img[:, :, ::-1]
    s = max(abs(dx), abs(dy), 1)
    padded = np.pad(img, ((0, 0), (s, s), (s, s)), mode="edge")
    return padded[:, s + dy: s + dy + H, s + dx: s + dx + W]


# ---- apply_views -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_identity_params_return_input(dtype):
    x = rand_uint8(4, 3, 7, 9).to(dtype)
    out = apply_views(x, torch.zeros(4, 3, dtype=torch.int8))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, x)


def test_flip_matches_torch_flip_and_twice_is_identity():
    x = rand_uint8(5, 1, 6, 8)
    mirror = torch.tensor([[1, 0, 0]] * 5)
    assert torch.equal(apply_views(x, mirror), x.flip(3))
    assert torch.equal(apply_views(apply_views(x, mirror), mirror), x)
    g = torch.Generator().manual_seed(3)
    p = random_view_params(5, 0, generator=g)
    assert torch.equal(apply_views(apply_views(x, p), p), x)


@pytest.mark.parametrize("flip,dx,dy", [(0, 2, 0), (0, 0, -3), (0, -1, 2), (1, 3, 1),
                                        (1, -2, -2), (0, 9, -9), (1, 0, 0)])
def test_translation_equals_numpy_edge_pad_crop(flip, dx, dy):
    x = rand_uint8(2, 3, 7, 8, seed=flip * 100 + dx * 10 + dy)
    out = apply_views(x, torch.tensor([[flip, dx, dy], [0, 0, 0]]))
    ref = np_view(x[0].numpy(), flip, dx, dy)
    assert np.array_equal(out[0].numpy(), ref)
    assert torch.equal(out[1], x[1])  # per-sample params: the other row is untouched


def test_random_views_match_numpy_per_sample():
    x = rand_uint8(6, 2, 10, 10, seed=5)
    p = sample_view_params(6, 1, 4, seed=1)[:, 0]  # view 0 is identity: draw random ones too
    p = torch.cat([p[:1], random_view_params(5, 4, generator=torch.Generator().manual_seed(2))])
    out = apply_views(x, p)
    for b in range(6):
        f, dx, dy = p[b].tolist()
        assert np.array_equal(out[b].numpy(), np_view(x[b].numpy(), f, dx, dy))


def test_grey_and_rgb_views_correspond():
    rgb = rand_uint8(6, 3, 12, 12, seed=7)
    grey = torch.from_numpy(np.stack([rgb_to_server_grey(im.permute(1, 2, 0).numpy())
                                      for im in rgb]))[:, None]
    params = sample_view_params(6, 4, 3, seed=11)
    for v in range(4):
        rgb_v, grey_v = apply_views(rgb, params[:, v]), apply_views(grey, params[:, v])
        grey_of_rgb_v = np.stack([rgb_to_server_grey(im.permute(1, 2, 0).numpy()) for im in rgb_v])
        assert np.array_equal(grey_of_rgb_v, grey_v[:, 0].numpy())


def test_apply_views_rejects_bad_shapes():
    with pytest.raises(ValueError):
        apply_views(rand_uint8(2, 1, 4, 4), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        apply_views(rand_uint8(1, 4, 4), torch.zeros(1, 3, dtype=torch.long))


# ---- view params -----------------------------------------------------------------------
def test_sample_view_params():
    p = sample_view_params(50, 6, 4, seed=0)
    assert p.shape == (50, 6, 3) and p.dtype == torch.int8
    assert (p[:, 0] == 0).all()
    assert (p[:, 1] == torch.tensor([1, 0, 0], dtype=torch.int8)).all()
    rest = p[:, 2:]
    assert set(rest[..., 0].unique().tolist()) == {0, 1}
    assert rest[..., 1:].min() == -4 and rest[..., 1:].max() == 4  # range used and respected
    assert torch.equal(p, sample_view_params(50, 6, 4, seed=0))
    assert not torch.equal(p, sample_view_params(50, 6, 4, seed=1))
    assert (sample_view_params(3, 1, 4, seed=0) == 0).all()  # k=1: identity only


# ---- random wrappers -------------------------------------------------------------------
def test_random_wrappers_shapes_dtypes_determinism():
    x = rand_uint8(8, 1, 10, 10)
    for fn in (lambda g: batch_flip_lr(x, g), lambda g: batch_random_translate(x, 2, g)):
        a = fn(torch.Generator().manual_seed(0))
        b = fn(torch.Generator().manual_seed(0))
        assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    flipped = batch_flip_lr(x, torch.Generator().manual_seed(0))
    mirrored = [not torch.equal(flipped[b], x[b]) for b in range(8)]
    for b in range(8):  # each sample is either itself or its mirror ...
        assert torch.equal(flipped[b], x[b].flip(2) if mirrored[b] else x[b])
    assert 0 < sum(mirrored) < 8  # ... and both happen (a no-op flip fails here)
    shifted = batch_random_translate(x, 2, torch.Generator().manual_seed(1))
    assert sum(not torch.equal(shifted[b], x[b]) for b in range(8)) >= 4  # most samples move
    assert torch.equal(batch_random_translate(x, 0, torch.Generator().manual_seed(1)), x)


def test_to_float():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.shape == x.shape
    assert torch.allclose(f.flatten(), torch.tensor([0.0, 128 / 255, 1.0]))
    with pytest.raises(TypeError):
        to_float(f)


# ---- mixup / cutmix --------------------------------------------------------------------
def _distinct_batch(B=6, C=3, H=8, W=8):
    return to_float(rand_uint8(B, C, H, W, seed=21))


def test_mixup_targets_are_convex_combinations_matching_pixels():
    x, y = _distinct_batch(), torch.tensor([0, 1, 2, 3, 4, 0])
    xm, ym = mixup_cutmix(x, y, 5, mixup_alpha=1.0, cutmix_alpha=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert xm.shape == x.shape and ym.shape == (6, 5) and ym.dtype == torch.float32
    assert torch.allclose(ym.sum(1), torch.ones(6)) and (ym >= 0).all()
    onehot = torch.nn.functional.one_hot(y, 5).float()
    lams = []
    for i in range(6):  # find the partner j and lambda from the pixels, check the targets
        fits = []
        for j in range(6):
            d = (x[i] - x[j]).flatten()
            if j == i or d.norm() == 0:
                continue
            lam = float(((xm[i] - x[j]).flatten() @ d) / (d @ d))
            if torch.allclose(xm[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5):
                fits.append((j, lam))
        assert fits, f"row {i} is not a mix of two inputs"
        assert any(torch.allclose(ym[i], lam * onehot[i] + (1 - lam) * onehot[j], atol=1e-5)
                   for j, lam in fits)
        lams.append(max(lam for _, lam in fits))
    assert any(0.05 < lam < 0.95 for lam in lams), lams  # the rows are really mixed (not a no-op)


def test_cutmix_targets_equal_pixel_fractions_and_soft_inputs():
    x = _distinct_batch()
    probs = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), 1)
    xm, ym = mixup_cutmix(x, probs, 4, mixup_alpha=0.0, cutmix_alpha=1.0,
                          generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ym.sum(1), torch.ones(6), atol=1e-6)
    owns = [(xm[i] == x[i]).all(0).float().mean().item() for i in range(6)]
    assert any(0 < own < 1 for own in owns), owns  # boxes were really pasted (not a no-op)
    for i in range(6):
        own = (xm[i] == x[i]).all(0).float().mean().item()  # fraction of own pixels
        others = [j for j in range(6) if j != i and ((xm[i] == x[i]) | (xm[i] == x[j])).all()]
        assert others or own == 1.0
        if own < 1.0:
            j = others[0]
            assert torch.allclose(ym[i], own * probs[i] + (1 - own) * probs[j], atol=1e-5)
        else:
            assert torch.allclose(ym[i], probs[i], atol=1e-6)


def test_mixup_cutmix_deterministic_and_leaves_global_rng_alone():
    x, y = _distinct_batch(), torch.tensor([0, 1, 2, 3, 4, 0])
    state = torch.get_rng_state()
    a = mixup_cutmix(x, y, 5, 0.8, 1.0, torch.Generator().manual_seed(9))
    b = mixup_cutmix(x, y, 5, 0.8, 1.0, torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    xm, ym = mixup_cutmix(x, y, 5, 0.0, 0.0)
    assert torch.equal(xm, x) and torch.equal(ym.argmax(1), y)
    with pytest.raises(ValueError):
        mixup_cutmix(x, torch.tensor([0, 1, -1, 3, 4, 0]), 5, 1.0, 0.0)
    with pytest.raises(TypeError):
        mixup_cutmix(rand_uint8(6, 3, 8, 8), y, 5, 1.0, 0.0)


# ---- TrivialAugment --------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_trivial_augment_runs_and_is_deterministic(channels):
    x = rand_uint8(8, channels, 100, 100, seed=channels)
    state = torch.get_rng_state()
    changed, outputs = 0, []
    for seed in range(4):  # 4 x 8 chunks: exercises most of the op space
        a = trivial_augment(x, torch.Generator().manual_seed(seed))
        assert a.shape == x.shape and a.dtype == torch.uint8
        assert torch.equal(a, trivial_augment(x, torch.Generator().manual_seed(seed)))
        changed += sum(not torch.equal(a[b], x[b]) for b in range(len(x)))
        outputs.append(a)
    # it really augments: most images change (some ops, e.g. identity, may leave one as it is),
    # and another seed gives another batch
    assert changed >= 0.6 * 4 * len(x), changed
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError):
        trivial_augment(to_float(x))
