"""World models: learn latent dynamics from experience (``observe``, ``imagine``, ``loss``)."""

from worldmodels.behavior import Actor, Critic, ReturnNormalizer, lambda_return
from worldmodels.dreamer_wm import LOSS_KEYS, WorldModel, WorldModelSpec, preprocess_obs
from worldmodels.layers import (
    BlockLinear,
    LayerFactory,
    NormalDist,
    OneHotDist,
    TwoHot,
    symexp,
    symlog,
)
from worldmodels.networks import Decoder, Encoder, Head
from worldmodels.rssm import RSSM, RSSMConfig

__all__ = [
    "LOSS_KEYS",
    "RSSM",
    "Actor",
    "BlockLinear",
    "Critic",
    "Decoder",
    "Encoder",
    "Head",
    "LayerFactory",
    "NormalDist",
    "OneHotDist",
    "RSSMConfig",
    "ReturnNormalizer",
    "TwoHot",
    "WorldModel",
    "WorldModelSpec",
    "lambda_return",
    "preprocess_obs",
    "symexp",
    "symlog",
]
