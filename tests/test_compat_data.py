"""The Trainer takes data as HF's does, and keeps HF's checkpoint names and members.

- any object with __len__ and __getitem__ (not only a torch Dataset); HF `datasets`
  datasets, with the columns forward does not take dropped before collation;
- under Pipeline each data-parallel replica reads its share (every stage the same);
- checkpoint-N in output_dir, loopkit's format inside; a fresh run moves an earlier run's
  checkpoints aside (deletes them with overwrite_output_dir); resume picks checkpoint-N;
- model_wrapped, get_num_trainable_parameters, the accelerator view, refused members,
  FLOPs and memory metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from loopkit.checkpoint import validate_checkpoint
from loopkit.compat import Trainer, TrainerCallback, TrainingArguments
from loopkit.compat.checkpoints import list_hf_checkpoints
from loopkit.compat.inputs import default_data_collator, eval_loader, train_loader


class Rows:
    """Dict samples with columns forward does not take ("id", "note"): not a Dataset."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "label": int(self.y[i]), "id": i, "note": "unused"}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)
        torch.random.set_rng_state(gen)

    def forward(self, x, labels=None):  # noqa: ANN001
        logits = self.lin(x)
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels)}


def _args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=0.1,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**(base | overrides))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --- datasets ---------------------------------------------------------------------------------


def test_any_sized_indexable_object_is_a_dataset_and_unused_keys_are_dropped(tmp_path):
    trainer = Trainer(model=Net(), args=_args(tmp_path), train_dataset=Rows(16))
    assert trainer.train().global_step == 4  # "id" never reached forward (it has no **kw)
    as_list = [Rows(16)[i] for i in range(16)]  # a plain list of samples trains the same
    again = Trainer(model=Net(), args=_args(tmp_path / "l"), train_dataset=as_list)
    again.train()
    assert all(
        torch.equal(a, b)
        for a, b in zip(_params(trainer.model).values(), _params(again.model).values())
    )


def test_an_hf_dataset_loses_the_columns_forward_does_not_take(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = Rows(16)
    table = datasets.Dataset.from_dict(
        {
            "x": rows.x.tolist(),
            "label": rows.y.tolist(),
            "note": ["unused"] * 16,
            "id": list(range(16)),
        }
    )
    trainer = Trainer(model=Net(), args=_args(tmp_path), train_dataset=table)
    trainer.train()
    reference = Trainer(model=Net(), args=_args(tmp_path / "r"), train_dataset=Rows(16))
    reference.train()
    for name, value in _params(reference.model).items():
        torch.testing.assert_close(_params(trainer.model)[name], value)
    assert table.column_names == ["x", "label", "note", "id"]  # the user's dataset is kept
    with pytest.raises(ValueError, match=r"no column of the dataset .*remove_unused_columns=False"):
        only_unused = datasets.Dataset.from_dict({"note": ["a"] * 4})
        Trainer(model=Net(), args=_args(tmp_path), train_dataset=only_unused).train()


def test_an_hf_iterable_dataset_trains_for_max_steps(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = Rows(32)
    stream = datasets.Dataset.from_dict(
        {"x": rows.x.tolist(), "label": rows.y.tolist()}
    ).to_iterable_dataset()
    trainer = Trainer(model=Net(), args=_args(tmp_path, max_steps=3), train_dataset=stream)
    assert trainer.train().global_step == 3


def test_default_collator_types_labels_as_hf():
    batch = default_data_collator([{"x": [1.0, 2.0], "label_ids": [1, 0]}] * 2)
    assert batch["labels"].dtype == torch.long and batch["x"].dtype == torch.float32
    regression = default_data_collator([{"x": [1.0], "label": 0.5}] * 2)
    assert regression["labels"].dtype == torch.float32


def test_under_pipeline_every_stage_of_a_replica_reads_the_same_batches(tmp_path):
    # Two stages, one replica: rank 1 is the second stage of data-parallel rank 0 of 1.
    stage = SimpleNamespace(rank=1, world_size=2, dp_rank=0, dp_world_size=1, device="cpu")
    args = _args(tmp_path, train_sampling_strategy="sequential", per_device_eval_batch_size=4)
    data = Rows(8)
    for loader in (
        train_loader(data, args, stage, default_data_collator),  # type: ignore[arg-type]
        eval_loader(data, args, stage, default_data_collator),  # type: ignore[arg-type]
    ):
        read = torch.cat([batch["x"] for batch in loader])
        torch.testing.assert_close(read, data.x)  # all 8 items, not rank 1's half


class Numbers(torch.utils.data.IterableDataset):
    """0, 1, ..., n-1 as {"x": tensor}: an iterable dataset every rank can read whole."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # noqa: ANN204
        return ({"x": torch.tensor([float(i)])} for i in range(self.n))


def _read(loader: Any) -> list[int]:
    return [int(v) for batch in loader for v in batch["x"].flatten()]


@pytest.mark.parametrize("drop_last", [False, True])
def test_an_iterable_dataset_is_dealt_out_by_rank_as_hfs_iterable_dataset_shard(
    tmp_path, drop_last
):
    # 11 items, 2 per rank, 2 ranks: groups of 4; the last, short group [8, 9, 10] is
    # filled up with the first group's items (or dropped), so both ranks step alike.
    args = _args(tmp_path, per_device_train_batch_size=2, dataloader_drop_last=drop_last)
    shares = []
    for rank in range(2):
        stage = SimpleNamespace(
            rank=rank, world_size=2, dp_rank=rank, dp_world_size=2, device="cpu"
        )
        shares.append(_read(train_loader(Numbers(11), args, stage, default_data_collator)))  # type: ignore[arg-type]
    if drop_last:
        assert shares == [[0, 1, 4, 5], [2, 3, 6, 7]]
    else:
        assert shares == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 0]]
    transformers = pytest.importorskip("transformers")
    from transformers.trainer_pt_utils import IterableDatasetShard

    for rank, share in enumerate(shares):
        hf = IterableDatasetShard(
            range(11), batch_size=2, drop_last=drop_last, num_processes=2, process_index=rank
        )
        assert share == list(hf), transformers.__version__


def test_the_eval_split_reads_each_item_once_without_padding(tmp_path):
    # HF pads the ranks' shares and gather_for_metrics drops the repeats; the façade does
    # not pad, so the loss over the ranks' batches counts each item once.
    args = _args(tmp_path, per_device_eval_batch_size=2)
    for data, expected in ((Rows(5), [[0, 2, 4], [1, 3]]), (Numbers(5), [[0, 2, 4], [1, 3]])):
        shares = []
        for rank in range(2):
            stage = SimpleNamespace(
                rank=rank, world_size=2, dp_rank=rank, dp_world_size=2, device="cpu"
            )
            loader = eval_loader(data, args, stage, default_data_collator)  # type: ignore[arg-type]
            shares.append(_read(loader) if isinstance(data, Numbers) else _rows(loader))
        assert shares == expected


def test_an_hf_iterable_dataset_in_shards_is_split_item_by_item_for_evaluation(tmp_path):
    datasets = pytest.importorskip("datasets")
    # Two shards on two ranks: split_dataset_by_node would give rank 0 the first shard
    # (0, 1, 2); the gather of the predictions expects items 0, 2, 4 on rank 0.
    data = datasets.Dataset.from_dict({"x": [[float(i)] for i in range(6)]})
    stream = data.to_iterable_dataset(num_shards=2)
    args = _args(tmp_path, per_device_eval_batch_size=2)
    shares = []
    for rank in range(2):
        stage = SimpleNamespace(
            rank=rank, world_size=2, dp_rank=rank, dp_world_size=2, device="cpu"
        )
        shares.append(_read(eval_loader(stream, args, stage, default_data_collator)))  # type: ignore[arg-type]
    assert shares == [[0, 2, 4], [1, 3, 5]]


def _rows(loader: Any) -> list[int]:
    return [int(i) for batch in loader for i in batch["id"]]


# --- checkpoints --------------------------------------------------------------------------------


def _saving(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    return _args(tmp_path, save_strategy="steps", save_steps=2, **overrides)


def test_checkpoints_have_hfs_names_and_loopkits_format(tmp_path):
    Trainer(model=Net(), args=_saving(tmp_path), train_dataset=Rows(16)).train()
    out = tmp_path / "out"
    assert [p.name for p in list_hf_checkpoints(out)] == ["checkpoint-4", "checkpoint-2"]
    for path in list_hf_checkpoints(out):
        validate_checkpoint(path)  # manifest, sizes, checksums
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["global_step"] == int(path.name.split("-")[1])
        assert "TrainerControl" in state["stateful_callbacks"]
        assert (path / "training_args.json").is_file()
    assert not list(out.glob("step-*"))
    assert (out / "latest").read_text() == "checkpoint-4"


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside(tmp_path):
    Trainer(model=Net(), args=_saving(tmp_path), train_dataset=Rows(16)).train()
    Trainer(model=Net(), args=_saving(tmp_path, max_steps=2), train_dataset=Rows(16)).train()
    out = tmp_path / "out"
    assert [p.name for p in list_hf_checkpoints(out)] == ["checkpoint-2"]
    assert sorted(p.name for p in (out / "previous-run").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    args = _saving(tmp_path, max_steps=2, overwrite_output_dir=True)
    Trainer(model=Net(), args=args, train_dataset=Rows(16)).train()
    assert [p.name for p in list_hf_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "previous-run-2").exists()  # deleted, not moved


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == 5:
            raise RuntimeError("killed at step 5")


def test_resume_true_continues_from_the_newest_checkpoint(tmp_path):
    args = _saving(tmp_path, max_steps=6)
    straight = Trainer(
        model=Net(), args=_saving(tmp_path / "a", max_steps=6), train_dataset=Rows(16)
    )
    straight.train()
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(model=Net(), args=args, train_dataset=Rows(16), callbacks=[Crash()]).train()
    again = Trainer(model=Net(), args=args, train_dataset=Rows(16), callbacks=[TrainerCallback()])
    assert again.train(resume_from_checkpoint=True).global_step == 6  # from checkpoint-4
    for name, value in _params(straight.model).items():
        assert torch.equal(_params(again.model)[name], value), name


def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path):
    Trainer(model=Net(), args=_saving(tmp_path), train_dataset=Rows(16)).train()
    out = tmp_path / "out"
    again = Trainer(model=Net(), args=_saving(tmp_path, max_steps=3), train_dataset=Rows(16))
    again.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert [p.name for p in (out / "abandoned-after-checkpoint-2").iterdir()] == ["checkpoint-4"]
    assert [p.name for p in list_hf_checkpoints(out)] == ["checkpoint-3", "checkpoint-2"]


def test_resume_true_without_a_checkpoint_says_so(tmp_path):
    trainer = Trainer(model=Net(), args=_args(tmp_path), train_dataset=Rows(8))
    with pytest.raises(ValueError, match="no valid checkpoint in output_dir"):
        trainer.train(resume_from_checkpoint=True)


# --- members ------------------------------------------------------------------------------------


def test_hf_members_users_call(tmp_path):
    trainer = Trainer(model=Net(), args=_args(tmp_path), train_dataset=Rows(8))
    assert trainer.get_num_trainable_parameters() == 3 * 2 + 2
    trainer.model.lin.bias.requires_grad_(False)
    assert trainer.get_num_trainable_parameters() == 6
    assert trainer.model_wrapped is trainer.model
    trainer.train()
    assert trainer.model_wrapped is trainer.model  # one process: fit does not wrap it
    # HF's optimizer holds the next step's lr: 0 once a linear schedule has run out
    assert trainer.get_learning_rates() == [0.0]
    assert trainer.get_decay_parameter_names() == ["lin.weight"]
    assert trainer.accelerator.unwrap_model(torch.nn.DataParallel(trainer.model)) is trainer.model
    assert trainer.accelerator.is_main_process and trainer.accelerator.num_processes == 1
    with pytest.raises(AttributeError, match="not supported by loopkit.compat: Trainer.accel"):
        trainer.accelerator.prepare(trainer.model)
    with pytest.raises(NotImplementedError, match=r"Trainer.hyperparameter_search \(no Optuna"):
        trainer.hyperparameter_search()
    with pytest.raises(NotImplementedError, match="override compute_loss"):
        trainer.training_step(trainer.model, {})
    assert trainer.floating_point_ops({"x": torch.zeros(2, 3)}) == 0  # no num_parameters


def test_memory_metrics_have_hfs_names(tmp_path):
    args = _args(tmp_path, skip_memory_metrics=False)
    trainer = Trainer(model=Net(), args=args, train_dataset=Rows(8), eval_dataset=Rows(4))
    metrics = trainer.train().metrics
    for stage in ("init", "train"):
        for kind in ("alloc", "peaked"):
            assert isinstance(metrics[f"{stage}_mem_cpu_{kind}_delta"], int)
    assert metrics["train_mem_cpu_peaked_delta"] >= 0 and "before_init_mem_cpu" in metrics
    assert "eval_mem_cpu_alloc_delta" in trainer.evaluate()
    assert "init_mem_cpu_alloc_delta" not in trainer.evaluate()  # init is reported once
    quiet = Trainer(model=Net(), args=_args(tmp_path), train_dataset=Rows(8))
    assert not [k for k in quiet.train().metrics if "_mem_" in k]


def test_the_datasets_example_runs_on_loopkit_alone(tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    examples = Path(__file__).resolve().parent.parent / "examples"
    monkeypatch.syspath_prepend(str(examples))
    import importlib
    import sys

    sys.modules.pop("hf_datasets_classification", None)
    script = importlib.import_module("hf_datasets_classification")
    trainer, metrics = script.run(str(tmp_path / "run"), num_train_epochs=2, n=200)
    assert metrics["eval_accuracy"] > 0.4  # 3 classes: above chance after 2 short epochs
    assert [p.name for p in list_hf_checkpoints(tmp_path / "run")] == [
        "checkpoint-10",
        "checkpoint-5",
    ]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_label_names_default_to_forwards_label_arguments_as_hf_finds_them(tmp_path):
    class Tagged(Net):
        def forward(self, x, tag_label=None):  # noqa: ANN001
            return super().forward(x, tag_label)

    rows = [{"x": Rows(6).x[i], "tag_label": int(Rows(6).y[i])} for i in range(6)]
    trainer = Trainer(model=Tagged(), args=_args(tmp_path))
    assert trainer.label_names == ["tag_label"]
    out = trainer.predict(rows)
    assert out.label_ids.tolist() == Rows(6).y.tolist() and "test_loss" in out.metrics


def test_a_checkpoint_whose_renaming_a_crash_cut_off_still_counts(tmp_path):
    Trainer(model=Net(), args=_saving(tmp_path), train_dataset=Rows(16)).train()
    out = tmp_path / "out"
    (out / "checkpoint-4").rename(out / "step-00000004")  # fit wrote it, no HF name yet
    assert [p.name for p in list_hf_checkpoints(out)] == ["step-00000004", "checkpoint-2"]
    again = Trainer(model=Net(), args=_saving(tmp_path, max_steps=6), train_dataset=Rows(16))
    assert again.train(resume_from_checkpoint=True).global_step == 6  # from step 4
    assert [p.name for p in list_hf_checkpoints(out)][:2] == ["checkpoint-6", "step-00000004"]
    Trainer(model=Net(), args=_saving(tmp_path), train_dataset=Rows(16)).train()  # fresh
    assert "step-00000004" in [p.name for p in (out / "previous-run").iterdir()]
