"""What the layer does to a photograph: input, output and T^-beta side by side."""

from pathlib import Path

import torch

import torch_spatialnorm as sn

SETTINGS = dict(alpha=1.0, beta=0.5, delta=1e-2)


def load_photograph() -> torch.Tensor:
    """scikit-learn's sample photograph, (3, H, W) in [0, 1], halved in size."""
    from sklearn.datasets import load_sample_image

    image = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float() / 255.0
    return torch.nn.functional.avg_pool2d(image, 2)


def normalize(image: torch.Tensor, kernel_size: int, device) -> dict:
    """Each colour channel, centred, normalized over kernel_size x kernel_size windows."""
    x = (image - image.mean(dim=(1, 2), keepdim=True)).to(device)
    y = sn.spatial_normalization(x, kernel_size, **SETTINGS)
    window = kernel_size * kernel_size
    t = SETTINGS["delta"] + SETTINGS["alpha"] / window * sn.reference.window_sum(x * x, kernel_size, kernel_size)
    return {"input": image, "output": y.cpu(), "T^-beta": t.pow(-SETTINGS["beta"]).cpu()}


def _displayable(t: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) in [0, 1], stretched between the 1st and 99th percentiles."""
    low, high = torch.quantile(t.flatten()[:: max(1, t.numel() // 100_000)], torch.tensor([0.01, 0.99]))
    return ((t - low) / (high - low)).clamp(0, 1).permute(1, 2, 0)


def draw(kernel_sizes, device, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = load_photograph()
    fig, axes = plt.subplots(len(kernel_sizes), 3, figsize=(13, 3.4 * len(kernel_sizes)), squeeze=False)
    for row, k in enumerate(kernel_sizes):
        for column, (name, picture) in enumerate(normalize(image, k, device).items()):
            axes[row][column].imshow(_displayable(picture))
            axes[row][column].set_title(f"{name}, {k}x{k} window" if column else name)
            axes[row][column].axis("off")
    fig.suptitle(
        "SpatialNormalization of each colour channel (alpha={alpha}, beta={beta}, delta={delta})".format(**SETTINGS)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
