"""`sample`: draw N samples from a trained checkpoint (a user command, not a DVC stage).

    python stages/sample.py realnvp2d --n 10000 --out samples.csv
    python stages/sample.py ddpm --n 10000 --sampling-steps 50 --out ddpm_50.csv      # strided sampler
    python stages/sample.py ddpm --n 10000 --sampling-steps 2500 --out ddpm_full.csv  # the full chain
    python stages/sample.py flow --n 64 --temperature 0.8 --out tshirts.png           # or .pt (uint8 N x 28 x 28)
    python stages/sample.py ebm --n 64 --langevin-steps 512 --out zeros.png           # long-run Langevin from noise

2D models write CSV (`x,y` header, one point per row); image models write a PNG grid or a
`.pt` file with a uint8 tensor (N, 28, 28). The same seed gives the same samples on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

# This checkout's stages/ and genmodels/ come first, also in DVC's temp experiment copies.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _common import fail, run_stage, stage_main  # noqa: E402

from genmodels.training import atomic_save, atomic_write_text, make_generator, resolve_device  # noqa: E402

MODELS = ("realnvp2d", "ddpm", "flow", "ebm")


def _points_csv(points: torch.Tensor) -> str:
    rows = [f"{x!r},{y!r}" for x, y in points.double().tolist()]
    return "x,y\n" + "\n".join(rows) + "\n"


def _write_images(images: torch.Tensor, out: Path) -> None:
    """uint8 ``(N, H, W)`` -> a PNG grid or a ``.pt`` tensor."""
    if out.suffix == ".pt":
        atomic_save(images.contiguous(), out)
        return
    from PIL import Image

    from genmodels.flows.imageflow import image_grid

    grid = image_grid(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy(), mode="L").save(out, format="PNG")


@click.command()
@click.argument("model", type=click.Choice(MODELS))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="default: models/<model>/model.pt")
@click.option("--n", "n", type=click.IntRange(min=1), default=1000, show_default=True, help="number of samples")
@click.option("--out", type=click.Path(path_type=Path), required=True, help=".csv (2D) or .png / .pt (images)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--sampling-steps", type=click.IntRange(min=1), help="ddpm: steps of the sampler (= L: full chain; fewer: strided)")
@click.option("--eta", type=click.FloatRange(0.0, 1.0), help="ddpm strided sampler noise (1 ancestral-like, 0 deterministic DDIM)")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), help="ddpm: the network's precision while sampling (default: the checkpoint's ddpm.sampling_precision)")
@click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True, help="realnvp2d/flow: base noise scale")
@click.option("--langevin-steps", type=click.IntRange(min=1), help="ebm: Langevin steps from noise (default: ebm.sample_steps)")
@stage_main
def main(
    model: str,
    checkpoint: Path | None,
    n: int,
    out: Path,
    seed: int,
    device: str,
    sampling_steps: int | None,
    eta: float | None,
    precision: str | None,
    temperature: float,
    langevin_steps: int | None,
) -> None:
    """Draw N samples from a trained MODEL checkpoint into OUT."""
    two_d = model in ("realnvp2d", "ddpm")
    if two_d and out.suffix != ".csv":
        fail(f"--out {out}: a 2D model writes CSV; give a path ending in .csv")
    if not two_d and out.suffix not in (".png", ".pt"):
        fail(f"--out {out}: an image model writes a .png grid or a .pt tensor")
    if sampling_steps is not None and model != "ddpm":
        fail("--sampling-steps applies to ddpm only")
    if precision is not None and model != "ddpm":
        fail("--precision applies to ddpm only")
    if langevin_steps is not None and model != "ebm":
        fail("--langevin-steps applies to ebm only")
    dev = resolve_device(device)
    ckpt = checkpoint or Path("models") / model / "model.pt"
    gen = make_generator(seed, dev)
    t0 = time.perf_counter()
    if model == "realnvp2d":
        from genmodels.flows.realnvp2d import load_trained, sample

        flow, _ = load_trained(ckpt, dev)
        pts = sample(flow, n, seed=seed, temperature=temperature)
        atomic_write_text(_points_csv(pts.cpu()), out)
    elif model == "ddpm":
        from genmodels.diffusion.sampling import sample
        from genmodels.diffusion.train import load_trained

        ddpm, cfg = load_trained(ckpt, dev)
        steps = ddpm.n_steps if sampling_steps is None else sampling_steps
        if steps > ddpm.n_steps:
            fail(f"--sampling-steps {steps}: at most the model's L = {ddpm.n_steps}")
        with torch.no_grad():
            pts = sample(
                ddpm,
                n,
                generator=gen,
                sampling_steps=steps,
                eta=float(cfg.get("sampling_eta", 1.0)) if eta is None else eta,
                precision=precision or str(cfg.get("sampling_precision", "auto")),
            )
        atomic_write_text(_points_csv(pts.cpu()), out)
    elif model == "flow":
        from genmodels.flows.imageflow import load_trained

        flow, _ = load_trained(ckpt, dev)
        images = flow.sample_images(n, generator=gen, temperature=temperature)
        _write_images(images.cpu(), out)
    else:
        from genmodels.ebm.langevin import sample_model
        from genmodels.ebm.model import load_trained

        energy, cfg = load_trained(ckpt, dev)
        x = sample_model(energy, cfg, n, generator=gen, device=dev, n_steps=langevin_steps)
        images = (x.reshape(n, 28, 28).clamp(0, 1) * 255).round().to(torch.uint8)
        _write_images(images.cpu(), out)
    click.echo(f"sample: {n} samples from {ckpt} -> {out} in {time.perf_counter() - t0:.2f} s", err=True)


if __name__ == "__main__":
    run_stage(main)
