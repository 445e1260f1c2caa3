"""Former home of the affine grid, kept so that existing imports work: everything here is
`lowbit.core.grid`'s."""

from lowbit.core.grid import (  # noqa: F401
    check_finite,
    choose_qparams,
    dequantize,
    fake_quantize,
    group_layout,
    qparams_from_range,
    quantize,
)
