"""Every TrainingArguments field: accepted with HF's default, implemented, or refused with
the reason and what to use instead (loopkit.compat.fields), in step with transformers."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from loopkit.compat import EvalPrediction, Trainer, TrainingArguments
from loopkit.compat.fields import FIELDS, OLD_FIELDS
from loopkit.compat.runtime import COMPAT_LOGGER, ddp_options

OURS = {f.name: f for f in dataclasses.fields(TrainingArguments)}

# A value other than HF's default, for each refused field.
REFUSED_SAMPLES: dict[str, Any] = {
    "optim_target_modules": ["attn"],
    "average_tokens_across_devices": False,
    "label_smoothing_factor": 0.1,
    "bf16_full_eval": True,
    "fp16_full_eval": True,
    "use_liger_kernel": True,
    "liger_kernel_config": {"rms_norm": False},
    "auto_find_batch_size": True,
    "eval_do_concat_batches": False,
    "include_for_metrics": ["inputs"],
    "save_on_each_node": True,
    "push_to_hub": True,
    "ignore_data_skip": True,
    "accelerator_config": {"split_batches": True},
    "parallelism_config": object(),
    "dataloader_persistent_workers": True,
    "dataloader_prefetch_factor": 2,
    "dataloader_multiprocessing_context": "spawn",
    "ddp_broadcast_buffers": False,
    "ddp_backend": "gloo",
    "fsdp": "full_shard",
    "fsdp_config": {"min_num_params": 1},
    "deepspeed": "ds_config.json",
    "debug": "underflow_overflow",
    "save_safetensors": False,
    "group_by_length": True,
    # transformers 4.46-4.57's fields gone in 5
    "adafactor": True,
    "fp16_backend": "apex",
    "half_precision_backend": "apex",
    "fsdp_min_num_params": 1000,
    "fsdp_transformer_layer_cls_to_wrap": "Block",
    "include_inputs_for_metrics": True,
    "include_tokens_per_second": True,
    "jit_mode_eval": True,
    "use_ipex": True,
    "past_index": 0,
    "tpu_metrics_debug": True,
    "dispatch_batches": True,
    "split_batches": True,
}

# The 4.x defaults of OLD_FIELDS, read from transformers 4.46.0's and 4.57.1's
# training_args.py (dispatch_batches, split_batches and use_ipex are 4.46's only).
OLD_DEFAULTS: dict[str, Any] = {
    "adafactor": False,
    "dispatch_batches": None,
    "fp16_backend": "auto",
    "fp16_opt_level": "O1",
    "fsdp_min_num_params": 0,
    "fsdp_transformer_layer_cls_to_wrap": None,
    "half_precision_backend": "auto",
    "include_inputs_for_metrics": False,
    "include_tokens_per_second": False,
    "jit_mode_eval": False,
    "mp_parameters": "",
    "no_cuda": False,
    "past_index": -1,
    "per_gpu_eval_batch_size": None,
    "per_gpu_train_batch_size": None,
    "push_to_hub_model_id": None,
    "push_to_hub_organization": None,
    "push_to_hub_token": None,
    "ray_scope": "last",
    "split_batches": None,
    "torchdynamo": None,
    "tpu_metrics_debug": False,
    "tpu_num_cores": None,
    "use_ipex": False,
    "use_legacy_prediction_loop": False,
    "use_mps_device": False,
}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise AssertionError(f"{f.name} has no default")


def test_the_table_covers_every_field_and_nothing_else():
    assert set(FIELDS) == set(OURS)
    refused = {name for name, note in FIELDS.items() if note.support == "refused"}
    assert refused == set(REFUSED_SAMPLES)
    for name, note in FIELDS.items():
        assert note.support in ("same", "different", "no effect", "refused", "loopkit"), name
        if note.support in ("different", "no effect", "refused"):
            assert note.note, f"{name}: say how it differs"
        if note.support == "refused":
            assert note.instead and note.allowed is not None, name


@pytest.mark.parametrize("name", sorted(REFUSED_SAMPLES))
def test_a_refused_field_names_itself_the_reason_and_what_to_use_instead(tmp_path, name):
    note = FIELDS[name]
    with pytest.raises(ValueError) as error:
        TrainingArguments(output_dir=str(tmp_path), **{name: REFUSED_SAMPLES[name]})
    message = str(error.value)
    assert f"not supported by loopkit.compat: {name} ({note.note}; {note.instead})" in message
    TrainingArguments(output_dir=str(tmp_path), **{name: _default(OURS[name])})  # HF's default


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"optim": "adafactor"}, r"not supported by loopkit.compat: optim \(built in"),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "not supported by loopkit.compat"),
        ({"report_to": "wandb"}, r"not supported by loopkit.compat: report_to"),
        ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy"),
        ({"optim": "adamw_torch", "optim_args": "momentum=0.9"}, "read for 'sgd' and"),
        ({"optim": "sgd", "optim_args": "betas=0.9"}, r"'betas' is not one of"),
        ({"include_num_input_tokens_seen": "some"}, "include_num_input_tokens_seen"),
        ({"log_level": "loud"}, "log_level"),
        ({"warmup_steps": 2.5}, "whole number of steps"),
        ({"neftune_noise_alpha": -1.0}, "neftune_noise_alpha"),
    ],
)
def test_values_outside_what_is_built_in_are_refused_by_name(tmp_path, values, match):
    with pytest.raises(ValueError, match=match):
        TrainingArguments(output_dir=str(tmp_path), **values)


def test_every_field_of_the_installed_transformers_is_here_with_hfs_default(tmp_path):
    transformers = pytest.importorskip("transformers")
    theirs = [f for f in dataclasses.fields(transformers.TrainingArguments) if f.init]
    missing = sorted(f.name for f in theirs if f.name not in OURS)
    assert not missing, f"fields of transformers {transformers.__version__} missing: {missing}"
    major = int(transformers.__version__.split(".")[0])
    for f in theirs:  # the defaults are transformers 5's (4.x: those of its own fields)
        if major >= 5 or f.name in OLD_FIELDS:
            expected = _default(f)
            assert _default(OURS[f.name]) == getattr(expected, "value", expected), f.name
    TrainingArguments(output_dir=str(tmp_path))  # all of HF's defaults together


def test_the_fields_transformers_4_had_and_5_removed_are_all_here_with_4xs_defaults(tmp_path):
    assert set(OLD_FIELDS) == set(OLD_DEFAULTS)
    for name, default in OLD_DEFAULTS.items():
        assert name in FIELDS and _default(OURS[name]) == default, name
        TrainingArguments(output_dir=str(tmp_path), **{name: default})  # never a TypeError


def test_transformers_4_names_are_read_with_their_meaning_there(tmp_path):
    args = TrainingArguments(
        str(tmp_path),
        no_cuda=True,
        per_gpu_train_batch_size=3,
        per_gpu_eval_batch_size=5,
        torchdynamo="eager",
        push_to_hub_token="secret",
        half_precision_backend="cpu_amp",
        use_mps_device=True,
        use_legacy_prediction_loop=True,
    )
    assert args.use_cpu is True
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (3, 5)
    assert args.torch_compile is True and args.torch_compile_backend == "eager"
    assert args.hub_token == "secret"
    shown = args.to_dict()  # HF hides every *_token in what it writes
    assert shown["hub_token"] == "<HUB_TOKEN>"
    assert shown["push_to_hub_token"] == "<PUSH_TO_HUB_TOKEN>"
    with pytest.raises(ValueError, match="per_gpu_train_batch_size"):
        TrainingArguments(str(tmp_path), per_gpu_train_batch_size=0)


def test_hf_names_and_enums_and_json_strings_are_read_as_hf_reads_them(tmp_path):
    transformers = pytest.importorskip("transformers")
    args = TrainingArguments(
        str(tmp_path),
        eval_strategy=transformers.IntervalStrategy.EPOCH,
        save_strategy=transformers.IntervalStrategy.EPOCH,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs='{"use_reentrant": false}',
        lr_scheduler_type="cosine",
        lr_scheduler_kwargs='{"num_cycles": 0.5}',
        include_num_input_tokens_seen=True,
        warmup_steps=0.25,
    )
    assert args.eval_strategy == "epoch" and type(args.eval_strategy) is str
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.scheduler_kwargs() == {"num_cycles": 0.5}
    assert args.include_num_input_tokens_seen == "all"
    assert args.get_warmup_steps(10) == 3  # a fraction of the run: ceil(0.25 * 10)
    assert TrainingArguments(str(tmp_path), warmup_steps=4).get_warmup_steps(10) == 4


def test_distributed_fields_map_onto_loopkits_ddp(tmp_path):
    args = TrainingArguments(
        str(tmp_path),
        ddp_find_unused_parameters=True,
        ddp_static_graph=False,
        ddp_bucket_cap_mb=10,
        ddp_timeout=30,
    )
    assert ddp_options(args) == {
        "timeout_s": 30.0,
        "find_unused_parameters": True,
        "static_graph": False,
        "bucket_cap_mb": 10,
    }


# --- the implemented fields, run ------------------------------------------------------------


class Tokens:
    """Token-id samples with padding (pad id 0) and labels; not a torch Dataset."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 20, (n, 6), generator=g)
        self.ids[::2, 4:] = 0  # every other sample ends in two pad tokens
        self.labels = (self.ids[:, 0] > 10).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = (self.ids[i] != 0).long()
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


class TokenNet(torch.nn.Module):
    """Embeddings -> mean -> linear, with HF's get_input_embeddings and activation
    checkpointing hooks (recording how they are called)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 4)
        self.head = torch.nn.Linear(4, 2)
        self.checkpointing: dict[str, Any] | None = None

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers=1
    ):  # noqa: ANN001, E501
        self.checkpointing = {"kwargs": activation_checkpointing_kwargs, "every": every_n_layers}

    def forward(self, input_ids, attention_mask=None, labels=None):  # noqa: ANN001
        logits = self.head(self.embed(input_ids).mean(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**(base | overrides))


@pytest.mark.parametrize(("mode", "expected"), [("all", 12 * 6), ("non_padding", 12 * 6 - 12)])
def test_include_num_input_tokens_seen_counts_as_hf(tmp_path, mode, expected):
    args = _args(tmp_path, include_num_input_tokens_seen=mode, logging_steps=3)
    trainer = Trainer(model=TokenNet(), args=args, train_dataset=Tokens(12))
    trainer.train()
    assert trainer.state.num_input_tokens_seen == expected  # 3 steps of 4 samples
    assert trainer.state.log_history[-1]["num_input_tokens_seen"] == expected


def test_eval_on_start_evaluates_before_the_first_step(tmp_path):
    args = _args(tmp_path, eval_on_start=True, eval_strategy="steps", eval_steps=10)
    trainer = Trainer(model=TokenNet(), args=args, train_dataset=Tokens(12), eval_dataset=Tokens(4))
    trainer.train()
    first = trainer.state.log_history[0]
    assert "eval_loss" in first and first["step"] == 0


def test_batch_eval_metrics_sees_each_batch_and_the_last_computes(tmp_path):
    calls: list[tuple[int, bool]] = []

    def metrics(pred: EvalPrediction, compute_result: bool) -> dict[str, float] | None:
        assert isinstance(pred.predictions, torch.Tensor)  # HF passes the batch's tensors
        calls.append((len(pred.label_ids), compute_result))
        return {"batches": float(len(calls))} if compute_result else None

    args = _args(tmp_path, batch_eval_metrics=True, per_device_eval_batch_size=4)
    trainer = Trainer(model=TokenNet(), args=args, eval_dataset=Tokens(10), compute_metrics=metrics)
    assert trainer.evaluate()["eval_batches"] == 3.0
    assert calls == [(4, False), (4, False), (2, True)]


def test_neftune_adds_noise_while_training_and_is_removed_after(tmp_path):
    noisy: list[bool] = []

    class Record(TokenNet):
        def forward(self, input_ids, attention_mask=None, labels=None):  # noqa: ANN001
            noisy.append(not torch.equal(self.embed(input_ids), self.embed.weight[input_ids]))
            return super().forward(input_ids, attention_mask, labels)

    model = Record()
    args = _args(tmp_path, neftune_noise_alpha=5.0)
    Trainer(model=model, args=args, train_dataset=Tokens(12)).train()
    assert noisy and all(noisy)  # HF's uniform noise on the embeddings, in training
    assert len(model.embed._forward_hooks) == 0  # and gone after train()
    ids = Tokens(2).ids
    torch.testing.assert_close(model.embed(ids), model.embed.weight[ids])


def test_activation_checkpointing_calls_the_models_hook_with_hfs_arguments(tmp_path):
    model = TokenNet()
    kwargs = {"use_reentrant": False, "every_n_layers": 2}
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    Trainer(model=model, args=args, train_dataset=Tokens(12)).train()
    assert model.checkpointing == {"kwargs": {"use_reentrant": False}, "every": 2}


def test_log_level_sets_the_level_of_transformers_and_loopkits_loggers(tmp_path):
    names = ["transformers", "loopkit", COMPAT_LOGGER]
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    try:
        Trainer(model=TokenNet(), args=_args(tmp_path, log_level="error"))
        assert [logger.level for logger in loggers] == [logging.ERROR] * 3
        Trainer(model=TokenNet(), args=_args(tmp_path, log_level="passive"))  # leaves them
        assert [logger.level for logger in loggers] == [logging.ERROR] * 3
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)


@pytest.mark.parametrize(
    ("rank", "local_rank", "on_each_node", "expected"),
    [
        (0, 0, True, logging.DEBUG),
        (1, 1, True, logging.ERROR),  # a replica: log_level_replica
        (2, 0, True, logging.DEBUG),  # the first process of another node
        (2, 0, False, logging.ERROR),  # ... which only rank 0 is, without log_on_each_node
    ],
)
def test_which_processes_get_log_level_is_hfs_rule(
    tmp_path, monkeypatch, rank, local_rank, on_each_node, expected
):
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", 4)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")  # torchrun's variables; nothing connects
    args = TrainingArguments(
        str(tmp_path),
        log_level="debug",
        log_level_replica="error",
        log_on_each_node=on_each_node,
    )
    assert args.get_process_log_level() == expected


def test_sequential_sampling_reads_the_dataset_in_order(tmp_path):
    seen: list[torch.Tensor] = []

    class Record(TokenNet):
        def forward(self, input_ids, attention_mask=None, labels=None):  # noqa: ANN001
            seen.append(input_ids)
            return super().forward(input_ids, attention_mask, labels)

    args = _args(tmp_path, train_sampling_strategy="sequential", max_steps=2)
    Trainer(model=Record(), args=args, train_dataset=Tokens(8)).train()
    torch.testing.assert_close(torch.cat(seen), Tokens(8).ids)


def test_optim_args_reach_sgd(tmp_path):
    args = _args(tmp_path, optim="sgd", optim_args="momentum=0.9,nesterov=True", max_steps=1)
    trainer = Trainer(model=TokenNet(), args=args, train_dataset=Tokens(8))
    trainer.train()
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert group["momentum"] == 0.9 and group["nesterov"] is True


def test_the_migration_guide_lists_every_field_and_every_refused_member():
    from loopkit.compat.members import REFUSED_MEMBERS

    guide = (Path(__file__).resolve().parent.parent / "docs" / "migrating.md").read_text()
    for name, note in FIELDS.items():
        assert f"| `{name}` | {note.support} |" in guide, name
    for name in REFUSED_MEMBERS:
        assert f"| `{name}` | refused |" in guide, name
