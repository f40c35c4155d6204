"""Labelled and unlabelled image sets, and the augmented training datasets used for fine-tuning.

A labelled folder has ``images/`` and ``masks/``: ``images/<stem>.<jpg|png|...>`` pairs with
``masks/<stem>.png`` (mode P or L, class indices, 255 = ignore). Stems may include sub-folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .classes import IGNORE_INDEX
from .errors import ImageReadError, MadsegError, MaskError
from .imageio import IMAGE_SUFFIXES, list_images, read_mask, read_rgb

MASK_SUFFIX = ".png"
_MAX_LISTED = 5
_EXIF_ORIENTATION = 0x0112


def _stem_of(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


class LabelledFolder:
    """Image/mask pairs from ``root/images`` and ``root/masks`` (matching stems).

    ``subset``: None (all), ``"half0"``/``"half1"`` (first/second half of the sorted stems; the
    first half gets the extra one when the count is odd), or a list of stems.
    ``pairs`` -> list of (image_path, mask_path), sorted by stem.
    """

    def __init__(self, root: str | os.PathLike[str], subset: str | Sequence[str] | None = None) -> None:
        self.root = Path(root).expanduser()
        img_dir, mask_dir = self.root / "images", self.root / "masks"
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise MadsegError(
                    f"labelled folder {self.root}: no {d.name}/ sub-folder; a labelled set needs "
                    "images/<stem>.jpg|png and masks/<stem>.png"
                )
        images = {_stem_of(p, img_dir): p for p in list_images(img_dir)}
        if not images:
            raise MadsegError(
                f"labelled folder {self.root}: no images in {img_dir} ({', '.join(IMAGE_SUFFIXES)})"
            )
        missing = [s for s in sorted(images) if not (mask_dir / (s + MASK_SUFFIX)).is_file()]
        if missing:
            shown = ", ".join(missing[:_MAX_LISTED]) + (" ..." if len(missing) > _MAX_LISTED else "")
            raise MaskError(
                f"labelled folder {self.root}: {len(missing)} image(s) have no mask in {mask_dir} "
                f"({shown}); add masks/<stem>.png for each image or remove those images"
            )
        stems = sorted(images)
        self.all_stems: tuple[str, ...] = tuple(stems)
        self.subset = subset
        self.stems: tuple[str, ...] = tuple(self._select(stems, subset))
        self._images = images
        self._mask_dir = mask_dir

    def _select(self, stems: list[str], subset: str | Sequence[str] | None) -> list[str]:
        if subset is None:
            return stems
        if isinstance(subset, str):
            half = (len(stems) + 1) // 2
            if subset == "half0":
                return stems[:half]
            if subset == "half1":
                return stems[half:]
            raise MadsegError(
                f"labelled folder {self.root}: subset {subset!r} unknown; "
                "use 'half0', 'half1' or a list of stems"
            )
        wanted = [str(s) for s in subset]
        unknown = [s for s in wanted if s not in set(stems)]
        if unknown:
            raise MadsegError(
                f"labelled folder {self.root}: subset names {len(unknown)} unknown stem(s): "
                f"{', '.join(unknown[:_MAX_LISTED])}"
            )
        return wanted

    @property
    def pairs(self) -> list[tuple[Path, Path]]:
        """(image_path, mask_path) for each selected stem."""
        return [(self._images[s], self._mask_dir / (s + MASK_SUFFIX)) for s in self.stems]

    def __len__(self) -> int:
        return len(self.stems)

    def __iter__(self) -> Iterator[tuple[Path, Path]]:
        return iter(self.pairs)

    def __repr__(self) -> str:
        return f"LabelledFolder({str(self.root)!r}, subset={self.subset!r}, n={len(self)})"

    def read(self, index: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, mask (H, W) uint8) of pair ``index``; sizes are checked."""
        img_path, mask_path = self.pairs[index]
        return read_pair(img_path, mask_path, num_classes)

    def describe(self) -> dict[str, object]:
        """JSON-friendly description (for sidecars): root, subset and the stems used."""
        subset = self.subset if self.subset is None or isinstance(self.subset, str) else "list"
        return {
            "root": str(self.root.resolve()),
            "subset": subset,
            "count": len(self),
            "stems": list(self.stems),
        }

    def check(self, num_classes: int) -> None:
        """Read every mask and every image header; raise on the first bad file (clear message)."""
        for img_path, mask_path in self.pairs:
            mask = read_mask(mask_path, num_classes)
            size = image_hw(img_path)
            if size != mask.shape:
                raise MaskError(
                    f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {img_path.name} is "
                    f"{size[1]}x{size[0]} (W x H); masks must have their image's size"
                )


def image_hw(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(H, W) of an image as :func:`read_rgb` returns it (EXIF rotation applied); reads the header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_pair(img_path: Path, mask_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its mask, checking that their sizes agree."""
    image = read_rgb(img_path)
    mask = read_mask(mask_path, num_classes)
    if image.shape[:2] != mask.shape:
        raise MaskError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {img_path.name} is "
            f"{image.shape[1]}x{image.shape[0]} (W x H); masks must have their image's size"
        )
    return image, mask


def unlabelled_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image paths from a folder (recursive) or a list of files."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise MadsegError(f"unlabelled images: {folder} is not a folder")
        paths = list_images(folder)
        if not paths:
            raise MadsegError(f"unlabelled images: no images in {folder} ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    paths = [Path(p) for p in source]
    if not paths:
        raise MadsegError("unlabelled images: the list is empty")
    return paths


# ----------------------------------------------------------------------------------------------
# Augmentation (pure numpy / PIL)
# ----------------------------------------------------------------------------------------------


def augment(
    image: np.ndarray,
    mask: np.ndarray | None,
    crop: tuple[int, int],
    rng: np.random.Generator,
    *,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    fill: tuple[int, int, int] = (124, 116, 104),
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random scale, pad, crop and horizontal flip of an image (H, W, 3) uint8 and its mask (H, W).

    The image is first resized to ``crop`` = (h, w) (as inference does) times a random factor in
    ``scale_range``; it is then padded to at least ``crop`` (image with ``fill``, mask with 255)
    and a random ``crop`` window is taken. Returns (h, w, 3) uint8 and (h, w) uint8 (or None).
    """
    ch, cw = crop
    s = float(rng.uniform(*scale_range))
    th, tw = max(1, round(ch * s)), max(1, round(cw * s))
    im = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
    mk = None
    if mask is not None:
        mk = np.asarray(Image.fromarray(mask).resize((tw, th), Image.NEAREST))
    ph, pw = max(0, ch - th), max(0, cw - tw)
    if ph or pw:
        canvas = np.empty((th + ph, tw + pw, 3), dtype=np.uint8)
        canvas[:] = np.asarray(fill, dtype=np.uint8)
        canvas[:th, :tw] = im
        im = canvas
        if mk is not None:
            mcanvas = np.full((th + ph, tw + pw), IGNORE_INDEX, dtype=np.uint8)
            mcanvas[:th, :tw] = mk
            mk = mcanvas
    y0 = int(rng.integers(0, im.shape[0] - ch + 1))
    x0 = int(rng.integers(0, im.shape[1] - cw + 1))
    im = im[y0 : y0 + ch, x0 : x0 + cw]
    if mk is not None:
        mk = mk[y0 : y0 + ch, x0 : x0 + cw]
    if flip and rng.random() < 0.5:
        im = im[:, ::-1]
        mk = mk[:, ::-1] if mk is not None else None
    return np.ascontiguousarray(im), (np.ascontiguousarray(mk) if mk is not None else None)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(h, w, 3) uint8 -> [3, h, w] float32 ``(x / 255 - mean) / std``."""
    if not image.flags.writeable:
        image = image.copy()
    x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


class SegmentationTrainSet(Dataset):
    """Augmented training pairs: item ``i`` -> (image [3, h, w] float32 normalised, mask [h, w] int64).

    Augmentation (:func:`augment`) is seeded by ``(seed, epoch, i)`` so that a resumed run sees the
    same data; call :meth:`set_epoch` each epoch. :meth:`sample` takes an explicit generator.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        crop: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        num_classes: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        seed: int = 0,
    ) -> None:
        if not pairs:
            raise MadsegError("training set is empty")
        self.pairs = list(pairs)
        self.crop = (int(crop[0]), int(crop[1]))
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = num_classes
        self.scale_range = scale_range
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        self.fill = tuple(int(round(m * 255)) for m in self.mean)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, mask_path = self.pairs[index]
        image, mask = read_pair(img_path, mask_path, self.num_classes)
        im, mk = augment(image, mask, self.crop, rng, scale_range=self.scale_range, flip=self.flip,
                         fill=self.fill)  # type: ignore[arg-type]
        assert mk is not None
        return normalize(im, self.mean, self.std), torch.from_numpy(mk.astype(np.int64))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(index, np.random.default_rng([self.seed, self.epoch, index]))


class UnlabelledTrainSet(Dataset):
    """Augmented unlabelled images (for LwF distillation): item ``i`` -> image [3, h, w] float32.

    An unreadable image is replaced by the next readable one (and remembered), so one bad file
    in a pool does not stop a long training run.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        crop: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        seed: int = 0,
    ) -> None:
        if not paths:
            raise MadsegError("unlabelled set is empty")
        self.paths = [Path(p) for p in paths]
        self.crop = (int(crop[0]), int(crop[1]))
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale_range = scale_range
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        self.fill = tuple(int(round(m * 255)) for m in self.mean)
        self.bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        for k in range(len(self.paths)):
            j = (index + k) % len(self.paths)
            if j in self.bad:
                continue
            try:
                image = read_rgb(self.paths[j])
            except ImageReadError:
                self.bad.add(j)
                continue
            im, _ = augment(image, None, self.crop, rng, scale_range=self.scale_range, flip=self.flip,
                            fill=self.fill)  # type: ignore[arg-type]
            return normalize(im, self.mean, self.std)
        raise MadsegError(f"unlabelled set: none of the {len(self.paths)} images is readable")

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sample(index, np.random.default_rng([self.seed, self.epoch, index]))
