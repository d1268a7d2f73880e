"""loopkit: a functional, composable training-loop toolkit for PyTorch."""

from __future__ import annotations

from . import schedules as schedules
from ._types import Batch as Batch
from ._types import LossFn as LossFn
from ._types import OptimizerFactory as OptimizerFactory
from ._types import Schedule as Schedule
from ._types import Transform as Transform
from ._version import __version__ as __version__
from .averaging import averaged_weights as averaged_weights
from .averaging import ema as ema
from .averaging import swa as swa
from .callbacks import BestModel as BestModel
from .callbacks import Callback as Callback
from .callbacks import EarlyStopping as EarlyStopping
from .callbacks import LRMonitor as LRMonitor
from .callbacks import Request as Request
from .callbacks import Stop as Stop
from .callbacks import ThroughputMonitor as ThroughputMonitor
from .checkpoint import CheckpointError as CheckpointError
from .checkpoint import CheckpointMismatchError as CheckpointMismatchError
from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import save_checkpoint as save_checkpoint
from .checkpoint import save_model as save_model
from .compiled import compile_step as compile_step
from .compose import chain as chain
from .compose import every as every
from .compose import identity as identity
from .compose import when as when
from .config import FitConfig as FitConfig
from .data import DataTimeoutError as DataTimeoutError
from .evaluate import evaluate as evaluate
from .fingerprint import FingerprintRecorder as FingerprintRecorder
from .fingerprint import fingerprint as fingerprint
from .fingerprint import read_fingerprints as read_fingerprints
from .fit import FitResult as FitResult
from .fit import fit as fit
from .forensics import DiffReport as DiffReport
from .forensics import diff_runs as diff_runs
from .guards import zero_nonfinite as zero_nonfinite
from .logging import CSVLogger as CSVLogger
from .logging import JSONLLogger as JSONLLogger
from .logging import ProgressBar as ProgressBar
from .logging import TensorBoardLogger as TensorBoardLogger
from .loss import Loss as Loss
from .loss import cross_entropy as cross_entropy
from .loss import mse as mse
from .lr_finder import LRFinderResult as LRFinderResult
from .lr_finder import find_lr as find_lr
from .metrics import Accuracy as Accuracy
from .metrics import Mean as Mean
from .metrics import Metric as Metric
from .metrics import TopKAccuracy as TopKAccuracy
from .metrics import TorchMetric as TorchMetric
from .params import freeze as freeze
from .params import param_groups as param_groups
from .precision import Precision as Precision
from .precision import set_tf32 as set_tf32
from .run_lock import DirectoryLockedError as DirectoryLockedError
from .state import Average as Average
from .state import StaleStateError as StaleStateError
from .state import TrainState as TrainState
from .state import Window as Window
from .strategies import DDP as DDP
from .strategies import FSDP as FSDP
from .strategies import DistributedError as DistributedError
from .strategies import Pipeline as Pipeline
from .strategies import SingleDevice as SingleDevice
from .strategies import Strategy as Strategy
from .tracking import MLflowLogger as MLflowLogger
from .tracking import WandbLogger as WandbLogger
from .transforms import accumulate as accumulate
from .transforms import clip as clip
from .transforms import forward as forward
from .transforms import optimizer_step as optimizer_step
from .transforms import skip_nonfinite as skip_nonfinite

__all__ = [
    "Accuracy",
    "Average",
    "Batch",
    "BestModel",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "CheckpointMismatchError",
    "DDP",
    "DataTimeoutError",
    "DiffReport",
    "DirectoryLockedError",
    "DistributedError",
    "EarlyStopping",
    "FSDP",
    "FingerprintRecorder",
    "FitConfig",
    "FitResult",
    "JSONLLogger",
    "LRFinderResult",
    "LRMonitor",
    "Loss",
    "LossFn",
    "MLflowLogger",
    "Mean",
    "Metric",
    "OptimizerFactory",
    "Pipeline",
    "Precision",
    "ProgressBar",
    "Request",
    "Schedule",
    "SingleDevice",
    "StaleStateError",
    "Stop",
    "Strategy",
    "TensorBoardLogger",
    "ThroughputMonitor",
    "TopKAccuracy",
    "TorchMetric",
    "TrainState",
    "Transform",
    "WandbLogger",
    "Window",
    "accumulate",
    "averaged_weights",
    "chain",
    "clip",
    "compile_step",
    "cross_entropy",
    "diff_runs",
    "ema",
    "evaluate",
    "every",
    "find_lr",
    "fingerprint",
    "fit",
    "forward",
    "freeze",
    "identity",
    "load_checkpoint",
    "mse",
    "optimizer_step",
    "param_groups",
    "read_fingerprints",
    "save_checkpoint",
    "save_model",
    "schedules",
    "set_tf32",
    "skip_nonfinite",
    "swa",
    "when",
    "zero_nonfinite",
]
