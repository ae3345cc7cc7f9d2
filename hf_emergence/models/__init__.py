"""Models hf_emergence ships as transformers classes, registered with the Auto classes on import (as timm does).

``import hf_emergence`` makes ``AutoConfig.for_model("cifar_resnet")``, ``AutoModelForImageClassification.from_config``
and ``.from_pretrained(<a saved cifar_resnet folder>)`` work; without that import transformers does not know the type.
"""

from __future__ import annotations

from .cifar_resnet import (LAYOUTS, CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel,
                           CifarResNetPreTrainedModel)


def register_models() -> None:
    """Register every model here with ``AutoConfig``/``AutoModel``/``AutoModelForImageClassification`` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if CifarResNetConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig)
    for auto, cls in ((AutoModel, CifarResNetModel), (AutoModelForImageClassification, CifarResNetForImageClassification)):
        if CifarResNetConfig not in auto._model_mapping:
            auto.register(CifarResNetConfig, cls)


register_models()

__all__ = ["LAYOUTS", "CifarResNetConfig", "CifarResNetForImageClassification", "CifarResNetModel",
           "CifarResNetPreTrainedModel", "register_models"]
