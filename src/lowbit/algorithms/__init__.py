"""Quantization and pruning algorithms, one file each. Importing registers them by name."""

from lowbit.algorithms import rtn  # noqa: F401
from lowbit.algorithms import gptq  # noqa: F401
from lowbit.algorithms import llm_int8  # noqa: F401
from lowbit.algorithms import nf4  # noqa: F401
from lowbit.algorithms import awq  # noqa: F401
from lowbit.algorithms import hqq  # noqa: F401
from lowbit.algorithms import magnitude  # noqa: F401
from lowbit.algorithms import wanda  # noqa: F401
from lowbit.algorithms import sparsegpt  # noqa: F401
