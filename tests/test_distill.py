"""Knowledge distillation (``safl train --distill``): the loss term, and a run held to its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_words, write_shards

from model import SAFL, SAFLConfig, load_checkpoint
from model.charset import PAD_ID, Charset, token_ids
from model.checkpoint import save_checkpoint
from model.loss import distill_loss
from model.preprocess import to_tensor
from model.training.cli import main as cli_main
from model.training.data import load_any
from model.training.train import TrainConfig, Trainer, TrainingSetupError, with_charset

TINY = SAFLConfig.from_preset("tiny")
#: The space first, so every character's id in the run differs from its id in the teacher.
SPACED = " " + TINY.charset


def test_the_term_is_zero_for_the_teachers_own_distributions_and_counts_a_new_tokens_mass() -> None:
    teacher_cs, student_cs = Charset("abc"), Charset(" abc")
    ids = token_ids("abc", student_cs)
    assert ids.tolist() == [0, 1, 2, 4, 5, 6]
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, teacher_cs.vocab_size)
    student = torch.full((2, 4, student_cs.vocab_size), -1e4)
    student[..., ids] = teacher
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert distill_loss(student, teacher, ids, mask).item() == pytest.approx(0.0, abs=1e-6)
    # Mass on the space (a token the teacher lacks) is a divergence: log(1 + e^0 / Σ e^teacher) per position.
    student[..., student_cs.encode(" ")[0]] = 0.0
    expected = torch.log1p(1 / teacher.exp().sum(-1))
    assert distill_loss(student, teacher, ids, mask).item() == pytest.approx(expected.mean().item(), rel=1e-5)
    # Only masked positions count; none at all: a zero that still has a gradient.
    other = student.clone().requires_grad_()
    mask[0] = False
    assert distill_loss(other, teacher, ids, mask).item() == pytest.approx(expected[1].mean().item(), rel=1e-5)
    none = distill_loss(other, teacher, ids, torch.zeros(2, 4, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and other.grad is not None


def test_token_ids_name_a_character_the_other_charset_lacks() -> None:
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
    teacher = save_checkpoint(SAFL(TINY), folder / "teacher.safetensors", name="safl-tiny").weights_path
    (folder / "shards").mkdir()
    return write_shards(folder / "shards", labels), teacher


def _cfg(out: Path, shards: Path, teacher: Path, **extra) -> TrainConfig:
    values = {
        "out": str(out), "init": str(teacher), "charset": SPACED, "synth": [str(shards)], "total_steps": 12, "batch_size": 16, "lr": 3e-3,
        "warmup_steps": 2, "threads": 1, "progress": False, "val_every": 0, "log_every": 4, "checkpoint_minutes": 1e9, "amp": "off",
    }  # fmt: skip
    return TrainConfig(**(values | extra))


def _kl_to(teacher_path: Path, model: SAFL, shards: Path) -> float:
    """KL(teacher ‖ model) on the shards' word crops (no space), each model fed its own token ids."""
    teacher, info = load_checkpoint(teacher_path)
    data = load_any(shards, model.config.preprocess)
    keep = [i for i, label in enumerate(data.labels) if " " not in label][:24]
    labels = [data.labels[i] for i in keep]
    images = to_tensor(data.images[keep])
    inp, tgt = model.charset.encode_batch(labels)
    t_inp, _ = teacher.charset.encode_batch(labels)
    with torch.no_grad():
        return distill_loss(model.eval()(images, inp), teacher.eval()(images, t_inp), token_ids(info.config.charset, model.charset), tgt != PAD_ID).item()


def test_a_distilled_run_stays_nearer_its_teacher_and_still_learns_the_space(spaced: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    shards, teacher = spaced
    free = Trainer(_cfg(tmp_path / "free", shards, teacher))
    free.run()
    held = Trainer(_cfg(tmp_path / "held", shards, teacher, distill=str(teacher), distill_weight=5.0))
    held.run()
    assert "+ 5 × distillation from" in capsys.readouterr().out
    # The log says how far the run is from its teacher: 0 at the start, then above it.
    held_log = [json.loads(line) for line in (tmp_path / "held" / "log.jsonl").read_text().splitlines()]
    free_log = [json.loads(line) for line in (tmp_path / "free" / "log.jsonl").read_text().splitlines()]
    distill = [r["distill"] for r in held_log if "loss" in r]
    assert len(distill) == 3 and all(d > 0 for d in distill) and not any("distill" in r for r in free_log)
    assert _kl_to(teacher, held.model, shards) < 0.5 * _kl_to(teacher, free.model, shards)
    # The space's output row trains too: distillation does not hold it where with_charset put
    # it (zero weights, a bias 10 below the teacher's lowest).
    start = with_charset(load_checkpoint(teacher)[0], SPACED).state_dict()
    space = held.model.charset.encode(" ")[0]
    trained = held.model.state_dict()
    assert not torch.equal(trained["decoder.head.weight"][space], start["decoder.head.weight"][space])
    # The run and its checkpoint record the teacher; a resume with another one is refused.
    teacher_id = load_checkpoint(teacher)[1].model_id
    assert torch.load(tmp_path / "held" / "state.pt", weights_only=True)["teacher"] == teacher_id
    assert load_checkpoint(tmp_path / "held" / "last.safetensors")[1].training["distill"] == {"teacher": teacher_id, "weight": 5.0}
    other = save_checkpoint(SAFL(TINY), tmp_path / "other.safetensors").weights_path
    with pytest.raises(TrainingSetupError, match="the run was distilled from safl-tiny@"):
        Trainer(_cfg(tmp_path / "held", shards, teacher, distill=str(other), distill_weight=5.0), resume=True)


def test_the_term_skips_phrases_and_padding(spaced: tuple[Path, Path], tmp_path: Path) -> None:
    shards, teacher = spaced
    trainer = Trainer(_cfg(tmp_path / "run", shards, teacher, distill=str(teacher)))
    labels = ["cab", "a b", "fig"]
    inp, tgt = trainer.charset.encode_batch(labels)
    images = torch.zeros(3, 1, TINY.height, TINY.width)
    torch.manual_seed(0)
    logits = torch.randn(*tgt.shape, trainer.charset.vocab_size)
    base, mask = trainer._distill_term(images, inp, tgt, logits)
    assert mask.sum(1).tolist() == [4, 0, 4]  # the words' characters and EOS; not the phrase, not padding
    # It is the teacher's reading of the words, fed the words in its own token ids.
    teacher, info = load_checkpoint(teacher)
    t_inp, _ = teacher.charset.encode_batch(["cab", "fig"])
    with torch.no_grad():
        t_logits = teacher.eval()(images[[0, 2]], t_inp)
    words = [0, 2]
    manual = distill_loss(logits[words], t_logits, token_ids(info.config.charset, trainer.charset), tgt[words] != PAD_ID)
    assert base.item() == pytest.approx(manual.item(), rel=1e-5)
    changed = logits.clone()
    changed[1] += torch.randn_like(changed[1]) * 5  # the phrase, which the teacher cannot read
    changed[0, 4:] += 7.0  # "cab": after its EOS (position 3) only padding
    assert trainer._distill_term(images, inp, tgt, changed)[0].item() == pytest.approx(base.item(), rel=1e-6)
    changed[2, 0] += torch.randn(trainer.charset.vocab_size) * 5  # a word's character does count
    assert trainer._distill_term(images, inp, tgt, changed)[0].item() != pytest.approx(base.item(), rel=1e-3)


def test_a_teacher_that_cannot_serve_is_refused_in_one_line(spaced: tuple[Path, Path], tmp_path: Path) -> None:
    shards, teacher = spaced
    wider = save_checkpoint(with_charset(SAFL(TINY), TINY.charset + "é"), tmp_path / "w.safetensors").weights_path
    taller = save_checkpoint(SAFL(SAFLConfig.from_preset("tiny", height=48)), tmp_path / "t.safetensors").weights_path
    base = ["train", "--out", str(tmp_path / "run"), "--init", str(teacher), "--synth", str(shards), "--no-progress", "--total-steps", "1"]
    for extra, message in (
        (["--distill", str(wider)], "safl train: --distill: the run's charset lacks the teacher's 'é'; the teacher's charset must nest in the run's"),
        (["--distill", str(taller)], "reads 48x128x1 up to 25 characters, the run 32x128x1 up to 25 characters"),
        (["--distill", str(tmp_path / "missing.safetensors")], "safl train: --distill: "),
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(base + extra)
        assert isinstance(exc.value.code, str) and message in exc.value.code, exc.value.code
    # Another architecture over the same input is a teacher too (a bigger model teaching a smaller).
    wide = save_checkpoint(SAFL(SAFLConfig.from_preset("tiny", d_model=32)), tmp_path / "wide.safetensors").weights_path
    Trainer(_cfg(tmp_path / "ok", shards, teacher, distill=str(wide), total_steps=1)).run()
    with pytest.raises(ValueError, match="drop --distill"):
        TrainConfig(distill=str(teacher), rectifier_only=True, point_loss=1.0, tps_lr_scale=1.0)
    with pytest.raises(ValueError, match="--distill-weight must be positive and finite, got 0"):
        TrainConfig(distill=str(teacher), distill_weight=0.0)
    with pytest.raises(ValueError, match="--distill-weight weighs the --distill term: give --distill"):
        TrainConfig(distill_weight=2.0)


class _TwoRanks:
    """A stand-in for ``Ranks`` as one of two processes: this rank holds a third of the batch's
    tokens and half of its distilled tokens (what ``Ranks.token_share`` / ``share`` return)."""

    enabled = True

    def token_share(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(2 / 3)

    def share(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.tensor(1.0)


def test_under_torchrun_the_term_weighs_by_its_own_tokens_share(spaced: tuple[Path, Path], tmp_path: Path) -> None:
    """The distilled tokens are a subset (no phrases), so DDP's average of the ranks' gradients
    is the global mean only if the term is scaled by its own share, not by all tokens'."""
    shards, teacher = spaced
    alone = Trainer(_cfg(tmp_path / "a", shards, teacher, distill=str(teacher), distill_weight=2.0))
    ranked = Trainer(_cfg(tmp_path / "b", shards, teacher, distill=str(teacher), distill_weight=2.0))
    ranked.dist = _TwoRanks()
    loss, *_ = alone.train_step()
    loss_ranked, *_ = ranked.train_step()
    term = alone.last_distill
    assert term > 0 and ranked.last_distill == pytest.approx(term, rel=1e-6)  # the same batch and weights
    assert loss_ranked == pytest.approx(2 / 3 * (loss - 2.0 * term) + 1.0 * 2.0 * term, rel=1e-5)
