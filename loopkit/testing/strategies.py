"""The old name of loopkit.testing.search (hypothesis search strategies), kept for imports.

`from loopkit.testing import strategies as lkst` keeps working; new code imports
`loopkit.testing.search`, whose name does not clash with loopkit's distribution strategies.
"""

from __future__ import annotations

from . import search
from .search import MLPFactory as MLPFactory
from .search import TinyTransformer as TinyTransformer
from .search import TransformerBlock as TransformerBlock
from .search import TransformerFactory as TransformerFactory
from .search import classification_batches as classification_batches
from .search import make_token_batch as make_token_batch
from .search import padded_token_batches as padded_token_batches
from .search import precisions as precisions
from .search import rank_splits as rank_splits
from .search import schedules as schedules
from .search import seeds as seeds
from .search import small_mlps as small_mlps
from .search import splits as splits
from .search import tiny_transformers as tiny_transformers

__all__ = list(search.__all__)
