"""Model definitions behind the zoo, written from scratch in plain torch."""

from fxshard.models.language import GPT2, GPT2Config, Llama, LlamaConfig
from fxshard.models.vision import MLP, Inception, InceptionConfig, MLPConfig, ResNet, ResNetConfig, UNet, UNetConfig

__all__ = ["GPT2", "GPT2Config", "Inception", "InceptionConfig", "Llama", "LlamaConfig", "MLP", "MLPConfig",
           "ResNet", "ResNetConfig", "UNet", "UNetConfig"]
