"""A small CNN on scikit-learn's handwritten digits, with and without SpatialNormalization.

Runs in one process, or data-parallel under ``torchrun`` (DistributedDataParallel: gloo on the
CPU, NCCL on CUDA), where every rank ends with the same weights.
"""

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torch_spatialnorm as sn


def digits(seed: int = 0):
    """(train, test) datasets of 8x8 digit images, standardized, 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float().unsqueeze(1)
    images = (images - images.mean()) / images.std()
    labels = torch.from_numpy(data.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def cnn(normalized: bool) -> nn.Sequential:
    def norm():
        return sn.SpatialNormalization(3, alpha=1.0, beta=0.75, delta=1.0) if normalized else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def accuracy(model, dataset, device) -> float:
    model.eval()
    with torch.no_grad():
        images, labels = (t.to(device) for t in dataset.tensors)
        correct = (model(images).argmax(dim=1) == labels).sum().item()
    model.train()
    return correct / len(labels)


class Distributed:
    """The process group, when launched by torchrun; a no-op otherwise."""

    def __init__(self, device: torch.device):
        self.enabled = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.device = device
        if self.enabled:
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self):
        if self.enabled:
            dist.destroy_process_group()


def train(normalized: bool, epochs: int, distributed: Distributed, batch_size: int = 64, seed: int = 0):
    """Trains one CNN; returns (model, test accuracy, seconds)."""
    from tqdm import tqdm

    train_set, test_set = digits(seed)
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = cnn(normalized).to(distributed.device)
    if distributed.enabled:
        model = nn.parallel.DistributedDataParallel(model)
    sampler = DistributedSampler(train_set, seed=seed) if distributed.enabled else None
    loader = DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, shuffle=sampler is None,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    name = "with SpatialNormalization" if normalized else "without"
    start = time.perf_counter()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = tqdm(loader, desc=f"{name:>26} epoch {epoch + 1}/{epochs}", disable=not distributed.is_main, leave=False)
        for images, labels in batches:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images.to(distributed.device)), labels.to(distributed.device))
            loss.backward()
            optimizer.step()
            batches.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    plain = model.module if distributed.enabled else model
    return plain, accuracy(plain, test_set, distributed.device), seconds
