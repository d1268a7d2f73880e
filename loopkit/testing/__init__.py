"""loopkit.testing: property checks and hypothesis search strategies for your own training steps.

Each check runs your pieces (model factory, loss_fn, batches, optimizer factory, step
chain) and raises an AssertionError that says what differed, by how much, where and how to
reproduce it:

    >>> from loopkit.testing import check_accumulation_invariance  # doctest: +SKIP
    >>> check_accumulation_invariance(make_model, loss_fn, batches=(x, y))  # doctest: +SKIP

Hypothesis search strategies (splits, padded token batches, tiny models, seeds, ...) live
in `loopkit.testing.search` (`loopkit.testing.strategies` is its old name); hypothesis is
imported only when one is built, so importing this package never needs it.

Modules: `checks` gathers the checks, each in a module named for what it proves
(`accumulation`, `determinism`, `resume`, `sanity`, `stale_reuse`, `reference`,
`strategy_equivalence`); `setup` holds CheckSetup, the pieces a check runs; `assertions`
compares nested state; `bound_checks` holds Checker, which `pytest_plugin`'s fixture hands out.
"""

from __future__ import annotations

from . import checks
from .assertions import Tolerance as Tolerance
from .assertions import assert_states_close as assert_states_close
from .assertions import assert_trees_close as assert_trees_close
from .assertions import state_tree as state_tree
from .assertions import tolerance_for as tolerance_for
from .bound_checks import Checker as Checker
from .checks import CheckResult as CheckResult
from .checks import ListData as ListData
from .checks import check_accumulation_invariance as check_accumulation_invariance
from .checks import check_determinism as check_determinism
from .checks import check_gradient_flow as check_gradient_flow
from .checks import check_loss_decreases as check_loss_decreases
from .checks import check_matches_reference as check_matches_reference
from .checks import check_no_stale_reuse as check_no_stale_reuse
from .checks import check_resume_equivalence as check_resume_equivalence
from .checks import check_strategy_equivalence as check_strategy_equivalence
from .checks import default_optimizer as default_optimizer
from .checks import default_rank_split as default_rank_split
from .checks import default_resume as default_resume
from .checks import default_save as default_save
from .checks import default_step as default_step

__all__ = [
    "Checker",
    "Tolerance",
    "assert_states_close",
    "assert_trees_close",
    "state_tree",
    "tolerance_for",
]
__all__ += checks.__all__  # every check, its result record and its defaults
