"""axolotl-ila: learned layer importance (ILA) for Axolotl fine-tuning.

``axolotl_ila.ILAPlugin`` is imported lazily, so that the ranking tools and the
CLI do not pay for importing axolotl.
"""

__version__ = "0.1.0"
__all__ = ["ILAPlugin", "__version__"]


def __getattr__(name: str):
    if name == "ILAPlugin":
        from axolotl_ila.plugin import ILAPlugin

        return ILAPlugin
    raise AttributeError(f"module 'axolotl_ila' has no attribute {name!r}")
