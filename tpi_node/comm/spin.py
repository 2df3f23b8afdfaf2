"""How long a process that waits for a peer on this machine spins before it sleeps.

Waking a sleeping process on another core costs ~30 us each way on a VM; a spinning reader has
the peer's frame (cluster/unix_session.py) or lane entry (comm/lane.py) within a few us. Spinning
pays while the peer answers within it, and costs the peer its core when there are more busy
processes than cores.
"""

from __future__ import annotations

# How long a waiting reader spins before it sleeps: about a layer's compute. SmolLM2 at 2 local
# nodes (bench_cluster.py, before it gave threads as `run` does): 0.50x one node's tokens/s with no
# spin, 0.55x at 0.2 ms, 0.58x at 2 ms.
SPIN_S = 0.002
SPIN_MIN_S = 0.00005  # where SpinBudget goes while spinning does not pay


class SpinBudget:
    """How long a reader spins next: SPIN_S while spinning pays (the frame came within it), halved
    after each spin that found nothing, down to SPIN_MIN_S (an idle worker's heartbeat waits, a
    peer that is far behind). With more busy processes than cores a spinning reader holds the core
    its peer needs: bench_allreduce.py at 3 processes on 2 cores, 256 tokens, took 4.6 ms a round
    trip with a fixed 2 ms spin against 2.6 ms with none, while at 1 token the spin made it 0.65x.
    This halving did not cure that case (4.1 ms); the larger send buffer helped more (2.9 ms)."""

    def __init__(self) -> None:
        self.s = SPIN_S

    def spent(self, paid: bool) -> None:
        self.s = min(SPIN_S, self.s * 2) if paid else max(SPIN_MIN_S, self.s / 2)
