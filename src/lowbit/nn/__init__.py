from lowbit.nn.linear import QuantizedLinear  # noqa: F401


def module_from_meta(meta: dict, tensors: dict, bias=None):
    """The quantized module a checkpoint record's entry describes, over its stored tensors:
    a QuantizedEmbedding for ``module: "embedding"``, else a QuantizedLinear."""
    if meta.get("module") == "embedding":
        from lowbit.nn.embedding import QuantizedEmbedding

        return QuantizedEmbedding.from_meta(meta, tensors)
    return QuantizedLinear.from_meta(meta, tensors, bias)
