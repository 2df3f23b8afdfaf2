"""Host -> device copies of layer files for a node that computes on a CUDA device."""

from __future__ import annotations

import torch


class PinnedUploader:
    """Copies a layer file's buffer to a CUDA device from pinned host memory, on a side stream,
    so the copy overlaps the forward pass running on the default stream.

    Used by the loading thread only (the prefetcher, or the constructor when resident):
        raw = slot or uploader.staging(n)   # pinned uint8 [>= n]; the file is read into it
        t = uploader.upload(raw, views)     # the same tensors, on the device, copy finished
    The loading thread waits for its own copy (stream.synchronize), never the forward pass.
    The device buffer is marked as used by the default stream, so when the forward pass drops
    the layer the allocator does not reuse its memory before the kernels queued on it are done.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.consumer = torch.cuda.default_stream(device)
        self._buf = torch.empty(0, dtype=torch.uint8)

    def staging(self, n: int) -> torch.Tensor:
        """A reused pinned buffer of at least n bytes (grown when a larger file comes)."""
        if self._buf.numel() < n:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        return self._buf[:n]

    def upload(self, raw: torch.Tensor, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """raw: the uint8 host buffer `views` live in -> the views' copies on the device, made by
        ONE host->device copy of the bytes they span (one device buffer, freed whole)."""
        base = raw.storage_offset()
        spans = [(t.storage_offset() * t.element_size() - base, t.numel() * t.element_size()) for t in views.values()]
        n = max((a + b for a, b in spans), default=0)
        with torch.cuda.stream(self.stream):
            dev = torch.empty(n, dtype=torch.uint8, device=self.device)
            dev.copy_(raw[:n], non_blocking=raw.is_pinned())
        self.stream.synchronize()  # the host buffer may be refilled after this
        dev.record_stream(self.consumer)
        return {name: dev[a : a + nb].view(t.dtype).view(t.shape) for (name, t), (a, nb) in zip(views.items(), spans)}
