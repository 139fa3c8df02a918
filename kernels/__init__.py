"""Triton kernels for CUDA tensors, one file per op (kernels and their launchers; the registered ops
and the torch reference are in prefrank/ops). Installed as `prefrank.kernels`; only
`prefrank.ops.backends` calls them."""
if __name__ == "kernels":
    # Imported as the top-level `kernels`: Python runs from the repository root (`python -m pytest`,
    # `python -m prefrank`), which puts this folder on sys.path where it shadows Hugging Face's
    # `kernels` package, a dependency transformers (>= 5.25) imports. Hand the name over to that
    # package, found on sys.path without the repository root.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (Hugging Face's; this folder is prefrank.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
