"""Find out, once at start, what GPU fast path this machine allows, and why.

The fast path (NCCL / symmetric-memory collective + fused allreduce+RMSNorm) needs:
  - CUDA GPUs of compute capability 9.0 (Hopper) or newer,
  - more than one of them, every pair linked by NVLink (NVML's P2P status over NVLink),
  - for the multimem variant, multicast support (torch symmetric memory; NVSwitch systems).
One GPU still gets the fused add+RMSNorm kernel (nothing to reduce over NVLink).

Everything the decision reads comes through a probe object, so tests pass fakes and a machine
without CUDA, Triton or nvidia-ml-py only ever sees "off" with the reason. No import here may
fail on such a machine: torch.cuda, pynvml and triton are touched lazily inside `SystemProbe`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Protocol

log = logging.getLogger("tpi_node.gpu")

MIN_CAPABILITY = (9, 0)  # Hopper


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    sm_count: int


class Probe(Protocol):
    """What detection asks of the machine. `SystemProbe` asks the real one."""

    def gpus(self) -> list[GpuInfo]: ...

    def nvlink_p2p(self, a: int, b: int) -> bool | None:
        """True/False from NVML; None when NVML cannot answer (not installed, no driver)."""

    def multicast(self, index: int) -> bool | None: ...

    def triton(self) -> bool: ...


@dataclass(frozen=True)
class GpuDecision:
    """The one decision, with its reason. `collective`: 'multimem', 'nccl' or 'off'."""

    collective: str
    fused_kernel: bool
    reason: str
    gpus: tuple[GpuInfo, ...] = ()
    nvlink: bool | None = None
    multicast: bool | None = None
    triton: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def enabled(self) -> bool:
        return self.collective != "off"

    @property
    def sm_count(self) -> int:
        return self.gpus[0].sm_count if self.gpus else 0

    def summary(self) -> str:
        """One line: what this machine allows. What a node runs is commands/compose.py's choice
        (FastPath.summary, the line said at start)."""
        group = {"multimem": "an NVLink group with multicast", "nccl": "an NVLink group (NCCL)"}
        kernel = "the fused add+RMSNorm kernel" if self.fused_kernel else "no fused kernel"
        return f"gpu detection: {self.reason}; allows {group.get(self.collective, 'no NVLink group')}, {kernel}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["enabled"] = self.enabled
        d["summary"] = self.summary()
        return d


class SystemProbe:
    """The real machine: torch.cuda for devices, NVML for NVLink, torch symm-mem for multicast."""

    def gpus(self) -> list[GpuInfo]:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(GpuInfo(i, p.name, (p.major, p.minor), p.multi_processor_count))
        return out

    def nvlink_p2p(self, a: int, b: int) -> bool | None:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            ha, hb = self._nvml_handle(pynvml, a), self._nvml_handle(pynvml, b)
            status = pynvml.nvmlDeviceGetP2PStatus(ha, hb, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
            return status == pynvml.NVML_P2P_STATUS_OK
        except Exception:  # NVML present but no driver / query unsupported: cannot tell
            return None

    @staticmethod
    def _nvml_handle(pynvml, cuda_index: int):
        """CUDA and NVML may number GPUs differently (CUDA_VISIBLE_DEVICES): match by UUID."""
        import torch

        uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
        if uuid is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)

    def multicast(self, index: int) -> bool | None:
        try:
            from torch._C._autograd import DeviceType
            from torch._C._distributed_c10d import _SymmetricMemory

            return bool(_SymmetricMemory.has_multicast_support(DeviceType.CUDA, index))
        except Exception:  # torch without distributed / symmetric memory
            return None

    def triton(self) -> bool:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True


def _cap(c: tuple[int, int]) -> str:
    return f"sm_{c[0]}{c[1]}"


def detect(probe: Probe | None = None) -> GpuDecision:
    """Read the machine through `probe` (default: the real one) and decide."""
    probe = probe or SystemProbe()
    gpus = tuple(probe.gpus())
    has_triton = probe.triton()
    if not gpus:
        return GpuDecision("off", False, "no CUDA device", triton=has_triton)

    # The fused Triton kernel needs bf16 arithmetic (sm_80+) and Triton itself.
    old = [g for g in gpus if g.capability < (8, 0)]
    fused = has_triton and not old
    notes = [] if has_triton else ["triton not installed (pip install 'tpi-node[gpu]')"]
    base = dict(gpus=gpus, triton=has_triton, fused_kernel=fused)

    slow = [g for g in gpus if g.capability < MIN_CAPABILITY]
    if slow:
        g = slow[0]
        why = f"GPU {g.index} ({g.name}) is {_cap(g.capability)}; the fast path needs Hopper (sm_90) or newer"
        return GpuDecision("off", reason=why, notes=tuple(notes), **base)
    if len(gpus) == 1:
        why = f"1 GPU ({gpus[0].name}, {_cap(gpus[0].capability)}): nothing to reduce over NVLink"
        return GpuDecision("off", reason=why, notes=tuple(notes), **base)

    for a in range(len(gpus)):
        for b in range(a + 1, len(gpus)):
            link = probe.nvlink_p2p(a, b)
            if link is None:
                why = "cannot read NVLink P2P status (nvidia-ml-py missing or NVML unavailable)"
                return GpuDecision("off", reason=why, nvlink=None, notes=tuple(notes), **base)
            if not link:
                why = f"GPUs {a} and {b} have no NVLink P2P path (NVML)"
                return GpuDecision("off", reason=why, nvlink=False, notes=tuple(notes), **base)

    mc = [probe.multicast(g.index) for g in gpus]
    multicast = all(m is True for m in mc)
    names = f"{len(gpus)}x {gpus[0].name} {_cap(gpus[0].capability)}"
    if multicast:
        why = f"{names}, NVLink between all pairs, multicast: symmetric-memory multimem allreduce"
        return GpuDecision("multimem", reason=why, nvlink=True, multicast=True, notes=tuple(notes), **base)
    why = f"{names}, NVLink between all pairs, no multicast: NCCL allreduce"
    return GpuDecision("nccl", reason=why, nvlink=True, multicast=False, notes=tuple(notes), **base)


def detect_and_log(probe: Probe | None = None) -> GpuDecision:
    """`detect`, logged at DEBUG (the composition root says what the node runs). Never raises."""
    try:
        decision = detect(probe)
    except Exception as e:  # a broken driver must not stop a CPU node from serving
        decision = GpuDecision("off", False, f"GPU detection failed: {type(e).__name__}: {e}")
    log.debug(decision.summary())
    for note in decision.notes:
        log.debug("gpu: %s", note)
    return decision
