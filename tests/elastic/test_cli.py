"""End to end: an elastic run (FFN widths and nested heads) trains, `braid extract` writes a
run `braid eval`/`generate` load, and `braid elastic sweep` writes its CSV and Pareto plot.

Tolerances: the extracted run's val loss is printed to 4 decimals and must equal, to those
decimals, the universal model evaluated at the same widths (float32, identical matmuls).
"""

from __future__ import annotations

import csv
import json

import pytest

from braid.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def elastic_run(data_dir, tmp_path_factory):
    from braid.train import train
    from tests.train.conftest import tiny_config

    run_dir = tmp_path_factory.mktemp("elastic") / "run"
    cfg = tiny_config(
        data_dir, run_dir, "model.pattern=MF AF A-", "model.matformer.granularities=[0.25, 0.5, 1.0]",
        "train.steps=6", "elastic.policy=sandwich", "elastic.seed=1", "elastic.heads=[0.5, 1.0]",
    )
    summary = train(cfg)
    return run_dir, summary


def test_elastic_run_trains(elastic_run):
    run_dir, summary = elastic_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert summary["step"] == 6 and len(losses) == 6 and all(loss == loss for loss in losses)


def test_extract_then_eval_and_generate(capsys, elastic_run, data_dir, tmp_path):
    from braid.elastic.extract import layer_widths
    from braid.train import evaluate, load_trained, val_batches

    run_dir, _ = elastic_run
    out = tmp_path / "small"
    code, text, err = run(capsys, "extract", str(run_dir), "--widths-per-layer", "0.25,0.5", "--drop-layers", "2",
                          "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "extract.json").read_text())
    assert report["params_extracted"] < report["params_source"]
    assert report["bytes_extracted"] < report["bytes_source"]
    assert report["pattern"] == "M- A-" and "parameters" in text

    code, text, _ = run(capsys, "eval", str(out), "--data", str(data_dir), "--batches", "2")
    assert code == 0
    universal = load_trained(run_dir, device="cpu")
    widths = layer_widths(universal.cfg.model, matformer_widths=[0.25, 0.5])
    without_last = _drop_last_layer(universal.model)
    batches = val_batches(universal.cfg.data, 2, data_dir=str(data_dir))
    expected = evaluate(_AtWidths(without_last, widths), batches, "cpu")["val_loss"]
    assert f"loss {expected:.4f}" in text

    code, text, _ = run(capsys, "generate", str(out), "--prompt", "The cat", "--max-new-tokens", "4",
                        "--temperature", "0")
    assert code == 0 and text.startswith("The cat")


def test_extract_user_errors_exit_2(capsys, elastic_run, tmp_path):
    run_dir, _ = elastic_run
    code, _, err = run(capsys, "extract", str(run_dir), "--width", "0.3", "--out", str(tmp_path / "x"))
    assert code == 2 and "matformer.granularities" in err
    code, _, err = run(capsys, "extract", str(run_dir), "--widths-per-layer", "0.5", "--out", str(tmp_path / "y"))
    assert code == 2 and "one width per 'F' layer" in err
    code, _, err = run(capsys, "extract", str(run_dir), "--heads", "0.3", "--out", str(tmp_path / "z"))
    assert code == 2 and "not a whole number" in err


def test_extract_heads_then_eval(capsys, elastic_run, data_dir, tmp_path):
    from braid.elastic.extract import layer_heads, layer_widths
    from braid.model import Submodel
    from braid.train import evaluate, load_trained, val_batches

    run_dir, _ = elastic_run
    out = tmp_path / "half-heads"
    code, _, err = run(capsys, "extract", str(run_dir), "--width", "0.5", "--heads-per-layer", "0.5,0.5,1",
                       "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "extract.json").read_text())
    assert report["heads"] == [0.5, 0.5, 1.0]
    assert report["params_extracted"] < report["params_source"]
    extracted = load_trained(out, device="cpu")
    assert extracted.cfg.model.attention.kv_heads_per_layer == (0, 1, 2)
    assert extracted.cfg.model.mamba2.groups_per_layer == (1, 0, 0)
    code, text, _ = run(capsys, "eval", str(out), "--data", str(data_dir), "--batches", "2")
    assert code == 0
    universal = load_trained(run_dir, device="cpu")
    cfg = universal.cfg.model
    submodel = Submodel(layer_widths(cfg, width=0.5), layer_heads(cfg, per_layer=[0.5, 0.5, 1.0]))
    batches = val_batches(universal.cfg.data, 2, data_dir=str(data_dir))
    expected = evaluate(_AtWidths(universal.model, submodel), batches, "cpu")["val_loss"]
    assert f"loss {expected:.4f}" in text


def test_sweep_writes_csv_and_pareto_png(capsys, elastic_run, data_dir, tmp_path):
    run_dir, _ = elastic_run
    code, text, err = run(capsys, "elastic", "sweep", str(run_dir), "--data", str(data_dir), "--batches", "1",
                          "--out", str(tmp_path))
    assert code == 0, err
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows[:3]] == ["uniform 0.25", "uniform 0.5", "uniform 1"]
    assert len(rows) == 10  # 3 uniform + 2 mixes per adjacent pair of granularities + 3 uniform at heads 0.5
    assert [r["name"] for r in rows[7:]] == ["uniform 0.25 heads 0.5", "uniform 0.5 heads 0.5", "uniform 1 heads 0.5"]
    assert int(rows[7]["params"]) < int(rows[0]["params"]) and rows[7]["heads"] == "0.5"
    params = [int(r["params"]) for r in rows[:3]]
    assert params == sorted(params) and len(set(params)) == 3
    assert any(r["pareto"] == "True" for r in rows) and "pareto:" in text
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_pareto_front_keeps_only_undominated_rows():
    from braid.elastic.sweep import pareto_front

    rows = [
        {"name": "a", "params": 10, "val_loss": 3.0},
        {"name": "b", "params": 20, "val_loss": 3.5},  # bigger and worse than a
        {"name": "c", "params": 30, "val_loss": 2.0},
        {"name": "d", "params": 30, "val_loss": 2.5},  # same size as c, worse
    ]
    assert [r["name"] for r in pareto_front(rows)] == ["a", "c"]


class _AtWidths:
    """A model called at fixed MatFormer widths (what `evaluate` needs: call, train/eval)."""

    def __init__(self, model, widths):
        self.model, self.widths, self.training = model, widths, False

    def __call__(self, tokens_BT, doc_ids_BT):
        return self.model(tokens_BT, doc_ids_BT, widths=self.widths)

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def _drop_last_layer(model):
    del model.layers[str(len(model.layers) - 1)]
    return model
