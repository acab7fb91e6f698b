"""The `braid` CLI: one-line user errors with exit 2; eval, generate, plot and configs."""

from __future__ import annotations

import pytest

from braid.cli import main
from braid.configs.train import TRAIN_CONFIGS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (("train", "tiny-hybrid", "optim.lrr=1"), "unknown key 'lrr' in config.optim; valid keys: lr, betas"),
        (("train", "tiny-hybrid", "train.steps=many"), "config.train.steps: expected int"),
        (("train", "no-such-config"), "is neither a named config"),
        (("train", "tiny-hybrid", "data.path=/no/such/dir"), "/no/such/dir"),
    ],
)
def test_train_user_errors_exit_2_with_one_line(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "run"))
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a bad config must fail before the run dir is made"


def test_missing_checkpoint_and_data_exit_2(capsys, tmp_path, data_dir, trained_run):
    code, _, err = run(capsys, "eval", str(tmp_path), "--data", str(data_dir))
    assert code == 2 and "complete checkpoint" in err
    code, _, err = run(capsys, "generate", str(tmp_path), "--prompt", "The cat")
    assert code == 2 and "complete checkpoint" in err
    code, _, err = run(capsys, "eval", str(trained_run[0]), "--data", str(tmp_path / "nothing"))
    assert code == 2 and "braid data prepare" in err


def test_eval_generate_plot_on_a_trained_run(capsys, trained_run, data_dir):
    run_dir, summary = trained_run
    code, out, _ = run(capsys, "eval", str(run_dir), "--data", str(data_dir), "--batches", "2")
    assert code == 0 and "perplexity" in out
    assert f"loss {summary['val_loss']:.4f}" in out, "eval must match the trainer's validation on the same batches"
    code, out, _ = run(capsys, "generate", str(run_dir / "ckpt" / "step_000040"), "--prompt", "The cat",
                       "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0 and out.startswith("The cat")
    code, out, _ = run(capsys, "plot", str(run_dir))
    assert code == 0 and (run_dir / "loss.png").stat().st_size > 1000


def test_configs_lists_every_named_config(capsys):
    code, out, _ = run(capsys, "configs")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list(TRAIN_CONFIGS)


def test_kernels_lists_every_op_and_rejects_a_bad_spec(capsys):
    from braid.kernels import streams
    from braid.kernels.backend import FAST_BACKENDS, current_spec

    before = current_spec()
    code, out, _ = run(capsys, "kernels", "--spec", "auto,conv=fla")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.startswith(f"BRAID_KERNELS=auto,conv=fla  BRAID_SIDE_STREAM={int(streams.enabled())}")
    assert [row.split()[0] for row in rows] == list(FAST_BACKENDS)
    assert "triton (available)" in rows[list(FAST_BACKENDS).index("conv")]  # braid's own: always installed
    code, _, err = run(capsys, "kernels", "--spec", "conv=cuda_magic")
    assert code == 2 and "has no backend 'cuda_magic'" in err
    assert current_spec() == before  # --spec is evaluated, not kept


def test_overrides_may_follow_options():
    from braid.cli import parse_args

    args = parse_args(["plan", "mamba2-hybrid-8b", "--nodes", "8", "parallel.tp=2", "--gpus-per-node", "8", "parallel.pp=2"])
    assert args.overrides == ["parallel.tp=2", "parallel.pp=2"] and args.nodes == 8
    args = parse_args(["train", "tiny-hybrid", "train.steps=3", "--out", "runs/x", "optim.lr=1e-3"])
    assert args.overrides == ["train.steps=3", "optim.lr=1e-3"]
    with pytest.raises(SystemExit):
        parse_args(["train", "tiny-hybrid", "--bogus"])
