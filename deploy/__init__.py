"""Edge deployment and compression pipeline for compact CNNs.

    import deploy
    result = deploy.build(net, calib=loader, val=val_loader, int8=True)   # or a name, a recipe, an ONNX file
"""

__version__ = "0.1.0"

__all__ = ["build", "load_recipe", "Recipe", "Predictor", "BuildResult", "Dataset"]

# Imported on first use, so that `import deploy` and `deploy --help` stay fast (torch loads only when needed).
_EXPORTS = {"build": "api", "load_recipe": "api", "BuildResult": "api", "Recipe": "recipe",
            "Predictor": "serving.predictor", "Dataset": "sources"}  # fmt: skip


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deploy' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"deploy.{_EXPORTS[name]}"), name)
