"""``RenderOptions``: how to render an archive's images, as one value.

The same choices travel from ``d3m-inspect`` and user code through
``D3MDataset``, the card writer and ``Regenerator`` down to
``resolve_render_settings``; they are one frozen value so that a new option
touches one class. Importing this module imports no torch.

Example:
    >>> from d3mfmt import RenderOptions
    >>> RenderOptions(device="cpu")
    RenderOptions(model=None, device='cpu', dtype=None, allow_model_mismatch=False, allow_download=False, compile=False, variant=None, limits=None)
    >>> ds = D3MDataset("spec/vectors/topk.d3m", render=RenderOptions(device="cpu"))   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import D3MError
from .renderable import RenderLimits

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # rendering dtypes (generator.DTYPES maps them to torch)


@dataclass(frozen=True)
class RenderOptions:
    """What a consumer chooses about rendering; the archive decides everything else.

    Args:
        model: a model id or directory used instead of the archive's ``generator.model.id``.
        device: the rendering device (default: ``cuda:LOCAL_RANK`` under torchrun/accelerate, else
            CUDA when available, else the CPU; see ``d3mfmt.devices.default_device``).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (default: fp16 on CUDA, fp32 elsewhere).
        allow_model_mismatch: render even if the model's content hash differs
            from the one the archive pins (the labels may then not describe the pixels).
        allow_download: fetch a hub model missing from the local cache
            (``D3MDataset`` also fetches a hub or URL archive with it).
        compile: ``torch.compile`` the UNet (off by default; see ``d3mfmt.accel``).
        variant: the weight variant to load (``"fp16"``...) instead of the one the
            archive records (``generator.model.variant``); see ``d3mfmt.modelpin``.
        limits: the render cost accepted (:class:`d3mfmt.RenderLimits`; None: the
            defaults, which ``Regenerator`` also derives from the loaded UNet's size).
            ``RenderLimits(per_image=None, total=None)`` trusts a costly archive;
            ``D3MDataset`` applies it when loading the archive too.
    """

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    allow_model_mismatch: bool = False
    allow_download: bool = False
    compile: bool = False
    variant: str | None = None
    limits: RenderLimits | None = None

    def check(self) -> None:
        """Raise D3MError for a value of the wrong type or an unknown dtype (devices: ``devices.check_device``)."""
        for name in ("model", "device", "variant"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise D3MError(f"RenderOptions.{name} must be a non-empty string or None, got {value!r}")
        if self.limits is not None and not isinstance(self.limits, RenderLimits):
            raise D3MError(f"RenderOptions.limits must be a d3mfmt.RenderLimits or None, got {self.limits!r}"[:300])
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise D3MError(f"RenderOptions.dtype must be one of {list(DTYPE_NAMES)} or None, got {self.dtype!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise D3MError(f"RenderOptions.{f.name} must be True or False, got {value!r}")


def checked(render: RenderOptions | None) -> RenderOptions:
    """``render`` after ``RenderOptions.check`` (None: the defaults); anything else is a D3MError."""
    if render is None:
        return RenderOptions()
    if not isinstance(render, RenderOptions):
        raise D3MError(f"render must be a d3mfmt.RenderOptions, got {type(render).__name__}; "
                       "e.g. render=RenderOptions(device='cpu')")
    render.check()
    return render
