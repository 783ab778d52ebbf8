"""World models: learn latent dynamics from experience (``observe``, ``imagine``, ``loss``)."""

from worldmodels.behavior import (
    Actor,
    Critic,
    ReturnNormalizer,
    lambda_return,
    replay_lambda_return,
)
from worldmodels.cpc import CPCSpec, GreedyInfoMax, SequenceCPC, info_nce, mi_bound
from worldmodels.dreamer_wm import (
    LOSS_KEYS,
    REPRESENTATIONS,
    WorldModel,
    WorldModelSpec,
    preprocess_obs,
)
from worldmodels.layers import (
    BlockLinear,
    LayerFactory,
    NormalDist,
    OneHotDist,
    TwoHot,
    one_hot,
    symexp,
    symlog,
)
from worldmodels.networks import Decoder, Encoder, Head
from worldmodels.rssm import RSSM, RSSMConfig

__all__ = [
    "LOSS_KEYS",
    "REPRESENTATIONS",
    "RSSM",
    "Actor",
    "BlockLinear",
    "CPCSpec",
    "Critic",
    "Decoder",
    "Encoder",
    "GreedyInfoMax",
    "Head",
    "LayerFactory",
    "NormalDist",
    "OneHotDist",
    "RSSMConfig",
    "ReturnNormalizer",
    "SequenceCPC",
    "TwoHot",
    "WorldModel",
    "WorldModelSpec",
    "info_nce",
    "lambda_return",
    "replay_lambda_return",
    "mi_bound",
    "one_hot",
    "preprocess_obs",
    "symexp",
    "symlog",
]
