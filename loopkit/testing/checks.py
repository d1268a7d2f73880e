"""Property checks that users run on *their own* training steps (the public import path).

Each check takes the user's pieces (a model factory, a loss_fn, batches, and optionally an
optimizer factory and `make_step(k)` building the step chain), runs them, and raises an
AssertionError saying what differed, by how much, where (parameter path, optimizer step),
which tolerance it used and how to reproduce it. On success it returns a CheckResult.

Conventions shared by every check (held in one `setup.CheckSetup` record):
    make_model: `() -> nn.Module`, a fresh model with the same initial weights on every call.
    loss_fn: `loss_fn(model, batch)` returning `Loss(sum, count)` or a scalar mean.
    batches: a list holds one full batch per optimizer step; anything else (a tuple
        `(x, y)`, a dict, a tensor) is one batch. A hypothesis search strategy is accepted
        too: the check then runs as its own property test over drawn batches.
    make_step: `k -> transform` for a window of k micro-batches; default
        `chain(forward(loss_fn), accumulate(k), optimizer_step())`.
    optimizer: a factory `params -> Optimizer`; default SGD(lr=0.05, momentum=0.9).

The checks live in modules named for what they prove: `accumulation`, `determinism`,
`resume`, `sanity` (loss decreases, gradient flow), `stale_reuse`, `reference` and
`strategy_equivalence`; this module gathers them.
"""

from __future__ import annotations

from .accumulation import check_accumulation_invariance as check_accumulation_invariance
from .determinism import check_determinism as check_determinism
from .reference import check_matches_reference as check_matches_reference
from .result import CheckResult as CheckResult
from .resume import ListData as ListData
from .resume import check_resume_equivalence as check_resume_equivalence
from .resume import default_resume as default_resume
from .resume import default_save as default_save
from .sanity import check_gradient_flow as check_gradient_flow
from .sanity import check_loss_decreases as check_loss_decreases
from .setup import default_optimizer as default_optimizer
from .setup import default_step as default_step
from .stale_reuse import check_no_stale_reuse as check_no_stale_reuse
from .strategy_equivalence import check_strategy_equivalence as check_strategy_equivalence
from .strategy_equivalence import default_rank_split as default_rank_split

__all__ = [
    "CheckResult",
    "ListData",
    "check_accumulation_invariance",
    "check_determinism",
    "check_gradient_flow",
    "check_loss_decreases",
    "check_matches_reference",
    "check_no_stale_reuse",
    "check_resume_equivalence",
    "check_strategy_equivalence",
    "default_optimizer",
    "default_rank_split",
    "default_resume",
    "default_save",
    "default_step",
]
