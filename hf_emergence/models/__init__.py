"""Models hf_emergence ships as transformers classes, registered with transformers' Auto classes (as timm registers its
models), so that after ``import hf_emergence``:

    AutoConfig.for_model("cifar_resnet", layout="resnet20")
    AutoModelForImageClassification.from_config(config) / .from_pretrained(<a saved cifar_resnet folder>)

work like any built-in type. ``import hf_emergence`` stays as light as before (it does not import transformers):

* the config is registered with ``AutoConfig`` as soon as transformers' ``configuration_auto`` module is loaded (at
  once if it already is; otherwise by a one-shot import hook that runs right after that module executes);
* the model classes, whose import pulls in ``transformers.modeling_utils``, are registered when the first
  ``CifarResNetConfig`` is created, which any Auto-class build or load does before it looks a model class up.

``from hf_emergence.models import CifarResNetForImageClassification`` imports the class on first access.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

_AUTO_CONFIG = "transformers.models.auto.configuration_auto"
_CONFIG_EXPORTS = ("LAYOUTS", "CifarResNetConfig")
_MODEL_EXPORTS = ("CifarResNetForImageClassification", "CifarResNetModel", "CifarResNetPreTrainedModel")
__all__ = [*_CONFIG_EXPORTS, *_MODEL_EXPORTS, "register_config", "register_models"]
_done = {"config": False, "models": False}


def __getattr__(name: str) -> Any:
    if name in _CONFIG_EXPORTS:
        return getattr(importlib.import_module(".configuration_cifar_resnet", __name__), name)
    if name in _MODEL_EXPORTS:
        return getattr(importlib.import_module(".modeling_cifar_resnet", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_config() -> None:
    """``AutoConfig.register("cifar_resnet", CifarResNetConfig)``, once."""
    if _done["config"]:
        return
    _done["config"] = True
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .configuration_cifar_resnet import CifarResNetConfig

    if CifarResNetConfig.model_type not in CONFIG_MAPPING:
        CONFIG_MAPPING.register(CifarResNetConfig.model_type, CifarResNetConfig)


def register_models() -> None:
    """The config, then the model classes with ``AutoModel`` and ``AutoModelForImageClassification``, once."""
    register_config()
    if _done["models"]:
        return
    _done["models"] = True
    from transformers import AutoModel, AutoModelForImageClassification

    from .configuration_cifar_resnet import CifarResNetConfig
    from .modeling_cifar_resnet import CifarResNetForImageClassification, CifarResNetModel

    for auto, cls in ((AutoModel, CifarResNetModel), (AutoModelForImageClassification, CifarResNetForImageClassification)):
        auto.register(CifarResNetConfig, cls, exist_ok=True)


class _RunAfter(importlib.abc.Loader):
    """Wraps a module's loader: executes the module, then ``callback``."""

    def __init__(self, loader: importlib.abc.Loader, callback: Any) -> None:
        self.loader, self.callback = loader, callback

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        try:
            self.callback()
        except Exception as err:  # noqa: BLE001 - never break the import of transformers itself
            from .._warnings import warn

            warn(f"hf_emergence could not register its models with transformers ({type(err).__name__}: {err}); "
                 "call hf_emergence.models.register_models() to see why")


class _AfterImport(importlib.abc.MetaPathFinder):
    """One-shot hook: when ``name`` is imported, run ``callback`` right after it executes, then step aside."""

    def __init__(self, name: str, callback: Any) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)          # the ordinary finders
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfter(spec.loader, self.callback)
        return spec


def _install() -> None:
    if _AUTO_CONFIG in sys.modules:
        register_config()
    elif not any(isinstance(f, _AfterImport) and f.name == _AUTO_CONFIG for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_AUTO_CONFIG, register_config))


_install()
