"""`braid distill` end to end on a tiny saved Llama and a tiny prepared dataset: three
stages run, metrics rows carry their stage, and a rerun resumes instead of restarting."""

from __future__ import annotations

import json

import pytest

from braid.cli import main
from braid.distill.run import parse_stages, parse_student, parse_tokens, stage_lr
from tests.distill.conftest import save_tiny_llama

TOKENS_PER_STEP = 16 * 2  # --seq-len 16, --batch-size 2


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _distill(teacher, data_dir, out, tokens: str) -> int:
    return main([
        "distill", "--teacher", str(teacher), "--student", "keep=1", "--stages", "1,2,3", "--tokens", tokens,
        "--data", str(data_dir), "--out", str(out), "--seq-len", "16", "--batch-size", "2", "--checkpoint-every", "1",
    ])


def _budget(*steps: int) -> str:
    return ",".join(str(s * TOKENS_PER_STEP) for s in steps)


def test_three_stages_then_resume_exactly(tmp_path, data_dir):
    """A run stopped after 2 stage-3 steps and resumed with a 3-step budget computes the same
    third step, bit for bit, as a run that was never stopped."""
    teacher = save_tiny_llama(tmp_path / "teacher", vocab_size=320)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _distill(teacher, data_dir, whole, _budget(2, 2, 3)) == 0
    rows = _rows(whole)
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    assert all(r["loss"] >= 0 for r in rows)
    assert _distill(teacher, data_dir, resumed, _budget(2, 2, 2)) == 0
    assert _distill(teacher, data_dir, resumed, _budget(2, 2, 3)) == 0  # stages 1, 2 done: skipped
    resumed_rows = _rows(resumed)
    assert [(r["stage"], r["step"]) for r in resumed_rows[6:]] == [(3, 3)]
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in rows]


def test_bad_arguments_exit_2(tmp_path, data_dir, capsys):
    teacher = save_tiny_llama(tmp_path / "teacher", vocab_size=320)
    assert _distill(teacher, data_dir, tmp_path / "run", "1K,2K") == 2
    assert "one per stage" in capsys.readouterr().err


def test_parsers():
    assert parse_tokens("80M") == 80_000_000 and parse_tokens("2.76B") == 2_760_000_000 and parse_tokens("512") == 512
    assert parse_student("mamba2") == () and parse_student("keep=3,9") == (3, 9)
    assert parse_stages("1,3") == (1, 3)
    with pytest.raises(ValueError, match="commas"):
        parse_stages("one")
    with pytest.raises(ValueError, match="K/M/B/T"):
        parse_tokens("lots")
    with pytest.raises(ValueError, match="keep="):
        parse_student("hybrid")


def test_stage_lr_schedules():
    assert [stage_lr(1e-3, step, 10) for step in range(10)] == [1e-3] * 10
    cosine = [stage_lr(1.0, step, 100, "cosine", 0.05) for step in range(100)]
    assert cosine[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # warmup over 5 steps
    assert cosine[99] == pytest.approx(0.1) and all(a >= b for a, b in zip(cosine[4:], cosine[5:]))
    with pytest.raises(ValueError, match="constant"):
        stage_lr(1.0, 0, 10, "linear")


def test_cosine_schedule_and_loss_options_reach_the_stages(tmp_path, data_dir):
    teacher = save_tiny_llama(tmp_path / "teacher", vocab_size=320)
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), "--student", "mamba2", "--stages", "3", "--tokens", _budget(4),
            "--data", str(data_dir), "--out", str(out), "--seq-len", "16", "--batch-size", "2",
            "--lr", "1e-3,1e-3,5e-3", "--schedule", "cosine", "--warmup", "0.25", "--ce-weight", "1.0"]
    assert main(args) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    with pytest.raises(SystemExit, match="three peak learning rates"):
        main([*args[:-8], "--lr", "1e-3,1e-3"])
