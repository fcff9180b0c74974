"""Energy-based model on MNIST zeros: replay buffer, Langevin sampler, energy MLP, CD trainer.

Reference: Du & Mordatch, "Implicit Generation and Modeling with Energy-Based Models", NeurIPS 2019.
"""

from genmodels.ebm.buffer import ReplayBuffer
from genmodels.ebm.langevin import BufferSampler, langevin, sample_from_noise, sample_model
from genmodels.ebm.model import IMAGE_SHAPE, N_PIXELS, EnergyMLP, build_model, load_trained
from genmodels.ebm.trainer import (
    EBMDivergenceError,
    EBMTrainResult,
    RollbackEvent,
    cd_loss,
    images_to_float,
    train_ebm,
)

__all__ = [
    "IMAGE_SHAPE",
    "N_PIXELS",
    "BufferSampler",
    "EBMDivergenceError",
    "EBMTrainResult",
    "EnergyMLP",
    "ReplayBuffer",
    "RollbackEvent",
    "build_model",
    "cd_loss",
    "images_to_float",
    "langevin",
    "load_trained",
    "sample_from_noise",
    "sample_model",
    "train_ebm",
]
