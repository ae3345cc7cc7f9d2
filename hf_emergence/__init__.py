"""hf_emergence: emergence-promoting initialisation (Li, George & Silva, arXiv 2407.19044) for Hugging Face models.

    from hf_emergence import EmergenceInit, from_config
    plan = EmergenceInit(alpha=1.2).apply(model)                       # any nn.Module
    model = from_config(AutoModelForSeq2SeqLM, config, alpha=1.2)      # inside transformers' construction
"""

__version__ = "0.1.0"

from . import models  # registers cifar_resnet with transformers' Auto classes
from .architectures import discover, get_architecture, list_architectures, register_architecture, unregister_architecture
from .emergence_init import EmergenceInit
from .record import AlreadyAppliedError, already_applied
from .layout import Block, Chain, Layout, Member
from .measure import ActivationProfile, EmergenceScore, SuggestedAlpha, activation_profile, emergence, suggest_alpha
from .modeling import EmergenceInitMixin, from_config, resolve_model_class
from .plan import EmergencePlan, PlanEntry, PlanError
from .schedule import exponents, scale_factor

__all__ = [
    "ActivationProfile", "AlreadyAppliedError", "Block", "Chain", "EmergenceScore", "SuggestedAlpha", "activation_profile", "emergence", "suggest_alpha", "EmergenceInit", "EmergenceInitMixin", "EmergencePlan", "Layout", "Member",
    "PlanEntry", "PlanError", "already_applied", "discover", "exponents", "from_config", "get_architecture",
    "list_architectures", "register_architecture", "resolve_model_class", "scale_factor", "unregister_architecture",
]
