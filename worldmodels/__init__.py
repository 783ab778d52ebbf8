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
from imagine_rl.worldmodels.objectives import (
    ContrastiveObjective,
    GraphObjective,
    KLObjective,
    Objective,
    ObjectiveInputs,
    ReconstructionObjective,
    RewardContinueObjective,
    objectives_for,
)
from imagine_rl.worldmodels.planning import CEMPlanner, GoalCost, PlanCost, ReturnCost, cem
from imagine_rl.worldmodels.rssm import RSSM, RSSMConfig
from imagine_rl.worldmodels.slot_metrics import (
    hungarian_cost,
    matched_slot_distance,
    ranking_metrics,
    slot_distances,
    squared_slot_distances,
)
from imagine_rl.worldmodels.slots import SlotSpec, SlotWorldModel

__all__ = [
    "LOSS_KEYS",
    "REPRESENTATIONS",
    "RSSM",
    "Actor",
    "BlockLinear",
    "CEMPlanner",
    "ContrastiveObjective",
    "CPCSpec",
    "Critic",
    "Decoder",
    "Encoder",
    "GoalCost",
    "GraphObjective",
    "GreedyInfoMax",
    "Head",
    "KLObjective",
    "LayerFactory",
    "NormalDist",
    "Objective",
    "ObjectiveInputs",
    "OneHotDist",
    "PlanCost",
    "RSSMConfig",
    "ReconstructionObjective",
    "ReturnCost",
    "ReturnNormalizer",
    "RewardContinueObjective",
    "SequenceCPC",
    "SlotSpec",
    "SlotWorldModel",
    "TwoHot",
    "WorldModel",
    "WorldModelSpec",
    "cem",
    "hungarian_cost",
    "info_nce",
    "lambda_return",
    "replay_lambda_return",
    "matched_slot_distance",
    "mi_bound",
    "objectives_for",
    "one_hot",
    "preprocess_obs",
    "ranking_metrics",
    "slot_distances",
    "squared_slot_distances",
    "symexp",
    "symlog",
]
