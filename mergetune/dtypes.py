"""The dtype names a user writes, in one place for every file and option that takes one.

No torch here: the study file's reader (and the leaderboard behind it) must not need the model stack.
"""

from __future__ import annotations

from typing import Literal, get_args

#: What a live model is built in: a study's `dtype`, `mergetune eval --dtype`.
ModelDtype = Literal["float32", "bfloat16", "float16"]
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)
#: What a recipe's `dtype` and `out_dtype` may name: mergekit's, float64 too.
RECIPE_DTYPES: tuple[str, ...] = (*MODEL_DTYPES, "float64")
