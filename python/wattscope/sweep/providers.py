"""Where the sweep's models come from: timm on a GPU host, a tiny provider of small torch modules for tests.

timm stays behind this interface because it cannot even be imported on the CI machines (torchvision has no CPU
build there): the sweep machinery is tested end to end with ``TinyProvider`` on CPU, and ``TimmProvider`` only on a
GPU host. Nothing here imports torch or timm at module level: the sweep's parent process and ``wattscope --help``
must stay cheap, and only the worker processes build models.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ModelProvider(ABC):
    """Builds an architecture into a ``torch.nn.Module`` with random (or local pretrained) weights."""

    name: str

    @abstractmethod
    def build(self, architecture: str, img_size: int, *, pretrained: bool) -> torch.nn.Module:
        """A fresh model in eval-ready form on the CPU, for inputs of ``(batch, 3, img_size, img_size)``."""

    @abstractmethod
    def available(self) -> str | None:
        """None when models can be built here, else why not and what to do (checked before any GPU time)."""

    @abstractmethod
    def versions(self) -> dict[str, str | None]:
        """Versions of what builds the models, for the sweep's run record (keys: "timm", ...)."""

    def unknown(self, architectures: Sequence[str]) -> list[str]:
        """The architectures this provider cannot build (the catalog may name models a older timm lacks)."""
        return []

    def special_architectures(self) -> dict[str, str]:
        """Architectures this provider offers beyond the catalog, with what each one is for."""
        return {}


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class TimmProvider(ModelProvider):
    """``timm.create_model(architecture, pretrained=...)``.

    Energy does not depend on weight values, so the sweep builds models with random weights by default; with
    ``pretrained=True`` timm loads weights from its local cache (the Hugging Face hub cache; set HF_HUB_OFFLINE=1 on
    machines without network access so a missing file fails at once instead of trying to download).
    """

    name = "timm"

    def build(self, architecture: str, img_size: int, *, pretrained: bool) -> torch.nn.Module:
        timm = _import_timm()
        kwargs: dict[str, Any] = {}
        cfg = _default_cfg(timm, architecture)
        # Models with position embeddings (ViT, Swin, ...) are built for one input size; convolutional ones take any.
        if cfg.get("fixed_input_size") and tuple(cfg.get("input_size", ()))[-1:] != (img_size,):
            kwargs["img_size"] = img_size
        return timm.create_model(architecture, pretrained=pretrained, **kwargs)

    def available(self) -> str | None:
        try:
            _import_timm()
        except Exception as e:  # ImportError, or torchvision's own import failing inside timm
            return f"timm cannot be imported ({type(e).__name__}: {e}); install it with `pip install timm`"
        return None

    def versions(self) -> dict[str, str | None]:
        return {"timm": _distribution_version("timm")}

    def unknown(self, architectures: Sequence[str]) -> list[str]:
        timm = _import_timm()
        return [a for a in architectures if not timm.is_model(a)]


def _import_timm() -> Any:
    import timm

    return timm


def _default_cfg(timm: Any, architecture: str) -> dict[str, Any]:
    try:
        cfg = timm.models.get_pretrained_cfg(architecture)
    except Exception:  # an architecture without a registered config: build it as timm defaults it
        return {}
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


class TinyProvider(ModelProvider):
    """Small torch modules standing in for catalog architectures, so the sweep runs on CPU in tests.

    Every architecture name maps to one of three small networks (a conv net, a conv net with batch norm, an MLP
    over a pooled image), picked and sized by a stable hash of the name, so catalog-based selection still works and
    different names cost differently. The special architectures make a worker fail in each way the sweep must
    survive.
    """

    name = "tiny"

    SPECIAL = {
        "tiny_compile_error": "its first forward raises torch._dynamo's error, as a failed torch.compile does",
        "tiny_oom": "its forward raises torch.OutOfMemoryError, as a CUDA out-of-memory does",
        "tiny_hang": "its forward never returns (the worker's timeout must kill it)",
        "tiny_crash": "its forward kills its own process with SIGKILL (a crash with no message)",
    }

    def build(self, architecture: str, img_size: int, *, pretrained: bool) -> torch.nn.Module:
        import torch

        if pretrained:
            raise ValueError("the tiny provider has no pretrained weights; drop --pretrained")
        if architecture in self.SPECIAL:
            return _failing_model(architecture)
        digest = zlib.crc32(architecture.encode())
        width = 8 * (1 + digest % 3)
        kind = (digest // 3) % 3
        nn = torch.nn
        if kind == 0:
            layers: list[nn.Module] = [
                nn.Conv2d(3, width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.ReLU(),
            ]
        elif kind == 1:
            layers = [
                nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(2 * width),
                nn.ReLU(),
            ]
        else:
            return nn.Sequential(
                nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, 4 * width), nn.GELU(), nn.Linear(4 * width, 10)
            )
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def available(self) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            return f"torch cannot be imported ({e}); install it with `pip install torch`"
        return None

    def versions(self) -> dict[str, str | None]:
        return {"timm": None}

    def special_architectures(self) -> dict[str, str]:
        return dict(self.SPECIAL)


def _failing_model(architecture: str) -> torch.nn.Module:
    import torch

    # Imported while building (torch._dynamo takes seconds to import), so the forward fails at once.
    from torch._dynamo.exc import InternalTorchDynamoError

    class Failing(torch.nn.Module):
        def __init__(self, architecture: str) -> None:
            super().__init__()
            self.architecture = architecture
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.architecture == "tiny_compile_error":
                raise InternalTorchDynamoError("tiny_compile_error: simulated torch.compile failure")
            if self.architecture == "tiny_oom":
                raise torch.OutOfMemoryError("tiny_oom: simulated out of memory (tried to allocate 1.00 TiB)")
            if self.architecture == "tiny_hang":
                while True:
                    time.sleep(1.0)
            if self.architecture == "tiny_crash":
                os.kill(os.getpid(), signal.SIGKILL)
            return x

    return Failing(architecture)


_PROVIDERS: dict[str, type[ModelProvider]] = {"timm": TimmProvider, "tiny": TinyProvider}


def get_provider(name: str) -> ModelProvider:
    """The provider called ``name`` ("timm" or "tiny")."""
    try:
        return _PROVIDERS[name]()
    except KeyError:
        raise ValueError(f"unknown model provider {name!r}; choose one of {sorted(_PROVIDERS)}") from None


PROVIDER_NAMES = tuple(sorted(_PROVIDERS))
