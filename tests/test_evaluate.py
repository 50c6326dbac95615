"""toolkit.metrics / toolkit.report / toolkit.evaluate on small synthetic data.

Metrics are checked against scikit-learn and against numbers written out by hand; the
grader mode against a plain per-image loop with its own numpy copy of the server's
preprocessing; exports against eager PyTorch; the report end to end with a tiny timm teacher.
"""
import csv
import json
import re
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score,
                             precision_recall_fscore_support)

from helpers import assert_one_line_error, brightness_by_class, build_course, server_grey_uint8, write_labels
from toolkit import metrics as M
from toolkit.evaluate import main
from toolkit.student import CLASSES
from toolkit.student import exec_architecture

ARCH = Path(__file__).resolve().parents[1] / "architecture.py"
FIGURES = ["confusion_student.png", "confusion_ensemble.png", "reliability.png",
           "per_class_accuracy.png", "student_wrong_ensemble_right.png"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Data cache in tmp (never ~/.cache); one torch thread (fast on a busy 2-core box)."""
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# Synthetic course folder, student and teacher
# ----------------------------------------------------------------------------------------
SIZES = [(100, 100), (137, 90), (64, 81), (120, 57), (99, 101)]  # (w, h): crop, pad, odd differences
USED = ["cat", "cup", "dog", "tree"]


def make_folder(folder: Path, labels: list[str], seed: int = 0) -> Path:
    """tests/helpers.py build_course: SIZES cycled, every 4th image grey ('L')."""
    # a class-dependent brightness so the images differ in a learnable-looking way; grey JPEGs
    # occur in the course data too
    return build_course(folder, labels, brightness_by_class(USED, SIZES, seed), first=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    labels = [USED[i % len(USED)] for i in range(16)]
    return make_folder(tmp_path_factory.mktemp("data") / "small", labels)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A freshly initialised student, its head scaled up so that predictions are spread out."""
    torch.manual_seed(0)
    model = exec_architecture(ARCH)["model"]
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    path = tmp_path_factory.mktemp("student") / "model.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    import timm
    from toolkit.teachers import build_teacher, save_teacher
    name = "test_efficientnet" if timm.is_model("test_efficientnet") else "resnet10t"
    torch.manual_seed(0)
    teacher = build_teacher(name, CLASSES, "rgb", 64, pretrained="none")
    folder = tmp_path_factory.mktemp("teachers") / "tiny"
    save_teacher(folder, teacher, config={}, metrics={}, pretrained="none")
    return folder


def error_line(excinfo) -> str:
    return assert_one_line_error(excinfo.value)


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 0]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 4, 3, 1, 0]  # class 4 predicted, never true


def test_classification_metrics_equal_sklearn():
    assert M.accuracy(Y_TRUE, Y_PRED) == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert M.accuracy(Y_TRUE, Y_PRED) == pytest.approx(7 / 12)
    with pytest.warns(UserWarning):  # sklearn warns about class 4; ours stays quiet
        expected_bal = balanced_accuracy_score(Y_TRUE, Y_PRED)
    assert M.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx(expected_bal)
    assert M.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((3 / 4 + 1 / 2 + 2 / 4 + 1 / 2) / 4)
    assert M.macro_f1(Y_TRUE, Y_PRED) == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro", zero_division=0))
    pc = M.per_class_precision_recall(Y_TRUE, Y_PRED, num_classes=6)
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=range(6), zero_division=0)
    np.testing.assert_allclose(pc["precision"], p)
    np.testing.assert_allclose(pc["recall"], r)
    np.testing.assert_array_equal(pc["support"], [4, 2, 4, 2, 0, 0])
    # by hand: class 0 predicted 4 times, 3 of them right; class 2 predicted 3 times, 2 right
    assert pc["precision"][0] == pytest.approx(3 / 4)
    assert pc["precision"][2] == pytest.approx(2 / 3)
    cm = M.confusion(Y_TRUE, Y_PRED, 6)
    assert cm.shape == (6, 6) and cm.sum() == 12 and cm[2, 4] == 1 and np.trace(cm) == 7


def test_nll_kl_agreement_by_hand():
    p = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]
    q = [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]
    lp, lq = np.log(p), np.log(q)
    assert M.nll(lp, [0, 2]) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    kl = [sum(a * math.log(a / b) for a, b in zip(pi, qi)) for pi, qi in zip(p, q)]
    assert M.mean_kl(lp, lq) == pytest.approx(sum(kl) / 2)
    assert M.mean_kl(lp, lp) == pytest.approx(0.0, abs=1e-12)
    # logits and log-probs of the same distribution give the same answers
    assert M.nll(lp + 5.0, [0, 2]) == pytest.approx(M.nll(lp, [0, 2]))
    ag = M.agreement([0, 1, 2, 2, 1], [0, 2, 2, 1, 1], y_true=[0, 1, 1, 2, 2], num_classes=4)
    assert ag["overall"] == pytest.approx(3 / 5)
    np.testing.assert_allclose(ag["per_class"][:3], [1.0, 0.5, 0.5])
    assert math.isnan(ag["per_class"][3])  # no samples of class 3


def three_class(p_max: float, label: int) -> tuple[list[float], int]:
    rest = (1 - p_max) / 2
    return [p_max, rest, rest], label


def test_ece_hand_computed():
    # Confidence and correctness of each sample (the prediction is always class 0), and its
    # bin among the 15 bins B_m = (m/15, (m+1)/15], m = 0..14:
    #   0.90 right, 0.90 wrong, 0.90 right -> 0.90*15 = 13.5 -> B_13 = (0.867, 0.933]
    #   0.50 right                         -> 0.50*15 = 7.5  -> B_7  = (0.467, 0.533]
    #   0.42 wrong                         -> 0.42*15 = 6.3  -> B_6  = (0.400, 0.467]
    #   1.00 right                         -> 1.00*15 = 15   -> B_14 = (0.933, 1.000]
    rows = [three_class(0.9, 0), three_class(0.9, 1), three_class(0.9, 0), three_class(0.5, 0),
            three_class(0.42, 2), ([1.0, 0.0, 0.0], 0)]
    probs = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    with np.errstate(divide="ignore"):
        lp = np.log(probs)
    bins = M.reliability_bins(lp, y)
    expected_counts = np.zeros(15, dtype=int)
    expected_counts[[13, 7, 6, 14]] = [3, 1, 1, 1]
    np.testing.assert_array_equal(bins["count"], expected_counts)
    assert bins["accuracy"][13] == pytest.approx(2 / 3) and bins["confidence"][13] == pytest.approx(0.9)
    assert math.isnan(bins["accuracy"][0])
    # ECE = sum_b n_b/n |acc_b - conf_b|
    #     = 3/6 |2/3 - 0.9| + 1/6 |1 - 0.5| + 1/6 |0 - 0.42| + 1/6 |1 - 1|
    #     = 0.5 * 0.23333 + (0.5 + 0.42 + 0) / 6 = 0.116667 + 0.153333 = 0.27
    expected = 0.5 * (0.9 - 2 / 3) + (0.5 + 0.42 + 0.0) / 6
    assert expected == pytest.approx(0.27)
    assert M.ece(lp, y) == pytest.approx(expected)


def test_temperature_scaling_is_in_sample_optimum():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(200, 5, generator=g)  # over-confident, mostly wrong
    y = torch.randint(0, 5, (200,), generator=g)
    lp = logits.log_softmax(1)
    ts = M.temperature_scale(lp, y)
    assert ts["temperature"] > 1.5
    assert ts["nll"] < M.nll(lp, y)
    assert M.nll(lp / ts["temperature"], y) == pytest.approx(ts["nll"], rel=1e-5)


def test_cost_metrics():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3))
    assert M.parameter_count(net) == 4 * 9 + 256 * 3 + 3
    # conv: 8*8 outputs x 4 channels x 9 MACs; linear: 256 x 3
    assert M.count_macs(net, torch.zeros(1, 1, 10, 10)) == 64 * 4 * 9 + 256 * 3
    lat = M.latency(net, torch.zeros(1, 1, 10, 10), runs=3, warmup=1)
    assert lat["runs"] == 3 and 0 < lat["min_s"] <= lat["median_s"]


# ----------------------------------------------------------------------------------------
# grader
# ----------------------------------------------------------------------------------------
def hand_server_grey(path: Path) -> np.ndarray:
    """The server's preprocessing, written out again with PIL + numpy only."""
    grey = server_grey_uint8(np.asarray(Image.open(path).convert("RGB")))
    for axis in (0, 1):
        n = grey.shape[axis]
        if n > 100:
            grey = grey.take(range((n - 100) // 2, (n - 100) // 2 + 100), axis=axis)
        elif n < 100:
            pad = [(0, 0), (0, 0)]
            pad[axis] = ((100 - n) // 2, 100 - n - (100 - n) // 2)
            grey = np.pad(grey, pad, mode="edge")
    return grey


def test_grader_equals_plain_loop(tmp_path, weights, capsys):
    """Labels are chosen from a hand-written per-image loop (own preprocessing) so that it
    gets exactly every other image right: the grader must then print 6/12."""
    folder = make_folder(tmp_path / "graded", [USED[i % 4] for i in range(12)], seed=1)
    model = exec_architecture(ARCH)["model"]
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    names = [row.split(";")[0] for row in (folder / "labels.csv").read_text().splitlines()[1:]]
    preds = []
    for name in names:
        x = torch.from_numpy(hand_server_grey(folder / name)).float()[None, None] / 255
        with torch.no_grad():
            preds.append(int(model(x).argmax(1)))
    labels = [CLASSES[p if i % 2 == 0 else (p + 1) % 20] for i, p in enumerate(preds)]
    write_labels(folder, list(zip(names, labels)))
    correct = sum(CLASSES[p] == c for p, c in zip(preds, labels))
    assert correct == 6

    main(["grader", "--data", str(folder), "--arch", str(ARCH), "--weights", str(weights)])
    assert capsys.readouterr().out == f"accuracy: {correct / 12:.4f} ({correct}/12)\n" == "accuracy: 0.5000 (6/12)\n"


# ----------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated
def test_export_parity(folder, weights, tmp_path, capsys):
    out = tmp_path / "export"
    main(["export", "--arch", str(ARCH), "--weights", str(weights), "--out", str(out),
          "--images", str(folder), "--n-check", "6"])
    printed = capsys.readouterr().out
    assert "torchscript" in printed and "onnx" in printed and "FAILED" not in printed
    result = json.loads((out / "export.json").read_text())
    assert result["torchscript"]["max_abs_diff"] <= 1e-4
    assert result["onnx"]["max_abs_diff"] <= 1e-4
    assert result["parity_images"] == 6 and result["classes"] == CLASSES

    # independently: reload both files and compare with the eager student on another batch size
    import onnxruntime as ort
    from toolkit.student import load_student
    from toolkit.data import load_course_folder
    model = load_student(ARCH, weights)
    x = load_course_folder(folder, classes=CLASSES, progress=False).grey[:5].float() / 255
    with torch.no_grad():
        ref = model(x)
        ts = torch.jit.load(str(out / "student.torchscript.pt"))(x)
    sess = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    assert (ts - ref).abs().max() <= 1e-4
    assert (onnx_out - ref).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------
# report and predict
# ----------------------------------------------------------------------------------------
def test_report_end_to_end(folder, weights, teacher_dir, tmp_path, capsys):
    out = tmp_path / "reports" / "tiny"
    main(["report", "--data", str(folder), "--arch", str(ARCH), "--weights", str(weights),
          "--teachers", str(teacher_dir), "--out", str(out), "--latency-runs", "2", "--batch-size", "5"])
    for name in ["report.md", "metrics.json", *FIGURES]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in FIGURES:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 100
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 16 and m["classes"] == CLASSES
    assert set(m["predictors"]) == {"student", "ensemble", "teacher:tiny"}
    for s in m["predictors"].values():
        assert 0 <= s["accuracy"] <= 1 and s["nll"] > 0 and 0 <= s["ece"] <= 1 and s["ts_temperature"] > 0
    # one teacher: the ensemble is that teacher
    assert m["predictors"]["ensemble"]["accuracy"] == m["predictors"]["teacher:tiny"]["accuracy"]
    assert m["predictors"]["ensemble"]["nll"] == pytest.approx(m["predictors"]["teacher:tiny"]["nll"], rel=1e-5)
    assert m["student_vs_ensemble"]["mean_kl_ensemble_to_student"] >= 0
    assert m["efficiency"]["student"]["parameters"] > 0 and m["efficiency"]["student"]["macs_per_image"] > 0
    assert m["efficiency"]["student"]["latency_batch256"]["batch"] == 256
    assert sum(m["per_class"]["support"]) == 16 and len(m["per_class"]["class"]) == 20
    text = (out / "report.md").read_text()
    assert "in-sample" in text and all(f"({png})" in text for png in FIGURES)
    # the student numbers in the report are the grader's
    capsys.readouterr()
    main(["grader", "--data", str(folder), "--arch", str(ARCH), "--weights", str(weights)])
    assert capsys.readouterr().out.startswith(f"accuracy: {m['predictors']['student']['accuracy']:.4f}")

    # restricted to a subset of samples
    (tmp_path / "fold.json").write_text(json.dumps({"indices": [0, 3, 5, 10]}))
    out2 = tmp_path / "reports" / "fold"
    main(["report", "--data", str(folder), "--arch", str(ARCH), "--weights", str(weights),
          "--teachers", str(teacher_dir), "--out", str(out2), "--latency-runs", "0",
          "--indices-file", str(tmp_path / "fold.json")])
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["n"] == 4 and m2["meta"]["indices_file"].endswith("fold.json")


def test_predict_csv_student_and_teachers(folder, weights, teacher_dir, tmp_path):
    extra = tmp_path / "loose.png"
    Image.fromarray(np.full((30, 250), 128, np.uint8)).save(extra)  # grey PNG, odd size
    for who in (["--student", str(ARCH), str(weights)], ["--teachers", str(teacher_dir)]):
        out = tmp_path / f"preds-{who[0][2:]}.csv"
        main(["predict", "--images", str(folder), str(extra), "--out", str(out), *who])
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["file", "class", "probability"]
        assert len(rows) == 17 and rows[-1]["file"] == str(extra)
        assert all(r["class"] in CLASSES and 0 < float(r["probability"]) <= 1 for r in rows)


def test_predict_uses_provenance_classes(folder, weights, tmp_path):
    w = tmp_path / "model.pth"
    w.write_bytes(weights.read_bytes())
    renamed = [f"c{i:02d}" for i in range(20)]
    (tmp_path / "model.provenance.json").write_text(json.dumps({"classes": renamed}))
    out = tmp_path / "p.csv"
    main(["predict", "--images", str(folder), "--out", str(out), "--student", str(ARCH), str(w)])
    with open(out, newline="") as f:
        assert {r["class"] for r in csv.DictReader(f)} <= set(renamed)


# ----------------------------------------------------------------------------------------
# bad input: one clear line naming the culprit
# ----------------------------------------------------------------------------------------
def test_unknown_class_is_one_line(tmp_path, weights, teacher_dir):
    bad = make_folder(tmp_path / "bad", ["cat", "unicorn", "dog"])
    with pytest.raises(SystemExit) as e:
        main(["grader", "--data", str(bad), "--arch", str(ARCH), "--weights", str(weights)])
    msg = error_line(e)
    assert "unknown class 'unicorn'" in msg and "labels.csv:3" in msg
    with pytest.raises(SystemExit) as e:
        main(["report", "--data", str(bad), "--arch", str(ARCH), "--weights", str(weights),
              "--teachers", str(teacher_dir), "--out", str(tmp_path / "r")])
    assert "unknown class 'unicorn'" in error_line(e)


def test_weights_that_do_not_fit(folder, tmp_path):
    model = exec_architecture(ARCH)["model"]
    state = model.state_dict()
    state["classifier.weight"] = torch.zeros(10, state["classifier.weight"].shape[1])  # 10 classes, not 20
    state["classifier.bias"] = torch.zeros(10)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    for cmd in (["grader", "--data", str(folder)], ["export", "--out", str(tmp_path / "x")]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--arch", str(ARCH), "--weights", str(bad)])
        msg = error_line(e)
        assert str(bad) in msg and "does not fit" in msg and "classifier.weight" in msg


def test_architecture_importing_numpy(folder, weights, tmp_path):
    arch = tmp_path / "architecture.py"
    arch.write_text("import numpy as np\n" + ARCH.read_text())
    with pytest.raises(SystemExit) as e:
        main(["grader", "--data", str(folder), "--arch", str(arch), "--weights", str(weights)])
    msg = error_line(e)
    assert str(arch) in msg and "numpy" in msg


def test_other_bad_inputs(folder, weights, teacher_dir, tmp_path):
    broken = tmp_path / "broken.py"
    text, n = re.subn(r"^model = MyCNN\((.*)\)(.*)$", r"model = MyCNN(stages=undefined_name)", ARCH.read_text(),
                      flags=re.M)
    assert n == 1
    broken.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["grader", "--data", str(folder), "--arch", str(broken), "--weights", str(weights)])
    assert str(broken) in error_line(e) and "undefined_name" in error_line(e)

    (tmp_path / "fold.json").write_text("[0, 99]")
    with pytest.raises(SystemExit) as e:
        main(["report", "--data", str(folder), "--arch", str(ARCH), "--weights", str(weights),
              "--teachers", str(teacher_dir), "--out", str(tmp_path / "r"),
              "--indices-file", str(tmp_path / "fold.json")])
    assert "index 99 out of range" in error_line(e)

    with pytest.raises(SystemExit) as e:
        main(["predict", "--images", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "p.csv"),
              "--student", str(ARCH), str(weights)])
    assert "nope.jpg" in error_line(e)

    with pytest.raises(SystemExit) as e:
        main(["report", "--data", str(folder), "--arch", str(ARCH), "--weights", str(weights),
              "--teachers", str(tmp_path / "no_teacher"), "--out", str(tmp_path / "r")])
    assert "no_teacher" in error_line(e)


def test_report_leads_with_out_of_fold_and_held_out_figures(folder, weights, tmp_path):
    """Two fold teachers (2-fold split): each is scored on its own val fold only, the ensemble on
    every image by the teacher that did not train on it, the student on the fold its provenance
    held out; all of these lead report.md, in-sample scores after them."""
    from toolkit.data import load_course_folder
    from toolkit.splits import stratified_folds
    from toolkit.teachers import build_teacher, predict_logits, save_teacher
    import timm
    name = "test_efficientnet" if timm.is_model("test_efficientnet") else "resnet10t"
    data = load_course_folder(folder, classes=CLASSES, progress=False)
    dirs = []
    for fold in (0, 1):
        torch.manual_seed(fold + 1)
        t = build_teacher(name, CLASSES, "rgb", 64, pretrained="none")
        config = {"fold": fold, "folds": 2, "seed": 0, "data_fingerprint": data.fingerprint}
        dirs.append(save_teacher(tmp_path / f"t{fold}", t, config=config, metrics={}, pretrained="none").parent)
    folds = stratified_folds(data.labels, 2, 0)
    from toolkit.teachers import load_teacher
    correct = {f: (predict_logits(load_teacher(d), data.rgb).argmax(1) == data.labels)[folds == f]
               for f, d in enumerate(dirs)}
    w = tmp_path / "model.pth"
    w.write_bytes(weights.read_bytes())
    (tmp_path / "model.provenance.json").write_text(json.dumps(
        {"classes": CLASSES, "val_fold": 1, "config": {"folds": 2, "seed": 0, "split_seed": -1},
         "run": {"data_fingerprint": data.fingerprint}}))
    nested = tmp_path / "nested.provenance.json"
    nested.write_text(json.dumps({"val_fold": 0, "val_images": 1997, "recipe": "cached kd",
                                  "student_val": {"val_acc": 0.8655, "val_nll": 0.495},
                                  "ensemble": {"ensemble_val_acc": 0.871}, "config": {"seed": 2}}))
    out = tmp_path / "r"
    main(["report", "--data", str(folder), "--arch", str(ARCH), "--weights", str(w), "--teachers", *map(str, dirs),
          "--out", str(out), "--latency-runs", "0", "--heldout", str(nested)])
    m = json.loads((out / "metrics.json").read_text())
    rows = {r["predictor"]: r for r in m["honest"]}
    for f in (0, 1):
        r = rows[f"teacher:t{f}"]
        assert (r["images"] == int((folds == f).sum())
                and r["accuracy"] == pytest.approx(correct[f].float().mean().item()))
    ens = rows["ensemble"]
    assert ens["images"] == 16
    assert ens["accuracy"] * 16 == pytest.approx(sum(int(c.sum()) for c in correct.values()))
    with open(out / "per_class.csv") as f:
        assert next(csv.reader(f))[:2] == ["class", "n"]
    student_rows = [r for r in m["honest"] if r["predictor"] == "student"]
    assert len(student_rows) == 1 and student_rows[0]["images"] == int((folds == 1).sum())
    assert (rows["student (nested held-out)"]["accuracy"] == 0.8655
            and "fold 0, seed 2" in rows["student (nested held-out)"]["what"])
    assert m["seen_fraction"]["student"] == pytest.approx(float((folds != 1).float().mean()))
    assert m["seen_fraction"]["ensemble"] == 1.0
    text = (out / "report.md").read_text()
    sections = re.findall(r"^## (.*)$", text, flags=re.M)
    assert sections[0].startswith("Honest estimates") and sections[1].startswith("All evaluated images")
    assert "0.8655" in text.split("## All evaluated")[0]

    # another folder: the teachers' and the student's fold splits say nothing about it
    other = make_folder(tmp_path / "other", [USED[i % len(USED)] for i in range(8)], seed=5)
    main(["report", "--data", str(other), "--arch", str(ARCH), "--weights", str(w), "--teachers", *map(str, dirs),
          "--out", str(tmp_path / "r_other"), "--latency-runs", "0"])
    m = json.loads((tmp_path / "r_other" / "metrics.json").read_text())
    assert m["honest"] == [] and set(m["seen_fraction"].values()) == {None}
    assert "'-': unknown" in (tmp_path / "r_other" / "report.md").read_text()

    bad = tmp_path / "pipeline.provenance.json"
    bad.write_text(json.dumps({"val_fold": -1, "student_val": {}, "config": {}}))
    with pytest.raises(SystemExit) as e:
        main(["report", "--data", str(folder), "--arch", str(ARCH), "--weights", str(w), "--teachers", str(dirs[0]),
              "--out", str(tmp_path / "r2"), "--latency-runs", "0", "--heldout", str(bad)])
    assert "not a held-out run" in error_line(e)
    # a student whose val fold some teacher trained on is no nested estimate, whatever it claims
    leaky = tmp_path / "leaky.provenance.json"
    leaky.write_text(json.dumps({**json.loads(nested.read_text()),
                                 "ensemble": {"ensemble_val_acc": 0.871, "val_seen_by_teachers": 412}}))
    with pytest.raises(SystemExit) as e:
        main(["report", "--data", str(folder), "--arch", str(ARCH), "--weights", str(w), "--teachers", str(dirs[0]),
              "--out", str(tmp_path / "r3"), "--latency-runs", "0", "--heldout", str(leaky)])
    assert "not a nested held-out run: 412 of its 1997 val images" in error_line(e)
