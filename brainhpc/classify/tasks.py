"""What the trainer trains in a classify cell: BrainCNN with (weighted) cross-entropy, or a VAE
on healthy slices; each validates on the real validation split after its epochs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from brainhpc.anomaly.techniques import best_cut
from brainhpc.data.shards import ShardData
from brainhpc.models.classifiers import BrainCNN, build_classifier, vae_loss, vae_terms
from brainhpc.predictors.classifier import EVAL_BATCH, cnn_scores
from brainhpc.train.augment import augment_batch


def vae_hparams(cfg) -> dict:
    """What rebuilds the VAE (stored in model.pt)."""
    return {"vae_arch": cfg.vae_arch, "latent_dim": cfg.latent_dim,
            "latent_channels": cfg.latent_channels}


class CNNTask:
    """BrainCNN with (optionally weighted) cross-entropy; validation = criterion at the best
    validation cut of P(tumour), so best.pt is the epoch whose tuned rule is best on val."""

    def __init__(self, cfg, size: int, weights: np.ndarray | None, val: ShardData):
        self.cfg, self.size, self.val = cfg, size, val
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self._weights_on: torch.Tensor | None = None  # the weights on the training device

    def models(self):
        return {"cnn": BrainCNN(self.size, dropout=self.cfg.dropout)}

    def optimizers(self, models):
        return {"cnn": torch.optim.Adam(models["cnn"].parameters(), lr=self.cfg.lr)}

    def training_step(self, t, batch):
        images, labels = batch
        x = images.float().div_(255.0)
        if self.cfg.augment:
            x = augment_batch(x, shift=True)
        with t.autocast():
            logits = t.models["cnn"](x)
        loss = F.cross_entropy(logits.float(), labels, weight=self._class_weights(logits.device))
        opt = t.optimizers["cnn"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss.detach(), "acc": acc.detach()}

    def _class_weights(self, device: torch.device) -> torch.Tensor | None:
        """The class weights on ``device``, copied there once (not at every step)."""
        if self.weights is None:
            return None
        if self._weights_on is None or self._weights_on.device != device:
            self._weights_on = self.weights.to(device)
        return self._weights_on

    def validate(self, t) -> dict:
        s = cnn_scores(t.raw("cnn"), self.val.images, t.device)
        y = self.val.labels
        _, value = best_cut(s, y, self.cfg.criterion)
        p = np.clip(s, 1e-7, 1 - 1e-7)
        loss = float(-np.mean(np.where(y == 1, np.log(p), np.log(1 - p))))
        return {f"val_{self.cfg.criterion}": value, "val_loss": loss}


class VAETask:
    """A VAE on (standardised) healthy images; validation = the same loss on healthy validation
    images. Batches are float images already in [0, 1] (see ``Detector.inputs``)."""

    def __init__(self, cfg, size: int, val_inputs: np.ndarray):
        self.cfg, self.size, self.val = cfg, size, val_inputs

    def models(self):
        return {"vae": build_classifier("vae", self.size, vae_hparams(self.cfg))}

    def optimizers(self, models):
        return {"vae": torch.optim.Adam(models["vae"].parameters(), lr=self.cfg.lr)}

    def training_step(self, t, batch):
        x = batch[0].float()
        if self.cfg.augment:
            x = augment_batch(x, shift=False)
        with t.autocast():
            x_hat, mu, logvar = t.models["vae"](x)
        loss, recon, kl = vae_terms(x_hat, x, mu.float(), logvar.float(), self.cfg.kl_weight)
        opt = t.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "recon": recon, "kl": kl}

    def validate(self, t) -> dict:
        model, total, n = t.raw("vae"), 0.0, len(self.val)
        for i in range(0, n, EVAL_BATCH):
            x = torch.from_numpy(self.val[i:i + EVAL_BATCH]).to(t.device)
            x_hat, mu, logvar = model(x)
            loss, _ = vae_loss(x_hat, x, mu, logvar, self.cfg.kl_weight)
            total += float(loss) * len(x)
        return {"val_loss": total / max(n, 1)}
