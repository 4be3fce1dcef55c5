"""cultureclip: teach open_clip models to tell culturally different look-alike concepts apart.

``CultureCLIP`` (the encoder) and ``CultureCLIPLoss`` are imported lazily so that light modules
such as :mod:`cultureclip.schema` can be used in data workers without loading the model stack.
"""
__version__ = "0.1.0"

__all__ = ["CultureCLIP", "CultureCLIPLoss", "__version__"]


def __getattr__(name):
    if name == "CultureCLIP":
        from cultureclip.model import CultureCLIP
        return CultureCLIP
    if name == "CultureCLIPLoss":
        from cultureclip.loss import CultureCLIPLoss
        return CultureCLIPLoss
    if name == "zeroshot":
        import importlib
        return importlib.import_module("cultureclip.zeroshot")
    raise AttributeError(f"module 'cultureclip' has no attribute {name!r}")
