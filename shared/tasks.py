"""What a model learns: classes, input shape and the preprocessing that feeds it.

A ``TaskSpec`` is plain data (no torch): it travels in checkpoints and in the
edge bundle's manifest, so the device preprocesses exactly as training did.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedge.shared.errors import ConfigError

BUILTIN_TASKS = ("digits", "breast-cancer")
USER_TASKS = ("images", "tabular")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize to ``size``x``size``, scale to [0, 1], normalise per channel, NCHW."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    resize: str = "bilinear"
    channel_order: str = "RGB"  # or "L" for one channel
    kind: Literal["image"] = "image"


@dataclass(frozen=True)
class TabularPreprocessing:
    """Take ``columns`` in this order and standardise each with ``mean``/``std``."""

    columns: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: Literal["tabular"] = "tabular"


Preprocessing = ImagePreprocessing | TabularPreprocessing


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: its name, class labels and input preprocessing."""

    name: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        return self.preprocessing.kind

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed example: (C, H, W) or (F,)."""
        p = self.preprocessing
        if isinstance(p, ImagePreprocessing):
            return (p.channels, p.size, p.size)
        return (len(p.columns),)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "preprocessing": asdict(self.preprocessing),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "TaskSpec":
        try:
            pre = dict(data["preprocessing"])
            kind = pre.pop("kind")
            for key in ("mean", "std", "columns"):
                if key in pre:
                    pre[key] = tuple(pre[key])
            preprocessing: Preprocessing = (
                ImagePreprocessing(**pre) if kind == "image" else TabularPreprocessing(**pre)
            )
            return TaskSpec(str(data["name"]), tuple(data["classes"]), preprocessing)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed task description: {e}") from e


def image_task(
    name: str,
    classes: tuple[str, ...],
    size: int,
    channels: int,
    model: str,
) -> TaskSpec:
    """An image task; torchvision and timm backbones get ImageNet normalisation and 3 channels."""
    from fedge.shared.model_names import imagenet_backbone

    mean: tuple[float, ...]
    std: tuple[float, ...]
    if imagenet_backbone(model):
        channels = 3
        mean, std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    else:
        mean, std = (0.5,) * channels, (0.5,) * channels
    order = "L" if channels == 1 else "RGB"
    pre = ImagePreprocessing(size=size, channels=channels, mean=mean, std=std, channel_order=order)
    return TaskSpec(name, classes, pre)
