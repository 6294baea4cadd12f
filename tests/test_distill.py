"""Knowledge distillation (``safl train --distill``): the loss term, and a run held to its teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_words, write_shards

from model import SAFL, SAFLConfig
from model.charset import PAD_ID, Charset, token_ids
from model.checkpoint import save_checkpoint
from model.loss import distill_loss
from model.training.cli import main as cli_main
from model.training.train import TrainConfig, Trainer, with_charset


def test_the_term_is_zero_for_the_teachers_own_distributions_and_counts_a_new_tokens_mass() -> None:
    teacher_cs, student_cs = Charset("abc"), Charset("abc ")
    ids = token_ids("abc", student_cs)
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, teacher_cs.vocab_size)
    student = torch.full((2, 4, student_cs.vocab_size), -1e4)
    student[..., ids] = teacher
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert distill_loss(student, teacher, ids, mask).item() == pytest.approx(0.0, abs=1e-6)
    # Mass on the space (a token the teacher lacks) is a divergence: log(1 + e^0 / Σ e^teacher) per position.
    space = student_cs.encode(" ")[0]
    student[..., space] = 0.0
    expected = torch.log1p(1 / teacher.exp().sum(-1)).mean()
    assert distill_loss(student, teacher, ids, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    # Only masked positions count; none at all: a zero that still has a gradient.
    other = student.clone().requires_grad_()
    mask[0] = False
    assert distill_loss(other, teacher, ids, mask).item() == pytest.approx(torch.log1p(1 / teacher[1].exp().sum(-1)).mean().item(), rel=1e-5)
    none = distill_loss(other, teacher, ids, torch.zeros(2, 4, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and other.grad is not None


def test_token_ids_refuse_charsets_that_do_not_nest() -> None:
    assert token_ids("ba", Charset("abc")).tolist() == [0, 1, 2, 4, 3]
    with pytest.raises(KeyError, match="'z'"):
        token_ids("az", Charset("abc"))


@pytest.fixture(scope="module")
def spaced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Shards with words and two-word phrases, and a tiny teacher that has no space in its charset."""
    folder = tmp_path_factory.mktemp("d")
    words = random_words(40, seed=3)
    labels = words[:32] + [f"{a} {b}" for a, b in zip(words[32:36], words[36:40], strict=True)]
    torch.manual_seed(1)
    teacher = save_checkpoint(SAFL(SAFLConfig.from_preset("tiny")), folder / "teacher.safetensors", name="safl-tiny").weights_path
    (folder / "shards").mkdir()
    return write_shards(folder / "shards", labels), teacher


def _run(out: Path, shards: Path, teacher: Path, **extra) -> Trainer:
    cfg = TrainConfig(
        out=str(out), init=str(teacher), synth=[str(shards)], total_steps=12, batch_size=16,
        lr=3e-3, warmup_steps=2, threads=1, progress=False, val_every=0, log_every=4, checkpoint_minutes=1e9, amp="off", **extra,
    )
    trainer = Trainer(cfg)
    trainer.run()
    return trainer


def _kl_to(teacher_path: Path, model: SAFL, shards: Path) -> float:
    """KL(teacher ‖ model) on a fixed batch of the shards' word crops (no space)."""
    from model import load_checkpoint
    from model.preprocess import to_tensor
    from model.training.data import load_any

    teacher, _ = load_checkpoint(teacher_path)
    data = load_any(shards, model.config.preprocess)
    keep = [i for i, label in enumerate(data.labels) if " " not in label][:24]
    images = to_tensor(data.images[keep])
    inp, tgt = model.charset.encode_batch([data.labels[i] for i in keep])
    ids = token_ids(teacher.config.charset, model.charset)
    with torch.no_grad():
        return distill_loss(model.eval()(images, inp), teacher.eval()(images, inp), ids, tgt != PAD_ID).item()


def test_a_distilled_run_stays_nearer_its_teacher_and_still_learns_the_space(spaced: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    shards, teacher = spaced
    chars = SAFLConfig.from_preset("tiny").charset + " "
    free = _run(tmp_path / "free", shards, teacher, charset=chars)
    held = _run(tmp_path / "held", shards, teacher, charset=chars, distill=str(teacher), distill_weight=5.0)
    assert "+ 5 × distillation from" in capsys.readouterr().out
    assert _kl_to(teacher, held.model, shards) < 0.5 * _kl_to(teacher, free.model, shards)
    # The space's rows still learn: phrases are trained on by the recognition loss.
    start = with_charset(SAFL(SAFLConfig.from_preset("tiny")), chars)
    space = held.model.charset.encode(" ")[0]
    assert not torch.equal(held.model.state_dict()["decoder.head.bias"][space], start.state_dict()["decoder.head.bias"][space])


def test_a_teacher_that_cannot_serve_is_refused_in_one_line(spaced: tuple[Path, Path], tmp_path: Path) -> None:
    shards, teacher = spaced
    wider = save_checkpoint(with_charset(SAFL(SAFLConfig.from_preset("tiny")), SAFLConfig.from_preset("tiny").charset + "é"), tmp_path / "w.safetensors").weights_path
    other = save_checkpoint(SAFL(SAFLConfig.from_preset("tiny", d_model=32)), tmp_path / "o.safetensors").weights_path
    base = ["train", "--out", str(tmp_path / "run"), "--init", str(teacher), "--synth", str(shards), "--no-progress", "--total-steps", "1"]
    for extra, message in (
        (["--distill", str(wider)], "the run's charset lacks the teacher's 'é'"),
        (["--distill", str(other)], "another architecture"),
        (["--distill", str(tmp_path / "missing.safetensors")], "--distill: "),
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(base + extra)
        assert isinstance(exc.value.code, str) and message in exc.value.code, exc.value.code
    with pytest.raises(ValueError, match="drop --distill"):
        TrainConfig(distill=str(teacher), rectifier_only=True, point_loss=1.0, tps_lr_scale=1.0)
