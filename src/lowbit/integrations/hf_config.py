"""What a lowbit checkpoint's config.json says to Hugging Face transformers.

Two fields are added to the model config when lowbit saves a checkpoint:

* ``quantization_config = {"quant_method": "lowbit", "version": ..., "method": ..., "record": "lowbit.json"}``
  — transformers looks ``quant_method`` up in its table of quantizers; ``import lowbit`` puts
  lowbit's there (`lowbit.integrations.transformers`), which loads the checkpoint with lowbit's
  modules and kernels. ``record`` names the file holding each quantized module's format and
  shape (``lowbit.json``, the full record of how the model was made; this is only a pointer).
* ``transformers_weights = GUARD`` — transformers reads this optional field as the name of the
  weights file. lowbit's quantizer removes it before the weights are looked up; a transformers
  that does not know lowbit (lowbit not imported) reads it as given and refuses the checkpoint
  with an error that quotes it, naming lowbit. Without the guard it would only warn about the
  unknown quant_method and return a model whose quantized layers hold *random* weights.

lowbit's own loader (`lowbit.checkpoint.load`) ignores both fields and removes them from the
config it builds the model from (`strip`); checkpoints written before these fields existed load
as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.version import __version__
from lowbit.models.loading import LOWBIT_CHECKPOINT_MARKER as RECORD

QUANT_METHOD = "lowbit"
GUARD_KEY = "transformers_weights"
GUARD = ("lowbit is required to load this checkpoint (config.json: quantization_config.quant_method = 'lowbit'); "
         "install lowbit and `import lowbit` before from_pretrained")


def quantization_config(record: dict) -> dict:
    """The ``quantization_config`` entry of a checkpoint made as ``record`` describes."""
    method = record.get("method") or {}
    return {"quant_method": QUANT_METHOD, "version": __version__,
            "method": method.get("method") if isinstance(method, dict) else str(method), "record": RECORD}


def add_to_config_json(config_json: str | Path, record: dict) -> None:
    """Add the two fields to a config.json just written by ``config.save_pretrained``."""
    p = Path(config_json)
    data = json.loads(p.read_text(encoding="utf-8"))
    data["quantization_config"] = quantization_config(record)
    data[GUARD_KEY] = GUARD
    p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def strip(config) -> None:
    """Remove the two fields from a transformers config object read from a checkpoint, so the
    model lowbit builds from it is a plain model again (re-saved or exported, it records its
    own quantization)."""
    for sub in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        for attr in ("quantization_config", GUARD_KEY):
            if attr in sub.__dict__:
                delattr(sub, attr)


__all__ = ["GUARD", "GUARD_KEY", "QUANT_METHOD", "RECORD", "add_to_config_json", "quantization_config", "strip"]
