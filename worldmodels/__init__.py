"""World models: learn latent dynamics from experience (``observe``, ``imagine``, ``loss``)."""

from imagine_rl.worldmodels.behavior import (
    Actor,
    Critic,
    ReturnNormalizer,
    lambda_return,
    replay_lambda_return,
)
from imagine_rl.worldmodels.cpc import CPCSpec, GreedyInfoMax, SequenceCPC, info_nce, mi_bound
from imagine_rl.worldmodels.dreamer_wm import (
    LOSS_KEYS,
    REPRESENTATIONS,
    WorldModel,
    WorldModelSpec,
    preprocess_obs,
)
from imagine_rl.worldmodels.layers import (
    BlockLinear,
    LayerFactory,
    NormalDist,
    OneHotDist,
    TwoHot,
    one_hot,
    symexp,
    symlog,
)
from imagine_rl.worldmodels.networks import Decoder, Encoder, Head
from imagine_rl.worldmodels.rssm import RSSM, RSSMConfig

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
