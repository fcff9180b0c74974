"""genmodels: four generative models from first principles (EBM, image flow, RealNVP 2D, DDPM 2D).

The library holds data handling, models, training loops and metrics. It never imports
mlflow, click or yaml: the stage scripts in ``stages/`` parse, log and write.
"""

__version__ = "0.1.0"
