"""Integrations of lowbit checkpoints with other libraries.

``import lowbit`` calls `install()`, which makes Hugging Face transformers load lowbit
checkpoints with lowbit's own modules (see `lowbit.integrations.transformers`). It costs nothing
measurable: transformers is not imported here. If transformers' quantizer table is already
imported, lowbit's quantizer is registered at once; otherwise it is registered right after that
table is first imported (by ``from_pretrained`` or anything else), so that a program that imports
lowbit and then calls ``AutoModelForCausalLM.from_pretrained(lowbit_checkpoint)`` needs nothing
more.
"""

import sys

# transformers' table of quantizers; ``from_pretrained`` looks a config's quant_method up there
QUANTIZER_TABLE = "transformers.quantizers.auto"


def _register_transformers() -> None:
    try:
        from lowbit.integrations.transformers import register
        register()
    except Exception as e:  # never break transformers' own import over lowbit's integration
        import warnings

        warnings.warn(f"lowbit could not register its transformers quantizer: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=2)


class _LoaderThenRegister:  # an importlib loader (exec_module protocol)
    """Runs the wrapped loader, then registers lowbit's quantizer in the module it executed."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # the module keeps its own loader: nothing of this wrapper outlives the import
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register_transformers()


class _AfterImport:  # an importlib meta path finder
    """Finds nothing itself: for QUANTIZER_TABLE it asks the finders after it and wraps the loader."""

    def find_spec(self, name, path, target=None):
        if name != QUANTIZER_TABLE:
            return None
        uninstall()  # one-shot; also keeps the lookups below from reaching this finder again
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderThenRegister(spec.loader)
                return spec
        return None


def uninstall() -> None:
    # a new list, not an in-place edit: the import system may be iterating over the old one
    sys.meta_path = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]


def install() -> None:
    """Register lowbit's transformers quantizer now if transformers' quantizer table is loaded,
    else as soon as it is."""
    if QUANTIZER_TABLE in sys.modules:
        _register_transformers()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


__all__ = ["install", "uninstall"]
