"""Mixed views labelled once: random resized crops with CutMix or mixup between two images.

A *mixed view* of image i is 15 integers (one row of ``MIX_FIELDS``):

    flip, x0, y0, side            the square crop [y0, y0+side) x [x0, x0+side) of image i,
                                  mirrored if flip, resized to the full H x W (bilinear)
    partner, p_flip, p_x0, p_y0, p_side
                                  the same for a second image (the mix partner)
    kind                          0 plain, 1 CutMix (Yun 2019), 2 mixup (Zhang 2018)
    bx0, by0, bx1, by1            CutMix: the box [by0, by1) x [bx0, bx1) shows the partner
    lam_permille                  mixup: weight of image i, in 1/1000

Only these parameters are stored, with the ensemble's probabilities on exactly the view they
describe (FKD, Shen & Xing 2022; SRe2L's relabel step): the pixels are rendered again whenever
they are needed, from the RGB images for the teachers and from the server's grey images for the
student, so memory does not grow with the number of views, and the teacher labels exactly the
crop and the mix the student sees (Beyer et al. 2022, "A good teacher is patient and
consistent": function matching on mixed views). Rendering is a per-pixel-position operation
(crop, flip, bilinear resize, box paste, linear blend) done on the whole batch at once with one
``grid_sample``; rounded to uint8 as the server's images are.

The hard-label control gets the same views with the mixed hard label
lam * onehot(y_i) + (1 - lam) * onehot(y_partner), lam the share of image i
(``mix_weights``), so it is never given a weaker recipe than the student.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

MIX_FIELDS = ("flip", "x0", "y0", "side", "partner", "p_flip", "p_x0", "p_y0", "p_side",
              "kind", "bx0", "by0", "bx1", "by1", "lam_permille")
PLAIN, CUTMIX, MIXUP = 0, 1, 2
_F = {name: i for i, name in enumerate(MIX_FIELDS)}


def identity_views(n: int, k: int, size: int = 100) -> torch.Tensor:
    """(n, k, 15) int32: every view the plain image (whole crop, no flip, no mix)."""
    params = torch.zeros(n, k, len(MIX_FIELDS), dtype=torch.int32)
    params[..., _F["side"]] = size
    params[..., _F["p_side"]] = size
    params[..., _F["partner"]] = torch.arange(n, dtype=torch.int32).view(n, 1)
    params[..., _F["lam_permille"]] = 1000
    return params


def sample_mixed_views(n: int, k: int, pool: torch.Tensor, seed: int, anchors: int = 2,
                       min_crop_area: float = 0.35, cutmix_prob: float = 0.5, size: int = 100) -> torch.Tensor:
    """(n, k, 15) int32 view parameters, deterministic in ``seed``.

    Views 0 and 1 (the first ``anchors``, at most 2) are the plain image and its mirror: what
    the server shows, labelled too. Every further view is a random square crop (area fraction
    uniform in [min_crop_area, 1], position uniform inside the image, mirrored with p = 1/2)
    mixed with a random crop of a partner drawn from ``pool`` (the training images: a held-out
    image must never leak into training as a partner), by CutMix with probability
    ``cutmix_prob`` (box area uniform in [0, 1], as Beta(1, 1)), else by mixup (lam ~ U[0, 1]).
    """
    if not 0 < min_crop_area <= 1:
        raise ValueError(f"min_crop_area must be in (0, 1], got {min_crop_area}")
    if not 0 <= cutmix_prob <= 1:
        raise ValueError(f"cutmix_prob must be in [0, 1], got {cutmix_prob}")
    pool = torch.as_tensor(pool, dtype=torch.long).flatten()
    if not len(pool):
        raise ValueError("sample_mixed_views: the partner pool is empty")
    g = torch.Generator().manual_seed(seed)
    params = identity_views(n, k, size)
    if k > 1 and anchors > 1:
        params[:, 1, _F["flip"]] = 1
    m = n * max(k - min(anchors, 2), 0)
    if m == 0:
        return params

    def crops(count):
        area = min_crop_area + (1 - min_crop_area) * torch.rand(count, generator=g)
        side = (area.sqrt() * size).round().clamp(8, size).long()
        x0 = (torch.rand(count, generator=g) * (size - side + 1)).long()
        y0 = (torch.rand(count, generator=g) * (size - side + 1)).long()
        flip = torch.randint(0, 2, (count,), generator=g)
        return flip, x0, y0, side

    rows = params[:, min(anchors, 2):].reshape(m, len(MIX_FIELDS))
    for names, values in ((("flip", "x0", "y0", "side"), crops(m)), (("p_flip", "p_x0", "p_y0", "p_side"), crops(m))):
        for name, v in zip(names, values):
            rows[:, _F[name]] = v.int()
    rows[:, _F["partner"]] = pool[torch.randint(0, len(pool), (m,), generator=g)].int()
    cut = torch.rand(m, generator=g) < cutmix_prob
    rows[:, _F["kind"]] = torch.where(cut, CUTMIX, MIXUP).int()
    # CutMix box (Yun et al. 2019): area fraction 1 - lam with lam ~ U[0, 1], centre uniform, clipped
    lam = torch.rand(m, generator=g)
    half = (size * (1 - lam).sqrt() / 2)
    cx, cy = torch.rand(m, generator=g) * size, torch.rand(m, generator=g) * size
    rows[:, _F["bx0"]] = (cx - half).round().clamp(0, size).int()
    rows[:, _F["bx1"]] = (cx + half).round().clamp(0, size).int()
    rows[:, _F["by0"]] = (cy - half).round().clamp(0, size).int()
    rows[:, _F["by1"]] = (cy + half).round().clamp(0, size).int()
    rows[:, _F["lam_permille"]] = torch.where(cut, 1000, (torch.rand(m, generator=g) * 1000).round().int()).int()
    params[:, min(anchors, 2):] = rows.view(n, -1, len(MIX_FIELDS))
    return params


def mix_weights(params: torch.Tensor, size: int = 100) -> torch.Tensor:
    """(..., 15) view parameters -> (...) float32 share lam of image i in the view (1 for a
    plain view; CutMix: 1 - box area / image area; mixup: lam_permille / 1000)."""
    p = params.long()
    box = ((p[..., _F["bx1"]] - p[..., _F["bx0"]]) * (p[..., _F["by1"]] - p[..., _F["by0"]])).float() / size ** 2
    lam = torch.ones(p.shape[:-1])
    lam = torch.where(p[..., _F["kind"]] == CUTMIX, 1 - box, lam)
    return torch.where(p[..., _F["kind"]] == MIXUP, p[..., _F["lam_permille"]].float() / 1000, lam)


def mixed_hard_targets(labels: torch.Tensor, params: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) labels, (N, K, 15) views -> (N, K, C) float32 lam * onehot(y_i) + (1 - lam) * onehot(y_partner)."""
    lam = mix_weights(params).unsqueeze(-1)                                           # (N, K, 1)
    own = F.one_hot(labels.long(), num_classes).float().unsqueeze(1)                  # (N, 1, C)
    other = F.one_hot(labels.long()[params[..., _F["partner"]].long()], num_classes).float()
    return lam * own + (1 - lam) * other


def _crop_grid(flip: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, side: torch.Tensor,
               height: int, width: int) -> torch.Tensor:
    """The sampling grid (B, H, W, 2) of square crops resized to H x W (align_corners=False):
    output column j samples input x = x0 + (j + 0.5) * side / W - 0.5; the whole-image crop is
    the identity, exactly."""
    B = flip.shape[0]
    sx, sy = side.float() / width, side.float() / height
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = torch.where(flip != 0, -sx, sx)
    theta[:, 0, 2] = (2 * x0.float() + side.float()) / width - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * y0.float() + side.float()) / height - 1
    return F.affine_grid(theta, [B, 1, height, width], align_corners=False)


def _render_crops(images_u8: torch.Tensor, idx: torch.Tensor, flip, x0, y0, side) -> torch.Tensor:
    x = images_u8[idx].float()                                                        # (B, C, H, W)
    H, W = x.shape[-2:]
    plain = (flip == 0) & (x0 == 0) & (y0 == 0) & (side == W) & (side == H)
    if bool(plain.all()):
        return x
    grid = _crop_grid(flip, x0, y0, side, H, W).to(x.device)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(plain.view(-1, 1, 1, 1).to(x.device), x, out)


def render_views(images_u8: torch.Tensor, idx: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The views ``params`` (B, 15) of images ``idx`` (B,) of ``images_u8`` (N, C, H, W) uint8
    (the partner indices point into the same N) -> (B, C, H, W) uint8, rounded."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise ValueError(f"render_views expects (N, C, H, W) uint8 images, got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    p = torch.as_tensor(params).long()
    idx = torch.as_tensor(idx).long()
    if p.dim() != 2 or p.shape != (len(idx), len(MIX_FIELDS)):
        raise ValueError(f"params must be ({len(idx)}, {len(MIX_FIELDS)}), got {tuple(p.shape)}")
    col = {name: p[:, i] for i, name in enumerate(MIX_FIELDS)}
    own = _render_crops(images_u8, idx, col["flip"], col["x0"], col["y0"], col["side"])
    kind = col["kind"]
    if bool((kind == PLAIN).all()):
        return own.round().clamp(0, 255).to(torch.uint8)
    other = _render_crops(images_u8, col["partner"], col["p_flip"], col["p_x0"], col["p_y0"], col["p_side"])
    H, W = own.shape[-2:]
    rows = torch.arange(H).view(1, H, 1)
    cols = torch.arange(W).view(1, 1, W)
    in_box = ((rows >= col["by0"].view(-1, 1, 1)) & (rows < col["by1"].view(-1, 1, 1))
              & (cols >= col["bx0"].view(-1, 1, 1)) & (cols < col["bx1"].view(-1, 1, 1)))   # (B, H, W)
    paste = (in_box & (kind == CUTMIX).view(-1, 1, 1)).unsqueeze(1).to(own.device)
    lam = torch.where(kind == MIXUP, col["lam_permille"].float() / 1000, torch.ones(len(kind)))
    lam = lam.view(-1, 1, 1, 1).to(own.device)
    mixed = torch.where(paste, other, lam * own + (1 - lam) * other)
    return mixed.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# The teachers' labels and the student's frozen-stage features of mixed views
# ----------------------------------------------------------------------------------------
def _rows_digest(*tensors: torch.Tensor, text: str = "") -> str:
    import hashlib
    h = hashlib.sha1(text.encode())
    for t in tensors:
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_weights_id(teacher) -> str:
    """What a teacher's view labels are keyed by: its teacher.pth's sha256, or its weights."""
    from .files import sha256_file
    folder = getattr(teacher, "folder", None)
    return sha256_file(Path(folder) / "teacher.pth") if folder else _rows_digest(
        *[p.detach().float() for p in teacher.state_dict().values()])


def view_labels_path(weights_id: str, column: torch.Tensor, rows: torch.Tensor, target_input: str,
                     fingerprint: str) -> Path:
    """The cache file of one teacher's logits on one view column ((R, 15) params of the rows
    ``rows``): the one place that names 'view-labels' files."""
    from .trunk import trunk_cache_path
    return trunk_cache_path(_rows_digest(column, rows.long(), text=f"{weights_id}|{target_input}|{fingerprint}"),
                            prefix="view-labels")


@torch.no_grad()
def mixed_trunk_features(teacher, split, images_u8: torch.Tensor, params: torch.Tensor, rows: torch.Tensor,
                         trunk_key: str, device="cpu", save: bool = True) -> torch.Tensor:
    """(len(rows), K, C', h, w) fp16 frozen-trunk features of the mixed views ``params`` ((N, K, 15))
    of the images ``rows``, rendered from ``images_u8`` (train_teacher.py --mixed-views: the head
    trains on them). Cached on disk ('mixed-trunk-<key>': the teacher's trunk key, the views, the
    rows), so a teacher of the same trunk and views (another member's fold, a rerun) reuses them."""
    from .trunk import cached_trunk_features, trunk_cache_path
    rows = rows.long()
    path = trunk_cache_path(_rows_digest(params[rows], rows, text=trunk_key), prefix="mixed-trunk")
    return cached_trunk_features(path, teacher, split, images_u8, params, device, save=save,
                                 desc="trunk features of mixed views", rows=rows, render=render_views)


@torch.no_grad()
def store_mixed_view_labels(teacher, images_u8: torch.Tensor, params: torch.Tensor, rows: torch.Tensor,
                            features: torch.Tensor, fingerprint: str, device="cpu") -> int:
    """Label the mixed views a teacher trained on, with its saved weights: its head on their
    cached trunk features ``features`` ((len(rows), K, C', h, w) of ``params`` (N, K, 15)). Each
    column goes where ``teacher_mixed_logits`` looks it up (RGB renderings), so distill.py's
    labelling of these very views is a cache read. -> the number of columns written."""
    from .ensemble import teacher_view_logits
    from .io import atomic_save
    rows = rows.long()
    logits = teacher_view_logits(teacher, images_u8, params[rows], features=features, device=device)  # (R, K, C)
    weights_id = teacher_weights_id(teacher)
    for j in range(params.shape[1]):
        atomic_save(logits[:, j].half(), view_labels_path(weights_id, params[rows, j], rows, "rgb", fingerprint))
    return params.shape[1]


@torch.no_grad()
def teacher_mixed_logits(teacher, images_u8: torch.Tensor, params: torch.Tensor, rows: torch.Tensor,
                         target_input: str = "rgb", fingerprint: str = "", device="cpu",
                         batch_size: int = 128, save: bool = True, desc: str = "") -> torch.Tensor:
    """(len(rows), K, C) float16 logits of one teacher (the whole model, its input size) on the
    views ``params[rows]`` ((N, K, 15)) rendered from ``images_u8``: the RGB images, or with
    ``target_input`` 'grey' the server's grey images (N, 1, H, W) replicated to 3 channels (what
    the student sees, in the teacher's input format). Each view column is kept on disk
    ('view-labels-<key>': the teacher's weights file, that column's views, the rows, the input and
    the data), so each view of each teacher is labelled once, whichever set of views a run asks for."""
    from tqdm import tqdm
    from .io import atomic_save
    from .teachers import teacher_runner
    if target_input not in ("rgb", "grey"):
        raise ValueError(f"target_input must be rgb or grey, got {target_input!r}")
    weights_id = teacher_weights_id(teacher)
    rows = rows.long()
    teacher.eval()
    columns = []
    for j in range(params.shape[1]):
        column = params[rows, j]                                                            # (R, 15)
        path = view_labels_path(weights_id, column, rows, target_input, fingerprint)
        if path.is_file():
            try:
                columns.append(torch.load(path, map_location="cpu", weights_only=True))
                continue
            except Exception:
                pass  # a corrupt cache file is recomputed and rewritten
        out, run = [], None
        label = f"{desc or 'labelling'}, view {j + 1}/{params.shape[1]}"
        for start in tqdm(range(0, len(rows), batch_size), desc=label, unit="batch", leave=False):
            views = render_views(images_u8, rows[start:start + batch_size], column[start:start + batch_size])
            views = views.expand(-1, 3, -1, -1).to(device)
            if run is None:  # ONNX Runtime when it can, checked against torch on this first batch
                run = teacher_runner(teacher, views, device)
            out.append(run(views).float().cpu())
        columns.append(torch.cat(out).half())
        if save:
            try:
                atomic_save(columns[-1], path)
            except OSError:
                pass  # a cache only saves time
    return torch.stack(columns, 1)


def stored_anchor_columns(teachers, params: torch.Tensor, fingerprint: str) -> list[int]:
    """The view columns that are the plain image or its mirror for every image, if each teacher's
    own trunk cache (train_teacher.py's, made for its identity and mirror views) is on disk: their
    labels are then the teachers' heads on those features, no trunk pass. Else []."""
    from .augment import sample_view_params
    from .trunk import stored_trunk_features
    p = params.long()
    whole = ((p[..., _F["kind"]] == PLAIN) & (p[..., _F["x0"]] == 0) & (p[..., _F["y0"]] == 0)
             & (p[..., _F["side"]] == 100)).all(0)                                                # (K,)
    flips = [int(p[0, j, _F["flip"]]) for j in range(p.shape[1])]
    columns = [j for j in range(p.shape[1]) if whole[j] and bool((p[:, j, _F["flip"]] == flips[j]).all())]
    if sorted(flips[j] for j in columns)[:2] != [0, 1]:
        return []
    columns = [next(j for j in columns if flips[j] == 0), next(j for j in columns if flips[j] == 1)]
    own = sample_view_params(p.shape[0], 2, 0, 0)                                      # identity, mirror
    if not fingerprint or any(stored_trunk_features(t, own, fingerprint) is None for t in teachers):
        return []
    return columns


def mixed_view_targets(ensemble, data, params: torch.Tensor, folds: torch.Tensor, train_idx: torch.Tensor,
                       val_idx: torch.Tensor, oof: bool = True, target_input: str = "rgb",
                       device="cpu", verbose: bool = True) -> tuple[torch.Tensor, dict, list[dict]]:
    """The ensemble's probabilities on the mixed views of the training images.

    -> ((len(train_idx), K, C) float16 probabilities, metrics, teacher records). Each training image's views are
    labelled by the teachers that never trained on it (``oof``, as ``view_soft_targets``; an
    image every teacher saw falls back to all of them), on the RGB or grey (``target_input``)
    rendering. The metrics score the same ensemble, same input, on the val fold's plain images
    (``ensemble_val_acc``) and the targets on the training images' plain view (``target_train_acc``)."""
    import time
    from .ensemble import combine_view_targets, members_view_logits, oof_teacher_mask, teacher_records
    from .augment import sample_view_params
    from .splits import val_seen_by_teachers
    from .trunk import rebuild_own_trunk_cache
    t0 = time.time()
    teachers, labels = list(ensemble.teachers), data.labels
    images = data.rgb if target_input == "rgb" else data.grey
    n_train = len(train_idx)
    mask = oof_teacher_mask(teachers, folds, labels) if oof else torch.ones(len(teachers), len(data), dtype=torch.bool)
    seen = val_seen_by_teachers(teachers, folds, labels, val_idx)  # warned now, not after an hour of labelling
    member = torch.zeros(len(teachers), n_train, params.shape[1], len(ensemble.classes))     # (M, R, K, C)
    val_member = torch.zeros(len(teachers), len(val_idx), 1, len(ensemble.classes))
    plain = identity_views(len(data), 1)
    if target_input == "rgb":  # a fresh clone with committed teachers: their own trunk caches are rebuilt
        own = sample_view_params(len(data), 2, 0, 0)  # (identity, mirror), so the anchors' labels are
        for teacher in teachers:                      # the same bits as where the teachers were trained
            rebuild_own_trunk_cache(teacher, data.rgb, own, data.fingerprint, device)
    anchors = stored_anchor_columns(teachers, params, data.fingerprint) if target_input == "rgb" else []
    if anchors:  # the plain image and its mirror: the teachers' heads on their own trunk caches
        needed = mask.clone()
        needed[:, val_idx] = True
        shift = torch.zeros(len(data), len(anchors), 3, dtype=torch.int8)
        shift[:, :, 0] = params[:, anchors, _F["flip"]].to(torch.int8)
        logits = members_view_logits(teachers, data.rgb, shift, data.fingerprint, needed, device)  # (M, N, J, C)
        member[:, :, anchors] = logits[:, train_idx].float()
        val_member[:] = logits[:, val_idx, :1].float()
    rest = [j for j in range(params.shape[1]) if j not in anchors]
    for m, teacher in enumerate(teachers):
        name = getattr(teacher, "folder", teacher.model_name)
        own = mask[m, train_idx]
        if own.any() and rest:
            member[m, own.nonzero()[:, :1], rest] = teacher_mixed_logits(
                teacher, images, params[:, rest], train_idx[own], target_input, data.fingerprint, device,
                save=verbose, desc=f"labelling views: {name}").float()
        if len(val_idx) and not anchors:
            val_member[m] = teacher_mixed_logits(teacher, images, plain, val_idx, target_input, data.fingerprint,
                                                 device, save=verbose, desc=f"val images: {name}").float()
    targets = combine_view_targets(member, ensemble.weights, mask[:, train_idx], ensemble.combine)   # (R, K, C)
    metrics = {"target_input": target_input, "views": int(params.shape[1]),
               "target_train_acc": round(float((targets[:, 0].argmax(-1) == labels[train_idx]).float().mean()), 4),
               "target_entropy": round(float(-(targets * targets.clamp(min=1e-30).log()).sum(-1).mean()), 4),
               "val_seen_by_teachers": seen, "target_seconds": round(time.time() - t0, 1)}
    if len(val_idx):
        val_probs = combine_view_targets(val_member, ensemble.weights, None, ensemble.combine)[:, 0]
        metrics["ensemble_val_acc"] = round(float((val_probs.argmax(-1) == labels[val_idx]).float().mean()), 4)
        metrics["ensemble_val_nll"] = round(float(F.nll_loss(val_probs.clamp(min=1e-30).log(), labels[val_idx])), 4)
        metrics["teachers_val_acc"] = {
            str(getattr(t, "folder", t.model_name)): round(float((val_member[m, :, 0].argmax(-1)
                                                                  == labels[val_idx]).float().mean()), 4)
            for m, t in enumerate(teachers)}
    return targets.half(), metrics, teacher_records(teachers, val_member[:, :, 0], labels[val_idx])
