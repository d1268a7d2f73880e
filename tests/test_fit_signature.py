"""fit()'s written-out keyword arguments: in step with FitConfig, checked, merged with config=."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlp as _mlp

import loopkit as lk
from loopkit import config as config_module
from loopkit.run_config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
HANG_S = 600  # only catches a hang


def mlp() -> torch.nn.Module:
    return _mlp(dtype=torch.float32)


def dataset(n: int = 32) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x.sum(1) > 0).long())


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


BASE: dict[str, Any] = dict(
    loss_fn=loss_fn, optimizer={"name": "SGD", "lr": 0.1}, batch_size=8, progress=False
)


def fit_keywords() -> list[inspect.Parameter]:
    """fit's keyword-only parameters, `config` aside (the signature editors see)."""
    parameters = inspect.signature(lk.fit).parameters.values()
    return [p for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "config"]


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# --- one source of truth --------------------------------------------------------------------


def test_fit_keywords_are_fitconfigs_fields_names_order_annotations_defaults():
    fields = dataclasses.fields(lk.FitConfig)  # whatever fields FitConfig has when this runs
    keywords = fit_keywords()
    assert [p.name for p in keywords] == [f.name for f in fields]
    for p, f in zip(keywords, fields):
        assert p.annotation == f.type, p.name  # as written (both modules postpone them)
        assert p.default == field_default(f), p.name
    fit_hints = typing.get_type_hints(inspect.unwrap(lk.fit))
    config_hints = typing.get_type_hints(lk.FitConfig)
    assert {f.name: fit_hints[f.name] for f in fields} == config_hints
    positional = [p.name for p in inspect.signature(lk.fit).parameters.values()][:3]
    assert positional == ["model", "train_data", "config"]


def test_fit_docstring_documents_every_keyword():
    doc = inspect.getdoc(lk.fit) or ""
    args = doc.split("\nArgs:\n", 1)[1].split("\nReturns:\n", 1)[0]
    documented = [line.strip().split(":", 1)[0] for line in args.splitlines() if line[4:5] != " "]
    assert documented == ["model", "train_data", "config", *(p.name for p in fit_keywords())]


def test_an_unknown_keyword_does_not_bind_to_the_signature():
    with pytest.raises(TypeError, match="max_stepz"):
        inspect.signature(lk.fit).bind(mlp(), dataset(), max_stepz=3)


MYPY_CHECKED = """\
from typing import Any
from loopkit.fit import fit
model: Any = None
fit(model, [], max_steps=3, eval_every=2, precision="bf16", config="fit.toml")
fit(model, [], max_stepz=3)
fit(model, [], max_steps="3")
fit(model, [], precision="fp8")
"""
MYPY_INI = """\
[mypy]
mypy_path = {root}
ignore_missing_imports = True
follow_imports = skip
[mypy-loopkit.fit,loopkit.config]
follow_imports = silent
"""


def test_mypy_flags_an_unknown_keyword_and_a_wrong_type(tmp_path):
    # Only loopkit.fit and loopkit.config are analysed (other imports are typed Any), so
    # this takes a second or two: it checks that the decorator keeps fit's written-out
    # signature for type checkers (ParamSpec), as mypy over loopkit and tests does too.
    (tmp_path / "use.py").write_text(MYPY_CHECKED)
    (tmp_path / "mypy.ini").write_text(MYPY_INI.format(root=ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", "cache"]
        + ["--no-error-summary", "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    errors = {int(line.split(":")[1]) for line in out.stdout.splitlines() if ": error:" in line}
    assert errors == {5, 6, 7}, out.stdout + out.stderr
    assert 'Unexpected keyword argument "max_stepz"' in out.stdout


# --- unknown names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("eval_evry", 10, "did you mean 'eval_every'?"),
        ("max_step", 10, "did you mean 'max_steps'?"),
        ("lr", 1e-3, "optimizer={'name': 'AdamW', 'lr': 0.001}"),
        ("learning_rate", 1e-3, "optimizer={'name': 'AdamW', 'lr': 0.001}"),
        ("weight_decay", 0.1, "optimizer={'name': 'AdamW', 'weight_decay': 0.1}"),
        ("momentum", 0.9, "optimizer={'name': 'SGD', 'momentum': 0.9}"),
        ("betas", (0.9, 0.95), "optimizer={'name': 'AdamW', 'betas': (0.9, 0.95)}"),
        ("warmup_steps", 100, "schedule={'name': 'cosine', 'warmup_steps': 100"),
        ("lr_scheduler", "cosine", "use schedule="),
        ("gradient_accumulation_steps", 4, "use accumulate=4"),
        ("max_grad_norm", 1.0, "use clip=1.0"),
        ("gradient_clip_val", 1.0, "use clip=1.0"),
        ("num_epochs", 3, "use epochs=3"),
        ("max_epochs", 3, "use epochs=3"),
        ("num_train_epochs", 3, "use epochs=3"),
        ("device", "cuda", "strategy=lk.SingleDevice('cuda')"),
        ("accelerator", "gpu", "strategy=lk.SingleDevice("),
        ("fp16", True, "precision='fp16'"),
        ("bf16", True, "precision='bf16'"),
        ("mixed_precision", "bf16", "precision="),
        ("output_dir", "out", "checkpoint_dir='out' for checkpoints and/or log_dir='out'"),
        ("eval_dataset", None, "eval_data="),
        ("logging_steps", 10, "log_every=10"),
    ],
)
def test_an_unknown_keyword_says_where_it_belongs(name, value, hint):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    # No optimizer= given: an optimizer keyword's hint then shows a fresh optimizer dict
    # (next to a given dict it shows that dict: tests/test_ecosystem_edges.py).
    without_optimizer = {k: v for k, v in BASE.items() if k != "optimizer"}
    with pytest.raises(ValueError) as error:
        lk.fit(model, dataset(), **without_optimizer, **{name: value})
    assert str(error.value).startswith(f"fit: unknown field {name}={value!r}: ")
    assert hint in str(error.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="unknown field") as error:
        lk.FitConfig.from_dict({name: value})
    assert hint in str(error.value)


def test_several_unknown_names_each_get_their_hint_and_a_stranger_the_list():
    with pytest.raises(ValueError) as error:
        lk.fit(mlp(), dataset(), **BASE, lr=0.1, eval_evry=3, zzz=1)
    message = str(error.value)
    assert message.startswith("fit: unknown fields lr=0.1: it belongs to the optimizer")
    assert "eval_evry=3: did you mean 'eval_every'?" in message
    assert "zzz=1: no such field" in message and "The fields: loss_fn, optimizer" in message


def test_unknown_names_in_a_config_file_and_in_loopkit_fit_set(tmp_path):
    path = tmp_path / "fit.toml"
    path.write_text("max_steps = 3\nlearning_rate = 0.01\n")
    for call in (lambda: lk.FitConfig.from_file(path), lambda: lk.fit(mlp(), [], config=path)):
        with pytest.raises(ValueError) as error:
            call()
        assert str(path) in str(error.value)
        assert "learning_rate=0.01: it belongs to the optimizer" in str(error.value)
    run = tmp_path / "run.toml"
    run.write_text('model = {call = "m:f"}\ndata = {call = "m:g"}\nmax_steps = 3\n')
    with pytest.raises(ValueError, match=r"max_stepz=3: did you mean 'max_steps'\?"):
        RunConfig.load(run, ["max_stepz=3"])
    with pytest.raises(ValueError, match=r"dta=3: did you mean 'data'\?"):
        RunConfig.load(run, ["dta=3"])
    with pytest.raises(ValueError, match=r"lr=0.1: it belongs to the optimizer"):
        RunConfig.load(run, ["lr=0.1"])


# --- config= merged with the keywords written in code ---------------------------------------


class Settings:
    """Records the settings fit ran with (its hparams)."""

    def __init__(self) -> None:
        self.hparams: dict[str, object] = {}

    def on_fit_start(self, state: Any, hparams: dict[str, object]) -> None:
        self.hparams = hparams


def test_a_config_file_is_checked_after_merging_with_the_code(tmp_path):
    path = tmp_path / "fit.toml"
    path.write_text(
        "max_steps = 4\nbatch_size = 8\neval_every = 2\nprogress = false\n"
        'optimizer = {name = "SGD", lr = 0.1}\n'
    )
    result = lk.fit(mlp(), dataset(), config=path, eval_data=dataset(), loss_fn=loss_fn)
    assert [h["step"] for h in result.history if "eval/loss" in h] == [2, 4]
    config = lk.FitConfig.from_file(path, eval_data=dataset(), loss_fn=loss_fn)
    assert config.eval_every == 2 and config.max_steps == 4
    # Without eval_data anywhere it is still refused, naming the file and the way out.
    with pytest.raises(ValueError, match=r"eval_every=2\): needs eval_data") as error:
        lk.fit(mlp(), dataset(), config=str(path), loss_fn=loss_fn)
    assert f"fit(config={str(path)!r})" in str(error.value)
    with pytest.raises(ValueError, match="values given in code count too"):
        lk.FitConfig.from_file(path)


def test_a_bad_value_in_a_config_file_is_named_with_the_file(tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text("max_steps: 0\n")
    expected = f"fit(config={str(path)!r}): FitConfig(max_steps=0): must be None or an int >= 1."
    with pytest.raises(ValueError) as error:
        lk.fit(mlp(), dataset(), config=path, **BASE)
    assert str(error.value) == expected
    with pytest.raises(ValueError, match=r"FitConfig.from_file\(path=.*FitConfig\(max_steps=0\)"):
        lk.FitConfig.from_file(path, eval_data=dataset())
    run = tmp_path / "run.toml"
    run.write_text('model = {call = "m:f"}\ndata = {call = "m:g"}\nlog_every = 0\n')
    with pytest.raises(ValueError, match=r"CONFIG=.*run.toml': FitConfig\(log_every=0\)"):
        RunConfig.load(run)


@pytest.mark.parametrize("kind", ["file", "mapping", "FitConfig"])
def test_a_keyword_equal_to_its_default_still_overrides_the_config(tmp_path, kind):
    values = {"log_every": 3, "shuffle": False, "precision": "bf16", "max_steps": 2}
    path = tmp_path / "fit.json"
    path.write_text('{"log_every": 3, "shuffle": false, "precision": "bf16", "max_steps": 2}')
    config: Any = {"file": path, "mapping": values, "FitConfig": lk.FitConfig(**values)}[kind]
    settings = Settings()
    kwargs = {**BASE, "callbacks": [settings]}
    lk.fit(mlp(), dataset(), config=config, log_every=50, shuffle=True, precision="fp32", **kwargs)
    assert (settings.hparams["log_every"], settings.hparams["shuffle"]) == (50, True)
    assert (settings.hparams["precision"], settings.hparams["max_steps"]) == ("fp32", 2)
    lk.fit(mlp(), dataset(), config=config, **kwargs)  # not written: the config's value
    assert (settings.hparams["log_every"], settings.hparams["shuffle"]) == (3, False)


def test_model_and_data_as_keywords_and_a_bad_config_kind():
    result = lk.fit(model=mlp(), train_data=dataset(), max_steps=1, **BASE)
    assert result.state.step == 1
    with pytest.raises(TypeError, match=r"fit\(config=3\): must be a FitConfig, a mapping"):
        lk.fit(mlp(), dataset(), config=3, **BASE)  # type: ignore[arg-type]


def test_takes_config_passes_the_merged_values_to_the_function() -> None:
    @config_module.takes_config
    def run(
        x: int, *, config: config_module.ConfigSource = None, max_steps: int | None = None
    ) -> tuple[int, int | None, lk.FitConfig]:
        assert isinstance(config, lk.FitConfig)
        return x, max_steps, config

    x, max_steps, config = run(1, config={"max_steps": 5, "seed": 3})
    assert (x, max_steps, config.max_steps, config.seed) == (1, 5, 5, 3)
    assert run(1, config={"max_steps": 5}, max_steps=None)[1] is None  # written: it wins
    with pytest.raises(ValueError, match=r"run: unknown field max_stepz=2"):
        run(1, max_stepz=2)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "value, hint",
    [
        ("bf16-mixed", "precision='bf16'"),
        ("16-mixed", "precision='fp16'"),
        (16, "precision='fp16'"),
        ("32-true", "precision='fp32'"),
        ("bf16-true", "cast the model"),
    ],
)
def test_lightnings_precision_names_say_what_to_write(value, hint):
    with pytest.raises(ValueError, match=r"must be 'fp32', 'bf16' or 'fp16'\. Lightning's") as info:
        lk.FitConfig(precision=value)
    assert hint in str(info.value)
