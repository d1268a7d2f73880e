"""The main demo (examples/demo.py) and its GPT (examples/gpt.py): data, model, quality."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    """Import examples/<name>.py as module `name` (demo.py imports `gpt` by that name)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(
        EXAMPLES / f"{name}.py"
    ):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpt = _load("gpt")


def tiny_gpt(vocab_size: int = 11, block_size: int = 16, seed: int = 0) -> Any:
    """A small `gpt.GPT` (Any: examples/gpt.py is loaded at run time, out of mypy's sight)."""
    torch.manual_seed(seed)
    return gpt.GPT(vocab_size, block_size, d_model=32, n_layers=2, n_heads=4, dropout=0.0)


# ------------------------------------------------------------------------------ data


def test_stdlib_text_is_deterministic_ascii_python() -> None:
    text = gpt.load_stdlib_text(50_000)
    assert len(text) == 50_000
    assert text == gpt.load_stdlib_text(50_000)
    assert text.isascii()
    assert "def " in text and "import " in text
    assert gpt.load_stdlib_text(50_000, seed=1) != text  # another file order


def test_load_stdlib_text_rejects_a_bad_size() -> None:
    with pytest.raises(ValueError, match=r"max_chars=0"):
        gpt.load_stdlib_text(0)


def test_tokenizer_round_trips() -> None:
    text = gpt.load_stdlib_text(20_000) + "\t\n\"'\\{}"
    tok = gpt.CharTokenizer(text)
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.vocab_size == len(set(text))
    assert int(ids.max()) == tok.vocab_size - 1
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.encode("\u00e9")


def test_dataset_windows_are_shifted_by_one() -> None:
    ids = torch.arange(20)
    train = gpt.CharDataset(ids, block_size=5)
    assert len(train) == 15  # windows start at 0..14 (the target of 14 ends at 19)
    x, y = train[14]
    assert x.tolist() == [14, 15, 16, 17, 18] and y.tolist() == [15, 16, 17, 18, 19]
    val = gpt.CharDataset(ids, block_size=5, stride=5)
    assert len(val) == 3
    assert [val[i][0][0].item() for i in range(3)] == [0, 5, 10]
    with pytest.raises(IndexError):
        val[3]
    with pytest.raises(ValueError, match="too few"):
        gpt.CharDataset(torch.arange(5), block_size=5)


def test_split_keeps_the_tail_for_validation() -> None:
    train, val = gpt.split(torch.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_unigram_baseline_matches_a_hand_computation() -> None:
    train, val = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1])
    # Laplace: counts (3+1, 1+1, 0+1) over 7.
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert gpt.unigram_baseline(train, val, vocab_size=3) == pytest.approx(expected)
    uniform = gpt.unigram_baseline(torch.arange(4), torch.arange(4), vocab_size=4)
    assert uniform == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------- model


def test_gpt_shapes_and_tied_head() -> None:
    model = tiny_gpt()
    logits = model(torch.randint(0, 11, (3, 16)))
    assert logits.shape == (3, 16, 11)
    assert model.head.weight is model.tok_emb.weight
    untied = gpt.GPT(11, 16, d_model=32, n_layers=1, n_heads=4, dropout=0.0, tie_weights=False)
    assert untied.head.weight is not untied.tok_emb.weight
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        gpt.GPT(11, 16, d_model=30, n_layers=1, n_heads=4, dropout=0.0)


@pytest.mark.parametrize("position", [0, 7, 15])
def test_gpt_is_causal(position: int) -> None:
    model = tiny_gpt().double().eval()
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, position] = (changed[:, position] + 1) % 11
    before, after = model(idx), model(changed)
    # Logits before the changed token are bit-for-bit unaffected; from it on they differ.
    torch.testing.assert_close(after[:, :position], before[:, :position], rtol=0, atol=0)
    assert not torch.allclose(after[:, position:], before[:, position:])


def test_loss_fn_counts_every_character() -> None:
    model = tiny_gpt()
    x = torch.randint(0, 11, (3, 16))
    loss = gpt.loss_fn(model, (x, x))
    assert int(loss.count) == 48
    mean = torch.nn.functional.cross_entropy(model(x).reshape(-1, 11), x.reshape(-1))
    torch.testing.assert_close(loss.sum / loss.count, mean)


def test_generate_is_deterministic_for_a_fixed_generator() -> None:
    model = tiny_gpt().train()
    prompt = torch.tensor([1, 2, 3])

    def sample(seed: int, **kwargs: object) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return gpt.generate(model, prompt, 40, generator=generator, **kwargs)

    first = sample(0)  # 43 tokens > block_size: the context is cropped to the last 16
    assert first.shape == (43,) and first[:3].tolist() == [1, 2, 3]
    assert torch.equal(first, sample(0))
    assert torch.equal(sample(0, temperature=0.7, top_k=3), sample(0, temperature=0.7, top_k=3))
    assert not torch.equal(first, sample(1))
    assert model.training  # generate restores the mode it found


def test_generate_with_top_k_1_is_greedy() -> None:
    model = tiny_gpt().eval()
    out = gpt.generate(model, [4], 5, top_k=1, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[4]])
    for _ in range(5):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids[0].tolist()


# ----------------------------------------------------------------------- the demo itself


@pytest.mark.slow
def test_quick_demo_beats_the_unigram_baseline_by_a_wide_margin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fit() on a small real task reaches a stated quality: 0.5 nats/char under the baseline.

    The quick preset trains a 0.1 M parameter GPT for 200 steps (a few seconds on one core);
    no time budget, so the result does not depend on the machine's speed.
    """
    demo = _load("demo")
    log_dir = tmp_path / "runs"
    out = demo.main(
        ["--quick", "--time-budget-s", "0", "--device", "cpu", "--log-dir", str(log_dir)]
    )
    assert out["steps"] == demo.QUICK.max_steps
    assert out["result"].stopped_by == "max_steps"
    assert 2.8 < out["baseline"] < 3.6  # the unigram entropy of Python source, nats/char
    assert out["eval_loss"] < out["baseline"] - 0.5, (out["eval_loss"], out["baseline"])
    evals = [h["eval/loss"] for h in out["result"].history if "eval/loss" in h]
    assert len(evals) == demo.QUICK.max_steps // demo.QUICK.eval_every
    assert evals[-1] < evals[0]
    assert out["sample"].startswith("def ")
    assert len(out["sample"]) == len("def ") + demo.QUICK.sample_chars
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "metrics.csv").exists()
    printed = capsys.readouterr().out
    assert "unigram baseline" in printed and f"tensorboard --logdir {log_dir}" in printed
