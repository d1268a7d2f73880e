"""loopkit.compat: HF-style Trainer / TrainingArguments / callbacks, built on loopkit.fit().

For people migrating from class-based trainers: a script written for HF's `Trainer` runs
by changing its imports (see docs/migrating.md):

    from loopkit.compat import Trainer, TrainingArguments

Everything here is a thin layer over `loopkit.fit()` and loopkit's public transforms.
"""

from __future__ import annotations

from .args import TrainingArguments as TrainingArguments
from .callbacks import DefaultFlowCallback as DefaultFlowCallback
from .callbacks import EarlyStoppingCallback as EarlyStoppingCallback
from .callbacks import PrinterCallback as PrinterCallback
from .callbacks import ProgressCallback as ProgressCallback
from .callbacks import TrainerCallback as TrainerCallback
from .callbacks import TrainerControl as TrainerControl
from .callbacks import TrainerState as TrainerState
from .evaluation import EvalPrediction as EvalPrediction
from .evaluation import PredictionOutput as PredictionOutput
from .inputs import default_data_collator as default_data_collator
from .trainer import Trainer as Trainer
from .trainer import TrainOutput as TrainOutput

__all__ = [
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "PredictionOutput",
    "PrinterCallback",
    "ProgressCallback",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "default_data_collator",
]
