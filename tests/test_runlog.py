"""Per-run summary.csv + learning curve written by the Trainer, and the runs-comparison table."""
import csv
import json

import pytest
import torch
import yaml
from PIL import Image

from helpers import assert_one_line_error
from toolkit.engine import Trainer, warmup_cosine
from toolkit.evaluate import main
from toolkit.runlog import compare_runs


def train_tiny(out, epochs=3, lr=0.1, seed=0):
    """A linear classifier on 32 fixed points, with a val metric: a real Trainer run in ~0.1 s."""
    torch.manual_seed(seed)
    x, y = torch.randn(32, 4), torch.arange(32) % 2
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = Trainer(model, opt, warmup_cosine(opt, epochs * 4, 1), out, epochs, seed, checkpoint_every=0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"lr": lr, "epochs": epochs, "seed": 0, "out": str(out)}))

    def loss_fn(net, idx, generator):
        return {"loss": torch.nn.functional.cross_entropy(net(x[idx]), y[idx])}

    def evaluate(net):
        with torch.no_grad():
            return {"val_acc": (net(x).argmax(1) == y).float().mean().item()}
    return trainer.fit(lambda e: list(torch.arange(32).split(8)), loss_fn, evaluate)


def test_trainer_writes_summary_csv_and_learning_curve(tmp_path):
    history = train_tiny(tmp_path / "run")
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_acc", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log == history
    for r, h in zip(rows, log):
        assert float(r["train_loss"]) == pytest.approx(h["train_loss"]) and float(r["lr"]) == pytest.approx(h["lr"])
    assert log[0]["lr"] > log[-1]["lr"]  # cosine decay is what the lr column records
    with Image.open(tmp_path / "run" / "learning_curve.png") as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_compare_runs_lists_differing_config_and_final_metrics(tmp_path, capsys):
    a, b = train_tiny(tmp_path / "runs" / "a", lr=0.1), train_tiny(tmp_path / "runs" / "b", lr=0.5)
    table = compare_runs([tmp_path / "runs"])  # a parent folder: its runs are found below it
    assert list(table["run"]) == [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")]
    assert "lr" in table and "epochs" in table and "seed" not in table  # only what differs (epochs: metric)
    assert list(table["lr"]) == [0.1, 0.5]
    assert list(table["val_acc"]) == [a[-1]["val_acc"], b[-1]["val_acc"]]
    assert list(table["best_val_acc"]) == [max(r["val_acc"] for r in h) for h in (a, b)]

    capsys.readouterr()
    main(["compare", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"), "--out", str(tmp_path / "t.csv")])
    printed = capsys.readouterr().out
    assert printed.startswith("| run | lr |") and "2 runs written" in printed
    with open(tmp_path / "t.csv", newline="") as f:
        assert [r["lr"] for r in csv.DictReader(f)] == ["0.1", "0.5"]
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "nothing_here")])
    assert_one_line_error(e.value, "nothing_here")
