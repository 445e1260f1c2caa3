from lowbit.nn.linear import QuantizedLinear  # noqa: F401
