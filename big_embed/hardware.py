"""Peak dense bf16 TFLOP/s per chip, keyed by `jax.devices()[0].device_kind`: the denominator of MFU.

The figures are the vendors' dense (no structured sparsity) bf16 numbers; NVIDIA's datasheets print the sparse
figure, twice the dense one. A device kind not listed (every CPU, GPUs not below) has no known peak: MFU is then
not reported, TFLOP/s still is. Add a kind here with its source.
"""

from __future__ import annotations

_A100 = 312.0  # NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), every A100
_H100_SXM = 989.0  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity -> 989 dense

PEAK_TFLOPS: dict[str, float] = {
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA H100 80GB HBM3": _H100_SXM,  # the kind string of the H100 SXM5
    "NVIDIA H100 PCIe": 756.0,  # NVIDIA H100 datasheet, H100 PCIe: BF16 1,513 TFLOPS with sparsity
    "NVIDIA H200": _H100_SXM,  # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity
    "NVIDIA B200": 2250.0,  # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS with sparsity per GPU
    "TPU v4": 275.0,  # Cloud TPU docs, TPU v4: 275 peak bf16 TFLOPS per chip
    "TPU v5 lite": 197.0,  # Cloud TPU docs, TPU v5e (kind "TPU v5 lite"): 197 bf16 TFLOPS per chip
    "TPU v5": 459.0,  # Cloud TPU docs, TPU v5p (kind "TPU v5"): 459 bf16 TFLOPS per chip
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,  # Cloud TPU docs, TPU v6e / Trillium (kind "TPU v6 lite"): 918 bf16 TFLOPS per chip
}


def peak_tflops(device_kind: str) -> float | None:
  """Peak dense bf16 TFLOP/s of one chip of `device_kind`, or None when unknown (e.g. "cpu")."""
  return PEAK_TFLOPS.get(device_kind.strip())


def mfu(tflops_per_device: float, device_kind: str) -> float | None:
  """Model FLOPs utilisation: achieved TFLOP/s per device ÷ the chip's peak; None when the peak is unknown."""
  peak = peak_tflops(device_kind)
  return None if peak is None else tflops_per_device / peak
