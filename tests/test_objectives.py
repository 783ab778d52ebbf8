"""World-model objectives as parts (``worldmodels.objectives``): each alone on tiny tensors
against a hand computation, the set chosen per representation, and that they leave the world
model's module tree alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imagine_rl.worldmodels import (
    ContrastiveObjective,
    CPCSpec,
    GraphObjective,
    Head,
    KLObjective,
    LayerFactory,
    ObjectiveInputs,
    ReconstructionObjective,
    RewardContinueObjective,
    RSSMConfig,
    SequenceCPC,
    TwoHot,
    WorldModel,
    WorldModelSpec,
    objectives_for,
    symlog,
)
from imagine_rl.worldmodels.factored import FactoredSpec

torch.set_num_threads(1)

OBS = {"state": (3,)}
ACTION_DIM = 2


def tiny_spec(representation: str = "reconstruction", groups: int = 0) -> WorldModelSpec:
    rssm = dict(deter=16, hidden=16, stoch=4, classes=4, blocks=2)
    if groups:
        rssm["factored"] = FactoredSpec(groups=groups, graph="l1")
    return WorldModelSpec(
        rssm=RSSMConfig(**rssm),
        units=16,
        mlp_layers=1,
        head_layers=1,
        cnn_depth=4,
        representation=representation,
        cpc=CPCSpec(horizons=2, dim=8),
    )


def make_batch(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "state": torch.randn(B, T, 3, generator=g),
        "action": torch.rand(B, T, ACTION_DIM, generator=g) * 2 - 1,
        "reward": torch.randn(B, T, generator=g),
        "is_first": torch.zeros(B, T),
        "is_terminal": torch.zeros(B, T),
    }
    batch["is_first"][:, 0] = 1
    batch["is_terminal"][0, -1] = 1
    return batch


class FixedDecoder(nn.Module):
    """Returns fixed reconstructions whatever the features (one vector and one image key)."""

    vector_keys = ["vec"]
    image_keys = ["img"]

    def __init__(self, recon):
        super().__init__()
        self.recon = recon

    def forward(self, feat):
        return self.recon


def test_reconstruction_by_hand():
    g = torch.Generator().manual_seed(1)
    B, T = 2, 3
    recon = {
        "vec": torch.randn(B, T, 4, generator=g),
        "img": torch.randn(B, T, 1, 2, 2, generator=g),
    }
    batch = {
        "vec": torch.randn(B, T, 4, generator=g) * 5,
        "img": torch.rand(B, T, 1, 2, 2, generator=g),
    }
    losses, metrics = ReconstructionObjective(FixedDecoder(recon))(torch.zeros(B, T, 6), batch)
    assert set(losses) == {"loss/reconstruction"}
    vec = torch.zeros(B, T)
    img = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            vec[b, t] = sum(
                (recon["vec"][b, t, d] - symlog(batch["vec"][b, t, d])) ** 2 for d in range(4)
            )
            img[b, t] = ((recon["img"][b, t] - batch["img"][b, t]) ** 2).sum()
    torch.testing.assert_close(losses["loss/reconstruction"], (vec + img).mean())
    torch.testing.assert_close(metrics["world_model/recon_vec"], vec.mean())
    torch.testing.assert_close(metrics["world_model/recon_img"], img.mean())


def test_contrastive_matches_sequence_cpc():
    torch.manual_seed(0)
    cpc = SequenceCPC(6, 5, ACTION_DIM, CPCSpec(horizons=2, dim=8), LayerFactory(), "cpc_")
    batch = make_batch()
    feat, embed = torch.randn(2, 5, 6), torch.randn(2, 5, 5)
    losses, metrics = ContrastiveObjective(cpc)(feat, embed, batch["action"], batch["is_first"])
    loss, raw = cpc(feat, embed, batch["action"], batch["is_first"])
    assert set(losses) == {"loss/cpc"}
    torch.testing.assert_close(losses["loss/cpc"], loss)
    assert metrics == {f"world_model/{k}": v for k, v in raw.items()}
    assert "world_model/cpc_mi_bound" in metrics


def kl_inputs():
    wm = WorldModel(OBS, ACTION_DIM, tiny_spec())
    batch = make_batch()
    with torch.no_grad():
        post, prior = wm.observe(batch)
    leaf = lambda s: {k: v.detach().clone().requires_grad_(True) for k, v in s.items()}  # noqa: E731
    return wm.rssm, leaf(post), leaf(prior)


def test_kl_free_bits_and_stop_gradients():
    rssm, post, prior = kl_inputs()
    stats = [k for k in post if k not in ("deter", "stoch")]
    assert stats
    kl = rssm.kl({k: post[k] for k in stats}, {k: prior[k] for k in stats}).detach()
    free = float(kl.median())
    losses, metrics = KLObjective(rssm, free)(post, prior)
    assert set(losses) == {"loss/dynamics", "loss/representation"}
    # Both terms have the value KL(post || prior), clamped below at free_nats per step.
    torch.testing.assert_close(losses["loss/dynamics"], kl.clamp(min=free).mean())
    torch.testing.assert_close(losses["loss/representation"], kl.clamp(min=free).mean())
    torch.testing.assert_close(metrics["world_model/kl"], kl.mean())
    # Dynamics trains the prior only; representation the posterior only.
    for k in stats:
        gp, gq = torch.autograd.grad(
            losses["loss/dynamics"], [post[k], prior[k]], allow_unused=True, retain_graph=True
        )
        assert gp is None and gq is not None and gq.abs().sum() > 0
        gp, gq = torch.autograd.grad(
            losses["loss/representation"], [post[k], prior[k]], allow_unused=True, retain_graph=True
        )
        assert gq is None and gp is not None and gp.abs().sum() > 0


def test_kl_below_free_bits_sends_no_gradient():
    rssm, post, prior = kl_inputs()
    losses, _ = KLObjective(rssm, 1e6)(post, prior)
    torch.testing.assert_close(losses["loss/dynamics"], torch.tensor(1e6))
    stats = [k for k in post if k not in ("deter", "stoch")]
    grads = torch.autograd.grad(losses["loss/dynamics"], [prior[k] for k in stats])
    assert all(g.abs().sum() == 0 for g in grads)


def test_reward_continue_by_hand_and_learns():
    torch.manual_seed(0)
    f = LayerFactory()
    reward_head = Head(6, 15, 16, 1, f, "reward")
    continue_head = Head(6, 1, 16, 1, f, "continue")
    twohot = TwoHot(15)
    objective = RewardContinueObjective(reward_head, continue_head, twohot)
    feat = torch.randn(2, 4, 6)
    reward = torch.tensor([[0.0, 1.0, -2.0, 3.0], [0.5, 0.0, 10.0, -1.0]])
    terminal = torch.zeros(2, 4)
    terminal[1, -1] = 1
    losses, metrics = objective(feat, reward, terminal)
    assert set(losses) == {"loss/reward", "loss/continue"}
    logits = reward_head(feat)
    torch.testing.assert_close(losses["loss/reward"], -twohot.log_prob(logits, reward).mean())
    cont = continue_head(feat).squeeze(-1)
    torch.testing.assert_close(
        losses["loss/continue"], F.binary_cross_entropy_with_logits(cont, 1 - terminal)
    )
    torch.testing.assert_close(
        metrics["world_model/reward_error"], (twohot.decode(logits) - reward).abs().mean()
    )
    # A few SGD steps on a fixed target: finite and decreasing.
    opt = torch.optim.SGD([*reward_head.parameters(), *continue_head.parameters()], lr=0.1)
    first = None
    for _ in range(20):
        losses, _ = objective(feat, reward, terminal)
        total = losses["loss/reward"] + losses["loss/continue"]
        assert torch.isfinite(total)
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) < first


@pytest.mark.parametrize(
    "representation, groups, expected",
    [
        ("reconstruction", 0, [ReconstructionObjective, RewardContinueObjective, KLObjective]),
        (
            "reconstruction+cpc",
            0,
            [ReconstructionObjective, ContrastiveObjective, RewardContinueObjective, KLObjective],
        ),
        ("cpc", 0, [ContrastiveObjective, RewardContinueObjective, KLObjective]),
        (
            "reconstruction",
            4,
            [ReconstructionObjective, RewardContinueObjective, GraphObjective, KLObjective],
        ),
    ],
)
def test_objectives_per_representation(representation, groups, expected):
    torch.manual_seed(0)
    wm = WorldModel(OBS, ACTION_DIM, tiny_spec(representation, groups))
    objectives = wm.objectives()
    assert [type(o) for o in objectives] == expected
    # The world model's losses are the union of its objectives' keys, in their order.
    losses, _ = wm.loss(make_batch())
    keys = [k for o in objectives for k in o.keys]
    assert list(losses) == keys
    # Objectives register nothing: the module tree is the modules the model builds.
    assert not any("objective" in name for name, _ in wm.named_modules())
    assert "objectives" not in dict(wm.named_children())


def test_objectives_for_needs_its_modules():
    wm = WorldModel(OBS, ACTION_DIM, tiny_spec())
    common = dict(
        rssm=wm.rssm,
        reward_head=wm.reward_head,
        continue_head=wm.continue_head,
        twohot=wm.twohot,
        free_nats=1.0,
    )
    with pytest.raises(ValueError, match="decoder"):
        objectives_for("reconstruction", **common)
    with pytest.raises(ValueError, match="SequenceCPC"):
        objectives_for("cpc", **common)


def test_loop_equals_parts():
    torch.manual_seed(0)
    wm = WorldModel(OBS, ACTION_DIM, tiny_spec("reconstruction+cpc"))
    batch = make_batch()
    torch.manual_seed(1)
    losses, metrics = wm.loss(batch)
    torch.manual_seed(1)
    embed = wm.encode(batch)
    post, prior = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    step = ObjectiveInputs(batch, post, prior, wm.feat(post), embed)
    parts, part_metrics = {}, {}
    for objective in wm.objectives():
        loss, metric = objective.apply(step)
        parts.update(loss)
        part_metrics.update(metric)
    assert list(parts) == list(losses)
    for k in losses:
        torch.testing.assert_close(parts[k], losses[k])
    assert set(part_metrics) == set(metrics)
