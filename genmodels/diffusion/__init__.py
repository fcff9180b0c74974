"""DDPM on 2D points (seeds/001): noise schedule, network, ELBO, samplers, trainer.

Reference: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
"""

from genmodels.diffusion.elbo import elbo_estimate, nll_bound, prior_kl, weighted_mse
from genmodels.diffusion.model import DDPM, PARAMETERIZATIONS, DenoiserMLP, build_model, reset_parameters
from genmodels.diffusion.sampling import (
    PRECISIONS,
    ancestral_coefficients,
    sample,
    sample_ancestral,
    sample_strided,
    sampling_dtype,
    strided_steps,
)
from genmodels.diffusion.schedule import NoiseSchedule
from genmodels.diffusion.train import TrainResult, config_dict, load_trained, save_trained, train_ddpm

__all__ = [
    "DDPM",
    "PARAMETERIZATIONS",
    "DenoiserMLP",
    "NoiseSchedule",
    "PRECISIONS",
    "TrainResult",
    "ancestral_coefficients",
    "build_model",
    "config_dict",
    "elbo_estimate",
    "load_trained",
    "nll_bound",
    "prior_kl",
    "reset_parameters",
    "sample",
    "sample_ancestral",
    "sample_strided",
    "sampling_dtype",
    "save_trained",
    "strided_steps",
    "train_ddpm",
    "weighted_mse",
]
