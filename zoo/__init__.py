"""zoo: hierarchical vision transformers from the literature, one grammar, registered with timm.

``import zoo`` registers every config in configs/models/ with timm as ``zoo_<name>``.
"""
from zoo.errors import CheckpointError, ConfigError
from zoo.config import ModelConfig, load_config
from zoo.backbone import Backbone
from zoo.registration import create_model, list_models, register_all

register_all()

from zoo.hub import push_to_hub, save_pretrained  # noqa: E402  (needs the registered models)

__all__ = ["Backbone", "CheckpointError", "ConfigError", "ModelConfig", "create_model", "list_models",
           "load_config", "push_to_hub", "save_pretrained"]
__version__ = "0.1.0"
