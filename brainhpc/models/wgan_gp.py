"""WGAN-GP (Gulrajani et al. 2017): the DCGAN generator family against a batch-norm-free critic.

Critic loss = E[D(fake)] - E[D(real)] + ``gp_weight`` x E[(||grad D(x_hat)||_2 - 1)^2] on random
interpolates x_hat, plus ``drift`` x E[D(real)^2] (Karras et al. 2018) to keep scores near zero.
The critic is updated on every batch (a training step = one critic step) and the generator on
every ``n_critic``-th step, with Adam(lr 1e-4, betas 0.0/0.9) as in the paper. DiffAugment, EMA
and mirroring are the same options as DCGAN's (see ``brainhpc.models.dcgan``).

Real and fake go through the critic in one forward (bf16 when the run is); the penalty is
computed in fp32 in a second forward of the interpolates through the bare critic (the gradient
norm is compared with 1, and bf16's 8-bit mantissa would blur it): the gradient with respect to
the interpolates only (``autograd.grad`` on inputs), so the one ``backward`` of the total loss is
what DDP all-reduces. On generator steps the generator runs once, with its graph, and its output
feeds both the critic and the generator update.

``spectral_norm`` is off by default here (on for DCGAN): the penalty already pulls the critic's
gradient norm to 1, and spectral normalisation on top caps every layer at 1 as well, so the
product of the layers' norms has to sit at its bound for the penalty to be met: a doubly
constrained, weaker critic (the combination is unusual in the literature). ``lr_schedule``
applies to both optimisers as in DCGAN; a training step is one critic step, so the schedule
runs over critic steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brainhpc.errors import BrainhpcError
from brainhpc.models import dcgan
from brainhpc.models.dcgan import GANTask, diff_augment


@dataclass
class Config(dcgan.Config):
    lr: float = 1e-4
    epochs: int = 400  # critic steps are n_critic times the generator steps
    n_critic: int = 5
    gp_weight: float = 10.0
    drift: float = 1e-3
    spectral_norm: bool = False  # the gradient penalty already bounds the critic's slope

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.n_critic, int) or self.n_critic < 1:
            raise BrainhpcError(f"option n_critic must be an integer >= 1, got {self.n_critic!r}")
        if self.gp_weight < 0 or self.drift < 0:
            raise BrainhpcError(f"options gp_weight and drift must be >= 0, got {self.gp_weight}, "
                                f"{self.drift}")


class Task(GANTask):
    arch = "wgan-gp"
    betas = (0.0, 0.9)

    def generator_loss(self, score):
        return -score.mean()

    def training_step(self, t, batch):
        self.schedule_lr(t)
        real = self.real(batch)
        n = len(real)
        aug = self.cfg.augments
        g_turn = (t.step + 1) % self.cfg.n_critic == 0
        with torch.set_grad_enabled(g_turn), t.autocast():
            fake = t.models["generator"](self.noise(n, t.device))
        real_a, fake_a = diff_augment(real, aug), diff_augment(fake.detach().float(), aug)
        with t.autocast():
            score = t.models["critic"](torch.cat([real_a, fake_a])).float()
        d_real, d_fake = score[:n], score[n:]
        eps = torch.rand(n, 1, 1, 1, device=t.device)
        mix = (eps * real_a + (1 - eps) * fake_a).requires_grad_(True)
        d_mix = t.raw("critic")(mix)  # fp32, see the module docstring
        grad, = torch.autograd.grad(d_mix.sum(), mix, create_graph=True)
        gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        wdist = d_real.mean() - d_fake.mean()
        d_loss = -wdist + self.cfg.gp_weight * gp + self.cfg.drift * (d_real ** 2).mean()
        opt = t.optimizers["critic"]
        opt.zero_grad(set_to_none=True)
        d_loss.backward()
        opt.step()
        out = {"d_loss": d_loss.detach(), "wdist": wdist.detach(), "gp": gp.detach()}
        if g_turn:
            self.last_g = self.generator_step(t, fake)
        out["g_loss"] = getattr(self, "last_g", torch.zeros((), device=t.device))
        return out

    def state_dict(self):
        return {"last_g": getattr(self, "last_g", torch.zeros(())).detach().cpu()}

    def load_state_dict(self, state):
        if "last_g" in state:
            self.last_g = state["last_g"]
