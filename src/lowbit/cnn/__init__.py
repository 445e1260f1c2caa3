"""Integer quantization of ordinary networks (CNNs / MLPs built as ``nn.Sequential``).

Full-integer static int8, post-training or quantization-aware::

    float nn.Sequential
      │ ptq.prepare          fold BatchNorm into the conv, fuse conv/linear + ReLU, an observed
      │                      activation quantizer at the input and after every conv/linear
      ▼
    FakeQuantSequential      (fake_quant.py) the float simulation of the integer network
      │ ptq.calibrate        ~200 samples through it, observers watching, then ranges frozen
      │   or qat.train_qat   training through the fake quantizers (straight-through gradients),
      │                      observers following the activations
      │ ptq.convert          int8 weights per output channel, int32 biases, fixed-point multipliers
      ▼
    IntegerSequential        (integer.py) int8 in, int32 accumulation, requantization, int8 out

:func:`quantize_static` and :func:`lowbit.cnn.qat.qat` run the whole chain and return (integer
model, its fake-quant simulation). Settings come from the ``static-int8`` method's
:class:`~lowbit.algorithms.static_int8.StaticInt8Config` (PTQ) or :class:`QATConfig`.

Dynamic-range int8 (no data, activations quantized at run time): :func:`quantize_dynamic`
replaces every Linear and Conv2d of any network (``dynamic.py``).

What this package shares with the LLM W8A8 method lives below it, not here: activation qparams
and weight codes (:mod:`lowbit.core.static_qparams`), the straight-through fake quantization
(:mod:`lowbit.core.ste`) and the integer kernels (:mod:`lowbit.kernels.static_int8`). The LLM side
never imports this package.
"""

from lowbit.cnn.dynamic import DynamicInt8Conv2d, quantize_dynamic
from lowbit.cnn.fake_quant import FakeQuantSequential
from lowbit.cnn.integer import IntegerSequential
from lowbit.cnn.ptq import calibrate, convert, fold_batchnorm, prepare, quantize_static
from lowbit.cnn.qat import QATConfig, convert_qat, prepare_qat, train_qat  # not qat.qat: it would hide the module

__all__ = [
    "DynamicInt8Conv2d",
    "FakeQuantSequential",
    "IntegerSequential",
    "QATConfig",
    "calibrate",
    "convert",
    "convert_qat",
    "fold_batchnorm",
    "prepare",
    "prepare_qat",
    "quantize_dynamic",
    "quantize_static",
    "train_qat",
]
