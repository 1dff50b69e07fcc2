"""What the user asks for: `--data` and how images are brought to one size. No torch here, so that
`--help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import option

BUILTIN = "builtin"
NO_LABELS = "none"  # label_column value that ignores the source's labels
RESIZE_MODES = ("resize", "center-crop", "pad")
AUGMENTATIONS = ("flip", "translate")
STREAM_MODES = ("auto", "always", "never")
STREAM_ABOVE = 1 << 30  # decoded bytes (n*c*h*w) above which --stream auto streams the images


def parse_augment(spec: str) -> tuple[str, ...]:
    """"none" -> (); "flip,translate" -> ("flip", "translate"); anything else is refused by name."""
    if spec.strip().lower() in ("none", ""):
        return ()
    names = tuple(n.strip().lower() for n in spec.split(","))
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise VQGenError(f"augment: unknown augmentation {unknown[0]!r}; expected 'none' or a comma list of "
                         f"{', '.join(AUGMENTATIONS)}")
    return names


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are brought to one size.

    `source`: "builtin", a folder of images (one subfolder per class, or flat), a parquet or
    arrow file or folder of them, a `save_to_disk` folder, or a hub name like "ylecun/mnist".
    Columns are found automatically when None; label_column="none" ignores labels.
    """

    source: str = option(BUILTIN, "'builtin' (generated shapes), a folder of images, a parquet/arrow file or "
                                  "folder, a save_to_disk folder, or a hub name (owner/name)", aliases=("--data",))
    image_column: str | None = option(None, "image column of a datasets source (found automatically)")
    label_column: str | None = option(None, "label column of a datasets source (found automatically; "
                                            "'none' ignores labels)")
    image_size: int | None = option(None, "bring every image to image-size x image-size (needed for mixed sizes)")
    resize_mode: str = option("resize", "how --image-size is reached: stretch, resize the shorter side and crop, "
                                        "or pad with zeros (never shrinks)", choices=RESIZE_MODES)
    test_fraction: float = option(0.1, "share of train held out as the test split when the source has none")
    seed: int = option(0, "seed of the built-in images and of the held-out test split", flag="data-seed")
    builtin_train_size: int = option(10000, "training images of the built-in shapes")
    builtin_test_size: int = option(2000, "test images of the built-in shapes")
    max_images: int | None = option(None, "use at most this many images of each split (quick runs)")
    augment: str = option("none", "stage-1 training augmentation: 'none' or a comma list of flip (horizontal "
                                  "mirror: not for digits or text) and translate (shifts up to 1/8 of the side)",
                          since=2)
    pseudo_classes: int | None = option(None, "unlabelled data: group the training images into this many clusters "
                                              "of their codes, which the prior then conditions on like classes "
                                              "(0: off; default when the data has no labels: one per 1,000 training "
                                              "images, 10 to 50)", since=2)
    class_clusters: int | None = option(None, "labelled data: split each class's training images into up to this "
                                              "many clusters of their codes (one per 50 of its images), which the "
                                              "prior conditions on while --label still picks the class (default: "
                                              "off, the classes alone)", since=6)
    code_copies: int = option(0, "augmented copies of each training image added to the code dump, so the prior "
                                 "sees more grids (uses --augment)", since=2)
    stream: str = option("auto", "decode images per batch from a memory-mapped Arrow copy instead of holding "
                                 "them all in memory (auto: when they would take more than 1 GiB decoded; "
                                 "a folder or parquet source is converted once into the cache, $VQGEN_CACHE)",
                         choices=STREAM_MODES, since=3)

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise VQGenError(f"data source must be a non-empty string, got {self.source!r}")
        for name in ("image_column", "label_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise VQGenError(f"{name} must be a column name or None, got {value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise VQGenError(f"image_size must be a positive integer or None, got {self.image_size!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise VQGenError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise VQGenError(f"test_fraction must be between 0 and 1 (exclusive), got {self.test_fraction!r}")
        for name in ("builtin_train_size", "builtin_test_size"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        parse_augment(self.augment)
        if self.pseudo_classes is not None and (self.pseudo_classes < 0 or self.pseudo_classes == 1):
            raise VQGenError(f"pseudo_classes must be 0 (off) or >= 2, got {self.pseudo_classes}")
        if self.class_clusters is not None and self.class_clusters < 0:
            raise VQGenError(f"class_clusters must be >= 0 (0: off), got {self.class_clusters}")
        if self.code_copies < 0:
            raise VQGenError(f"code_copies must be >= 0, got {self.code_copies}")
        if self.code_copies and not parse_augment(self.augment):
            raise VQGenError(f"code_copies={self.code_copies} needs augment (e.g. 'flip,translate'), got 'none'")
        if self.stream not in STREAM_MODES:
            raise VQGenError(f"stream must be one of {', '.join(STREAM_MODES)}, got {self.stream!r}")
        if self.max_images is not None and self.max_images < 1:
            raise VQGenError(f"max_images must be >= 1 or None, got {self.max_images!r}")


    @property
    def ignores_labels(self) -> bool:
        return self.label_column is not None and self.label_column.lower() == NO_LABELS

    def check_no_columns(self, what: str) -> None:
        """Column options only mean something for `datasets` sources; refusing beats ignoring them."""
        for name in ("image_column", "label_column"):
            value = getattr(self, name)
            if value is not None and not (name == "label_column" and self.ignores_labels):
                raise VQGenError(f"{name}={value!r} applies to parquet, arrow, saved or hub data, not to {what}")
