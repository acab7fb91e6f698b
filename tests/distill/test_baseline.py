"""The from-scratch control: the student's exact architecture, freshly initialised, trained
by the ordinary trainer on the same data and token budget."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from braid.distill.baseline import run_student_config, scratch_config
from braid.distill.student import build_student
from braid.distill.teacher import load_llama
from tests.distill.conftest import save_tiny_llama


def test_scratch_run_has_the_students_shape(tmp_path, data_dir):
    from braid.train.trainer import Trainer

    teacher, _ = load_llama(save_tiny_llama(tmp_path / "teacher", vocab_size=320))
    student, student_cfg = build_student(teacher)
    (tmp_path / "distill").mkdir()  # what `braid distill` writes first
    (tmp_path / "distill" / "student_config.json").write_text(json.dumps(dataclasses.asdict(student_cfg)))
    assert run_student_config(tmp_path / "distill") == student_cfg

    cfg = scratch_config(student_cfg, str(data_dir), str(tmp_path / "scratch"), tokens=3 * 16 * 2 - 5,
                         seq_len=16, batch_size=2)
    assert cfg.train.steps == 3 and cfg.data.seq_len == 16 and cfg.train.dtype == "float32"
    trainer = Trainer(cfg)
    shapes = {name: p.shape for name, p in trainer.model.named_parameters()}
    assert shapes == {name: p.shape for name, p in student.named_parameters()}
    assert not torch.equal(trainer.model.tok_embeddings.weight, student.tok_embeddings.weight)  # not the teacher's
    summary = trainer.fit()
    assert summary["step"] == 3 and (tmp_path / "scratch" / "ckpt").is_dir()


def test_bad_inputs(tmp_path, data_dir):
    with pytest.raises(ValueError, match="student_config.json"):
        run_student_config(tmp_path)
    teacher, _ = load_llama(save_tiny_llama(tmp_path / "teacher", vocab_size=320))
    _, student_cfg = build_student(teacher)
    with pytest.raises(ValueError, match="tokens must be positive"):
        scratch_config(student_cfg, str(data_dir), str(tmp_path / "s"), tokens=0, seq_len=16, batch_size=2)
