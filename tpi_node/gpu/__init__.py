"""GPU fast path: detection (detect.py), token splitting (split.py), fused add+RMSNorm (fused.py,
triton_add_norm.py) and the multicast allreduce kernel (triton_multimem.py).

Importing this package (and detect, split, fused) needs neither CUDA, Triton nor nvidia-ml-py;
the triton_* modules import Triton and are loaded only once detection allows it.
"""
