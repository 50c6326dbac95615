"""Fold-0 accuracy of single teachers and of equal-weight probability-mean ensembles of them.
Every teacher given must hold out fold 0 of the seed-0 5-fold split (checked)."""
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toolkit.data import load_course_folder  # noqa: E402
from toolkit.splits import stratified_folds  # noqa: E402
from toolkit.teachers import load_teacher  # noqa: E402
from toolkit.ensemble import identity_view_logits, teacher_saw  # noqa: E402

data = load_course_folder("../shared/data/training_data", progress=False)
folds = stratified_folds(data.labels, 5, 0)
val = (folds == 0).nonzero().flatten()
y = data.labels[val]
names, logp = [], []
for folder in sys.argv[1:]:
    t = load_teacher(folder)
    assert not teacher_saw(t, folds, data.labels)[val].any(), f"{folder} trained on fold 0"
    lp = identity_view_logits(t, data.rgb, data.fingerprint, images=val).log_softmax(-1)
    names.append(folder.rstrip('/').split('/')[-1])
    logp.append(lp)
    print(f"{names[-1]:<28} acc {(lp.argmax(1)==y).float().mean():.4f} nll {F.nll_loss(lp,y):.3f}", flush=True)
logp = torch.stack(logp)
for r in range(2, len(names) + 1):
    for combo in itertools.combinations(range(len(names)), r):
        mixed = torch.logsumexp(logp[list(combo)], 0) - torch.log(torch.tensor(float(r)))
        print(f"ens {'+'.join(names[i] for i in combo):<60} acc {(mixed.argmax(1)==y).float().mean():.4f} "
              f"nll {F.nll_loss(mixed,y):.3f}")
