"""The standard Inception measures (FID, KID, precision/recall) of uint8 images, all computed by the
optional torch-fidelity in its Inception features; without the package or its downloaded weights, one line
that says what to install.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqgen.core.evaluate.quality import check_images
from vqgen.core.runtime.errors import VQGenError, one_line

_INCEPTION_HELP = "pip install torch-fidelity, with network access once for its Inception weights"


class _UInt8Images(torch.utils.data.Dataset):
    """What torch-fidelity reads: one uint8 (3, h, w) tensor per item."""
    def __init__(self, images: Tensor):
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x  # Inception wants RGB


# torch-fidelity's result keys -> ours (KID's spread there is over its subsets, not a standard error)
_INCEPTION_KEYS = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid",
                   "kernel_inception_distance_std": "kid_subset_std", "precision": "precision", "recall": "recall"}


def inception_scores(samples: Tensor, reference: Tensor) -> dict[str, float]:
    """The standard Inception FID, KID and precision/recall (k = 3) of uint8 (n, c, h, w) samples against
    reference images, all computed by torch-fidelity in its Inception features: {fid, kid, kid_subset_std,
    precision, recall}."""
    check_images(samples, "samples")
    check_images(reference, "reference images")
    try:
        import torch_fidelity
    except ImportError:
        raise VQGenError(f"the Inception FID needs torch-fidelity and its weights: {_INCEPTION_HELP}") from None
    try:
        metrics = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(samples), input2=_UInt8Images(reference), fid=True, kid=True, prc=True,
            kid_subset_size=min(1000, len(samples), len(reference)), prc_neighborhood=3,
            cuda=torch.cuda.is_available(), cache=False, verbose=False)
    except Exception as err:  # most often: no network to download the weights on first use
        raise VQGenError(f"the Inception FID failed ({one_line(err)}): {_INCEPTION_HELP}") from None
    return {ours: float(metrics[theirs]) for theirs, ours in _INCEPTION_KEYS.items() if theirs in metrics}
