"""Every TrainingArguments field, HF's and loopkit's: what the façade does with it.

One table, `FIELDS`, says for each field whether the façade does what HF's Trainer does
("same"), does something close and says how it differs ("different"), reads it as HF does
but HF itself ignores it in this setting ("no effect"), or refuses any value but HF's
default ("refused", with why and what to use instead). `TrainingArguments` checks the
refusals when it is built (`refusal_of`); docs/migrating.md is generated from the same
words; a test keeps the table in step with the installed transformers' dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Support = Literal["same", "different", "no effect", "refused", "loopkit"]
"""How the façade treats a field (see the module docstring; "loopkit": ours, not HF's)."""


@dataclass(frozen=True, slots=True)
class FieldNote:
    """What the façade does with one field.

    Attributes:
        support: see `Support`.
        note: how it differs, or (refused) why.
        instead: (refused) what to use instead.
        allowed: (refused) the values accepted (HF's default, or more): a predicate.
    """

    support: Support
    note: str = ""
    instead: str = ""
    allowed: Callable[[Any], bool] | None = None


def _is_none(value: Any) -> bool:
    return value is None


def _is_false(value: Any) -> bool:
    return value is False or value is None


def _is_empty(value: Any) -> bool:
    return not value


def _is_true(value: Any) -> bool:
    return value is True or value is None


def _zero(value: Any) -> bool:
    return value == 0


def _torch_amp(value: Any) -> bool:
    return value in ("auto", "cpu_amp")


def _negative(value: Any) -> bool:
    return isinstance(value, int) and value < 0


def _refused(note: str, instead: str, allowed: Callable[[Any], bool] = _is_false) -> FieldNote:
    return FieldNote("refused", note, instead, allowed)


_SAME = FieldNote("same")

FIELDS: dict[str, FieldNote] = {
    # -- the run -----------------------------------------------------------------------
    "output_dir": FieldNote(
        "same",
        "checkpoints are output_dir/checkpoint-N, in loopkit's format (safetensors + JSON, "
        "atomic, exact resume) plus HF's trainer_state.json",
    ),
    "per_device_train_batch_size": _SAME,
    "num_train_epochs": _SAME,
    "max_steps": _SAME,
    "learning_rate": _SAME,
    "lr_scheduler_type": FieldNote(
        "same",
        "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
        "inverse_sqrt; the others are refused (pass optimizers=(opt, scheduler) or "
        "lr_scheduler_factory=)",
    ),
    "lr_scheduler_kwargs": _SAME,
    "warmup_steps": FieldNote("same", "a value below 1 is a fraction of the run, as in HF 5"),
    "optim": FieldNote(
        "same",
        "adamw_torch, adamw_torch_fused (HF 5's default), adamw_hf, sgd, adagrad; the others "
        "are refused (pass optimizer_cls_and_kwargs=)",
    ),
    "optim_args": FieldNote("same", "for sgd and adagrad (HF's keys); refused with the others"),
    "weight_decay": FieldNote("same", "HF's two groups: no decay on biases and norm weights"),
    "adam_beta1": _SAME,
    "adam_beta2": _SAME,
    "adam_epsilon": _SAME,
    "optim_target_modules": _refused(
        "GaLore / APOLLO optimizers are not built in",
        "pass optimizer_cls_and_kwargs=(YourOptimizer, {...})",
        _is_none,
    ),
    "gradient_accumulation_steps": FieldNote(
        "same", "each window is normalised over its global item count (labels != -100)"
    ),
    "average_tokens_across_devices": _refused(
        "loopkit always divides a window's summed loss by its item count over every rank",
        "leave it True",
        _is_true,
    ),
    "max_grad_norm": _SAME,
    "label_smoothing_factor": _refused(
        "the Trainer does not rewrite the model's loss",
        "pass compute_loss_func= with F.cross_entropy(..., label_smoothing=...)",
        _zero,
    ),
    # -- precision and memory ----------------------------------------------------------
    "bf16": _SAME,
    "fp16": FieldNote("same", "loopkit's fp16 loss scaling (skips overflowing updates)"),
    "bf16_full_eval": _refused(
        "evaluation runs in the training precision", "use bf16=True (autocast in eval too)"
    ),
    "fp16_full_eval": _refused(
        "evaluation runs in the training precision", "use fp16=True (autocast in eval too)"
    ),
    "tf32": _SAME,
    "activation_checkpointing": FieldNote(
        "same",
        "calls the model's activation_checkpointing_enable (or gradient_checkpointing_enable)",
    ),
    "activation_checkpointing_kwargs": _SAME,
    "gradient_checkpointing": FieldNote("same", "HF's old name of activation_checkpointing"),
    "gradient_checkpointing_kwargs": FieldNote(
        "same", "HF's old name of activation_checkpointing_kwargs"
    ),
    "torch_compile": FieldNote("same", "model.compile() in place, once"),
    "torch_compile_backend": _SAME,
    "torch_compile_mode": _SAME,
    "use_liger_kernel": _refused(
        "Liger kernels patch transformers' modelling code",
        "apply liger_kernel.transformers.apply_liger_kernel_to_*() to the model yourself",
    ),
    "liger_kernel_config": _refused(
        "Liger kernels are not applied", "see use_liger_kernel", _is_none
    ),
    "use_cache": FieldNote("same", "sets model.config.use_cache when the model has a config"),
    "neftune_noise_alpha": FieldNote(
        "same", "uniform noise on the input embeddings while training (HF's NEFTune hook)"
    ),
    "torch_empty_cache_steps": _SAME,
    "auto_find_batch_size": _refused(
        "the batch size is never changed behind your back",
        "lower per_device_train_batch_size and raise gradient_accumulation_steps",
    ),
    # -- logging -----------------------------------------------------------------------
    "logging_strategy": _SAME,
    "logging_steps": _SAME,
    "logging_first_step": _SAME,
    "log_on_each_node": FieldNote(
        "same",
        "which processes get log_level (the first of each node; False: rank 0 only), the "
        "others log_level_replica; loopkit's own messages come from rank 0 only",
    ),
    "logging_nan_inf_filter": FieldNote(
        "same",
        "the logged training loss as HF's (a non-finite step loss counts as the mean of the "
        "steps since the last log; training goes on); the eval loss leaves out the batches "
        "whose loss is not finite when some are (under Pipeline: the micro-batches)",
    ),
    "include_num_input_tokens_seen": FieldNote(
        "same", "'all' / 'non_padding' / 'no' (True / False); counted on the host from the batch"
    ),
    "log_level": FieldNote(
        "same",
        "the level of transformers' logger (HF's set_verbosity; the façade logs HF's "
        "messages on 'transformers.trainer') and of loopkit's loggers, where should_log",
    ),
    "log_level_replica": FieldNote(
        "same", "the same levels on the other processes (default 'warning')"
    ),
    "disable_tqdm": _SAME,
    "report_to": FieldNote(
        "different",
        "'none', 'tensorboard' or 'all' (= tensorboard); other services are refused: add a "
        "TrainerCallback whose on_log sends the logs",
    ),
    "run_name": FieldNote("no effect", "only the reporting integrations read it"),
    "project": FieldNote("no effect", "only the trackio integration reads it"),
    "trackio_space_id": FieldNote("no effect", "only the trackio integration reads it"),
    "trackio_bucket_id": FieldNote("no effect", "only the trackio integration reads it"),
    "trackio_static_space_id": FieldNote("no effect", "only the trackio integration reads it"),
    # -- evaluation --------------------------------------------------------------------
    "eval_strategy": _SAME,
    "eval_steps": _SAME,
    "eval_delay": _SAME,
    "per_device_eval_batch_size": _SAME,
    "prediction_loss_only": _SAME,
    "eval_on_start": _SAME,
    "eval_do_concat_batches": _refused(
        "predictions are always concatenated over the evaluation set",
        "leave it True; split the arrays by batch size yourself",
        _is_true,
    ),
    "eval_use_gather_object": FieldNote(
        "no effect", "predictions of any shape are gathered as padded tensors"
    ),
    "eval_accumulation_steps": FieldNote(
        "different", "predictions stay on the device until the evaluation ends"
    ),
    "include_for_metrics": _refused(
        "EvalPrediction carries predictions and label_ids only",
        "compute what you need from the predictions (return it from the model)",
        _is_empty,
    ),
    "batch_eval_metrics": FieldNote(
        "same",
        "compute_metrics(EvalPrediction of one batch's tensors, compute_result=last batch)",
    ),
    # -- saving ------------------------------------------------------------------------
    "save_only_model": FieldNote(
        "different", "checkpoints always hold the whole training state (resumable)"
    ),
    "save_strategy": _SAME,
    "save_steps": _SAME,
    "save_on_each_node": _refused(
        "checkpoints are written once, to a file system every rank sees",
        "put output_dir on a shared file system",
    ),
    "save_total_limit": FieldNote("same", "HF's rotation: the newest and the best are kept"),
    "enable_jit_checkpoint": FieldNote(
        "different",
        "loopkit's fit always saves when SIGTERM or SIGUSR1 arrives (every rank agrees)",
    ),
    "push_to_hub": _refused(
        "loopkit does not upload", "push output_dir with huggingface_hub.upload_folder"
    ),
    "hub_token": FieldNote("no effect", "read only with push_to_hub (refused)"),
    "hub_private_repo": FieldNote("no effect", "read only with push_to_hub (refused)"),
    "hub_model_id": FieldNote("no effect", "read only with push_to_hub (refused)"),
    "hub_strategy": FieldNote("no effect", "read only with push_to_hub (refused)"),
    "hub_always_push": FieldNote("no effect", "read only with push_to_hub (refused)"),
    "hub_revision": FieldNote("no effect", "read only with push_to_hub (refused)"),
    "load_best_model_at_end": _SAME,
    "metric_for_best_model": _SAME,
    "greater_is_better": _SAME,
    "ignore_data_skip": _refused(
        "resume is exact: the data position is restored, nothing is skipped or replayed",
        "leave it False",
    ),
    "restore_callback_states_from_checkpoint": FieldNote(
        "different", "callback states are always restored (resume is exact)"
    ),
    # -- reproducibility and devices ---------------------------------------------------
    "full_determinism": FieldNote(
        "same", "torch.use_deterministic_algorithms(True) and cuDNN determinism"
    ),
    "seed": _SAME,
    "data_seed": _SAME,
    "use_cpu": _SAME,
    "accelerator_config": _refused(
        "there is no accelerate.Accelerator", "pass strategy= (a loopkit Strategy)", _is_none
    ),
    "parallelism_config": _refused(
        "there is no accelerate.Accelerator",
        "pass strategy=loopkit.FSDP(...) or loopkit.Pipeline(...)",
        _is_none,
    ),
    # -- data --------------------------------------------------------------------------
    "dataloader_drop_last": _SAME,
    "dataloader_num_workers": _SAME,
    "dataloader_pin_memory": _SAME,
    "dataloader_persistent_workers": _refused(
        "loopkit's StatefulDataLoader is built per run", "leave it False"
    ),
    "dataloader_prefetch_factor": _refused(
        "loopkit's loader uses torch's default prefetching", "leave it None", _is_none
    ),
    "dataloader_multiprocessing_context": _refused(
        "loopkit's loader uses torch's default start method", "leave it None", _is_none
    ),
    "dataloader_in_order": FieldNote("no effect", "batches always come in order (exact resume)"),
    "remove_unused_columns": FieldNote(
        "same",
        "columns forward does not take are dropped before collation (datasets.Dataset: "
        "dataset.remove_columns)",
    ),
    "label_names": _SAME,
    "train_sampling_strategy": FieldNote(
        "same", "'random' or 'sequential'; 'group_by_length' is refused (bucket the data yourself)"
    ),
    "length_column_name": FieldNote("no effect", "read only with group_by_length (refused)"),
    # -- distributed -------------------------------------------------------------------
    "ddp_find_unused_parameters": FieldNote("same", "loopkit.DDP(find_unused_parameters=...)"),
    "ddp_bucket_cap_mb": FieldNote("same", "loopkit.DDP(bucket_cap_mb=...)"),
    "ddp_broadcast_buffers": _refused(
        "loopkit.DDP keeps torch's default (broadcast buffers)",
        "leave it None or True",
        _is_true,
    ),
    "ddp_static_graph": FieldNote("same", "loopkit.DDP(static_graph=...)"),
    "ddp_backend": _refused(
        "loopkit picks the backend (nccl on CUDA, gloo on CPU)", "leave it None", _is_none
    ),
    "ddp_timeout": FieldNote("same", "loopkit.DDP(timeout_s=...)"),
    "fsdp": _refused("FSDP is a loopkit Strategy", "pass strategy=loopkit.FSDP(...)", _is_empty),
    "fsdp_config": _refused(
        "FSDP is a loopkit Strategy", "pass strategy=loopkit.FSDP(...)", _is_none
    ),
    "deepspeed": _refused(
        "DeepSpeed is not integrated", "pass strategy=loopkit.FSDP(...) for sharding", _is_none
    ),
    "debug": _refused(
        "HF's underflow/overflow and TPU debug modes are not built in",
        "use loopkit's fingerprints (fit(fingerprint_every=...))",
        _is_empty,
    ),
    "skip_memory_metrics": FieldNote(
        "same", "HF's *_mem_cpu/gpu_*_delta names; the CPU peak is sampled every 1 ms"
    ),
    "do_train": FieldNote("no effect", "the Trainer never reads it (as in HF)"),
    "do_eval": FieldNote("no effect", "the Trainer never reads it (as in HF)"),
    "do_predict": FieldNote("no effect", "the Trainer never reads it (as in HF)"),
    "resume_from_checkpoint": FieldNote(
        "different",
        "HF's Trainer does not read it (its example scripts do); here train() uses it when "
        "called without resume_from_checkpoint",
    ),
    "local_rank": FieldNote("no effect", "loopkit reads LOCAL_RANK from the environment"),
    # -- fields of older transformers versions -----------------------------------------
    "overwrite_output_dir": FieldNote(
        "different",
        "(transformers < 5) a fresh train() deletes an earlier run's checkpoints instead of "
        "moving them aside",
    ),
    "warmup_ratio": FieldNote("same", "(transformers < 5) warmup as a fraction of the run"),
    "logging_dir": FieldNote("same", "(transformers < 5) TensorBoard's directory"),
    "save_safetensors": _refused(
        "(transformers < 5) loopkit always writes safetensors (it never pickles)",
        "leave it True",
        _is_true,
    ),
    "group_by_length": _refused(
        "(transformers < 5) length-grouped sampling is not built in",
        "sort or bucket the dataset yourself",
    ),
    "evaluation_strategy": FieldNote("same", "(transformers < 4.46) old name of eval_strategy"),
    # transformers 4.46-4.57's fields that 5 removed (OLD_FIELDS) --------------------
    "no_cuda": FieldNote("same", "(transformers < 5) old name of use_cpu"),
    "use_mps_device": FieldNote(
        "no effect", "(transformers < 5) deprecated there too: mps is used when available"
    ),
    "per_gpu_train_batch_size": FieldNote(
        "same", "(transformers < 5) old name of per_device_train_batch_size (it wins)"
    ),
    "per_gpu_eval_batch_size": FieldNote(
        "same", "(transformers < 5) old name of per_device_eval_batch_size (it wins)"
    ),
    "torchdynamo": FieldNote("same", "(transformers < 5) old name of torch_compile_backend"),
    "push_to_hub_token": FieldNote(
        "no effect", "(transformers < 5) old name of hub_token, read only with push_to_hub"
    ),
    "push_to_hub_model_id": FieldNote(
        "no effect", "(transformers < 5) read only with push_to_hub (refused)"
    ),
    "push_to_hub_organization": FieldNote(
        "no effect", "(transformers < 5) read only with push_to_hub (refused)"
    ),
    "adafactor": _refused(
        "(transformers < 5) Adafactor is not built in",
        "pass optimizer_cls_and_kwargs=(transformers.Adafactor, {...})",
    ),
    "fp16_backend": _refused(
        "(transformers < 5) apex is not integrated; loopkit's precision is torch autocast",
        "leave it 'auto'",
        _torch_amp,
    ),
    "half_precision_backend": _refused(
        "(transformers < 5) apex is not integrated; loopkit's precision is torch autocast",
        "leave it 'auto' (or 'cpu_amp')",
        _torch_amp,
    ),
    "fp16_opt_level": FieldNote(
        "no effect", "(transformers < 5) apex's level, read only with the apex backend (refused)"
    ),
    "fsdp_min_num_params": _refused(
        "(transformers < 5) FSDP is a loopkit Strategy", "pass strategy=loopkit.FSDP(...)", _zero
    ),
    "fsdp_transformer_layer_cls_to_wrap": _refused(
        "(transformers < 5) FSDP is a loopkit Strategy",
        "pass strategy=loopkit.FSDP(...)",
        _is_none,
    ),
    "include_inputs_for_metrics": _refused(
        "(transformers < 5) EvalPrediction carries predictions and label_ids only",
        "compute what you need from the predictions (return it from the model)",
    ),
    "include_tokens_per_second": _refused(
        "(transformers < 5) the train metrics do not count tokens",
        "use include_num_input_tokens_seen=True (state.num_input_tokens_seen, in the logs)",
    ),
    "jit_mode_eval": _refused(
        "(transformers < 5) torch.jit tracing is not built in", "use torch_compile=True"
    ),
    "use_ipex": _refused(
        "(transformers < 5) Intel Extension for PyTorch is not integrated",
        "leave it False (torch_compile=True for speed)",
    ),
    "past_index": _refused(
        "(transformers < 5) the Trainer does not feed a model's past state (mems) back in",
        "leave it -1; carry the state in your model",
        _negative,
    ),
    "tpu_metrics_debug": _refused(
        "(transformers < 5) loopkit has no TPU support", "leave it False"
    ),
    "tpu_num_cores": FieldNote("no effect", "(transformers < 5) only HF's TPU launcher reads it"),
    "mp_parameters": FieldNote(
        "no effect", "(transformers < 5) SageMaker's; HF's Trainer ignores it too"
    ),
    "ray_scope": FieldNote(
        "no effect", "(transformers < 5) read only by hyperparameter_search (refused)"
    ),
    "use_legacy_prediction_loop": FieldNote(
        "different", "(transformers < 5) one evaluation loop; the legacy one computes the same"
    ),
    "dispatch_batches": _refused(
        "(transformers < 5) there is no accelerate.Accelerator; each rank reads its own share",
        "leave it None",
    ),
    "split_batches": _refused(
        "(transformers < 5) there is no accelerate.Accelerator; each rank reads "
        "per_device_train_batch_size samples",
        "leave it None; divide the batch size by the world size yourself",
    ),
    # -- loopkit's own -----------------------------------------------------------------
    "pipeline_split_spec": FieldNote("loopkit", "split points of loopkit.Pipeline"),
    "pipeline_chunks": FieldNote("loopkit", "micro-batches per pipeline step"),
    "pipeline_schedule": FieldNote("loopkit", "a torch.distributed.pipelining schedule"),
}
"""Every field of the façade's TrainingArguments and how it is treated."""

OLD_FIELDS: tuple[str, ...] = (
    "adafactor",
    "dispatch_batches",
    "fp16_backend",
    "fp16_opt_level",
    "fsdp_min_num_params",
    "fsdp_transformer_layer_cls_to_wrap",
    "half_precision_backend",
    "include_inputs_for_metrics",
    "include_tokens_per_second",
    "jit_mode_eval",
    "mp_parameters",
    "no_cuda",
    "past_index",
    "per_gpu_eval_batch_size",
    "per_gpu_train_batch_size",
    "push_to_hub_model_id",
    "push_to_hub_organization",
    "push_to_hub_token",
    "ray_scope",
    "split_batches",
    "torchdynamo",
    "tpu_metrics_debug",
    "tpu_num_cores",
    "use_ipex",
    "use_legacy_prediction_loop",
    "use_mps_device",
)
"""The TrainingArguments fields of transformers 4.46 or 4.57 (the supported 4.x range)
that transformers 5 removed, read from those releases' training_args.py (besides the
older names FIELDS already lists: evaluation_strategy, overwrite_output_dir, warmup_ratio,
logging_dir, save_safetensors, group_by_length). `_n_gpu` (not an argument) is left out."""


def refusal_of(name: str, value: Any) -> str | None:
    """The refusal text for `name=value`, or None when the value is accepted.

    The text reads "not supported by loopkit.compat: <name> (<why>; <what to use instead>)".
    """
    note = FIELDS.get(name)
    if note is None or note.support != "refused" or note.allowed is None:
        return None
    if note.allowed(value):
        return None
    return f"not supported by loopkit.compat: {name} ({note.note}; {note.instead})"


__all__ = ["FIELDS", "OLD_FIELDS", "FieldNote", "Support", "refusal_of"]
