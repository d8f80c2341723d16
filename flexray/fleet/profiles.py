"""Device classes: the numbers the latency and energy model run on.

``flops`` is *sustained training* throughput with PyTorch, not the datasheet peak: small-batch
CNN training on edge hardware reaches only a few to a few tens of percent of peak (kernel
launch overhead, memory bandwidth, thermal throttling). ``latency`` is the per-layer model
(docs/latency.md): per kernel kind a FLOP rate, a bandwidth, a per-kernel and a per-row cost.
No catalog board was calibrated by us, so each class's is the reference CPU's calibration
(``X86_REFERENCE``, measured by ``flexray probe``) moved to the class: FLOP rates scaled so dense
conv runs at the class's ``flops``, bandwidths to its memory bandwidth (datasheet or STREAM),
fixed costs by how much slower its cores dispatch; GPUs get launch-bound fixed costs instead.
Every number below names its source; "estimate" marks judgement calls rather than measurements.
Users who have measured their own hardware should override them under ``fleet.profiles``
(``flexray probe`` prints the block).
"""

from __future__ import annotations

from collections.abc import Mapping

import dataclasses
import math

from flexray.config import LatencyConfig, ProfileConfig
from flexray.errors import FlexrayError
from flexray.protocol import KINDS, DeviceProfile, KindRates, LatencyParams

__all__ = ["CATALOG", "X86_REFERENCE", "DeviceProfile", "GFLOP", "GiB", "MBIT", "latency_params", "latency_yaml", "resolve_profile", "yaml_float"]

GiB = 1024**3
MBIT = 1e6
GFLOP = 1e9


_INF = math.inf

X86_REFERENCE = LatencyParams(
    # `flexray probe` on the development machine (2-core x86_64 VM with AVX-512, 1 thread,
    # torch 2.14 CPU), 2026-12-07: 99 timed cases, the fit within 1.10x of them (median), 1.74x (worst).
    step_s=2.2e-4,
    kinds=(
        KindRates(flops_per_s=1.08e11, bytes_per_s=6.5e9, kernel_s=1.1e-4, row_s=2.4e-8),  # conv (oneDNN primitive per call)
        KindRates(bytes_per_s=5.4e9, kernel_s=4.0e-5),  # grouped/depthwise: memory-bound
        KindRates(flops_per_s=9.5e10, kernel_s=1.2e-5),  # matmul
        KindRates(flops_per_s=2.3e10, kernel_s=2.8e-4),  # attention (CPU flash attention)
        KindRates(bytes_per_s=3.05e9),  # pool
        KindRates(bytes_per_s=1.03e10, kernel_s=1.8e-5, row_s=7.8e-8),  # norm
        KindRates(bytes_per_s=1.82e10),  # memory-bound elementwise, optimizer
    ),
)
_REF_CONV = X86_REFERENCE.kinds[0].flops_per_s
_REF_MEMORY = X86_REFERENCE.kinds[-1].bytes_per_s


def _cpu(flops: float, memory_bps: float, slower: float) -> LatencyParams:
    """The reference CPU moved to a class: FLOP rates x flops / reference conv rate, bandwidths x
    memory_bps / reference memory bandwidth, fixed costs x ``slower`` (its cores' dispatch speed)."""
    f, b = flops / _REF_CONV, memory_bps / _REF_MEMORY
    return LatencyParams(X86_REFERENCE.step_s * slower, tuple(
        KindRates(k.flops_per_s * f, k.bytes_per_s * b, k.kernel_s * slower, k.row_s * slower) for k in X86_REFERENCE.kinds))


def _gpu(flops: float, memory_bps: float, kernel_s: float, step_s: float) -> LatencyParams:
    """A GPU: every kernel pays a launch (host dispatch + CUDA launch, what dominates small models),
    dense conv at ``flops``, matmul 1.5x (tensor-friendly GEMMs), depthwise and attention memory- or
    latency-bound (1/8, 1/2 of it), memory-bound kinds at 60% of the datasheet bandwidth. Estimates."""
    mem = 0.6 * memory_bps
    return LatencyParams(step_s, (
        KindRates(flops, mem, kernel_s), KindRates(flops / 8, mem, kernel_s), KindRates(1.5 * flops, mem, kernel_s),
        KindRates(flops / 2, mem, kernel_s), KindRates(_INF, mem, kernel_s), KindRates(_INF, mem, kernel_s),
        KindRates(_INF, mem, kernel_s),
    ))


CATALOG: dict[str, DeviceProfile] = {
    # Raspberry Pi 3 Model B: 4x Cortex-A53 @ 1.2 GHz, 1 GB LPDDR2, 802.11n 2.4 GHz.
    "rpi3": DeviceProfile(
        name="rpi3",
        # FP32 NEON peak ~19 GFLOP/s (4 cores x 1.2 GHz x 4 FLOP/cycle, A53 runs 128-bit NEON
        # at half rate); PyTorch CPU training ~5% of that -> ~1 GFLOP/s. Estimate.
        flops=1.0 * GFLOP,
        # 1 GB total minus OS and the GPU memory split -> ~0.75 GiB. Estimate.
        memory_bytes=int(0.75 * GiB),
        # Single-stream 802.11n 2.4 GHz: iperf ~35 Mbit/s (Jeff Geerling, Pi Dramble network
        # benchmarks); the 100 Mbit/s Ethernet hangs off USB 2.0 and is rarely faster in practice.
        uplink_bps=35 * MBIT,
        downlink_bps=35 * MBIT,
        # Pi Dramble power table: 400% CPU stress 730 mA @ 5 V = 3.7 W; idle 260 mA = 1.4 W.
        power_active_w=3.7,
        power_idle_w=1.4,
        power_radio_w=0.5,  # Wi-Fi transfer, roughly +100 mA @ 5 V. Estimate.
        # LPDDR2 at 900 MHz: STREAM copy ~1.5-2 GB/s reported; 4x A53 @ 1.2 GHz dispatch ~8x slower
        # than the reference core (single-thread benchmark ratios). Estimates.
        latency=_cpu(1.0 * GFLOP, 1.8e9, 8.0),
        rtt_s=0.005,  # 2.4 GHz Wi-Fi LAN round trip ~3-8 ms. Estimate.
    ),
    # Raspberry Pi 4 Model B (4 GB): 4x Cortex-A72 @ 1.5 GHz, 802.11ac dual band.
    "rpi4": DeviceProfile(
        name="rpi4",
        # HPL (FP64) 11.4-11.9 GFLOP/s (Jeff Geerling, geerlingguy/top500-benchmark: CM4 @ 1.5
        # GHz, Pi 4 @ 1.8 GHz). HPL is near-ideal GEMM; PyTorch conv training with small batches
        # gets ~1/4 of it (im2col, memory-bound layers, 4 threads) -> ~3 GFLOP/s. Estimate.
        flops=3.0 * GFLOP,
        # 4 GB model minus OS -> ~3 GiB. Estimate.
        memory_bytes=3 * GiB,
        # 802.11ac 5 GHz: iperf ~100 Mbit/s (Jeff Geerling, Pi 4 Wi-Fi benchmarks).
        uplink_bps=100 * MBIT,
        downlink_bps=100 * MBIT,
        # Pi Dramble power table: 400% CPU stress 1280 mA @ 5 V = 6.4 W; idle 540 mA = 2.7 W.
        power_active_w=6.4,
        power_idle_w=2.7,
        power_radio_w=0.7,  # 5 GHz Wi-Fi transfer, ~+140 mA. Estimate.
        # LPDDR4-3200: STREAM copy ~4 GB/s (community benchmarks); A72 @ 1.5 GHz ~4x slower per op. Estimates.
        latency=_cpu(3.0 * GFLOP, 4.0e9, 4.0),
        rtt_s=0.003,  # 5 GHz Wi-Fi LAN round trip ~2-4 ms. Estimate.
    ),
    # Raspberry Pi 5 (8 GB): 4x Cortex-A76 @ 2.4 GHz.
    "rpi5": DeviceProfile(
        name="rpi5",
        # HPL 35.2 GFLOP/s at 12.7 W (geerlingguy/top500-benchmark, Pi 5 8 GB); ~1/4 of HPL
        # for PyTorch training as for rpi4 -> ~9 GFLOP/s. Estimate.
        flops=9.0 * GFLOP,
        memory_bytes=int(6.5 * GiB),  # 8 GB minus OS. Estimate.
        # 802.11ac 5 GHz; reviews report ~150-200 Mbit/s iperf. Estimate.
        uplink_bps=150 * MBIT,
        downlink_bps=150 * MBIT,
        # 12.7 W at the wall under HPL incl. the active cooler; PyTorch loads the FPUs less.
        power_active_w=9.0,  # Estimate.
        power_idle_w=2.7,  # Reviews report ~2.5-3 W idle. Estimate.
        power_radio_w=0.7,  # As rpi4. Estimate.
        # LPDDR4X-4267: STREAM copy ~8-10 GB/s reported; A76 @ 2.4 GHz ~2x slower per op. Estimates.
        latency=_cpu(9.0 * GFLOP, 9.0e9, 2.0),
        rtt_s=0.003,  # As rpi4. Estimate.
    ),
    # NVIDIA Jetson Nano developer kit (4 GB): 128-core Maxwell GPU, 10 W mode.
    "jetson_nano": DeviceProfile(
        name="jetson_nano",
        # Datasheet: 472 GFLOP/s FP16 = 236 GFLOP/s FP32 (128 cores x 2 x 921.6 MHz). PyTorch
        # FP32 training of small CNNs ~15% of FP32 peak -> ~35 GFLOP/s. Estimate.
        flops=35 * GFLOP,
        # 4 GB shared CPU/GPU minus OS and CUDA context (~1.5 GB) -> ~2.5 GiB. Estimate.
        memory_bytes=int(2.5 * GiB),
        # The dev kit has Gigabit Ethernet and no Wi-Fi: iperf ~940 Mbit/s on a wired lab LAN.
        uplink_bps=940 * MBIT,
        downlink_bps=940 * MBIT,
        power_active_w=10.0,  # Datasheet: 10 W (MAXN) power mode budget.
        power_idle_w=1.5,  # Module idle ~1.2-2 W in community measurements. Estimate.
        power_radio_w=0.3,  # Ethernet PHY/NIC activity. Estimate.
        # Datasheet: 25.6 GB/s LPDDR4. Eager PyTorch on the 4x A57 host + CUDA launch: ~50 us per
        # kernel, ~2 ms per step (optimizer, Python). Estimates.
        latency=_gpu(35 * GFLOP, 25.6e9, 5e-5, 2e-3),
        rtt_s=0.0005,  # wired Gigabit LAN. Estimate.
    ),
    # NVIDIA Jetson Orin Nano 8 GB developer kit: 1024-core Ampere GPU, 15 W mode.
    "jetson_orin_nano": DeviceProfile(
        name="jetson_orin_nano",
        # FP32 peak 1.28 TFLOP/s (1024 CUDA cores x 2 x 625 MHz, Orin Nano datasheet clocks;
        # "Super" mode at 1020 MHz reaches ~2.1). Training ~25% of FP32 peak -> ~300 GFLOP/s.
        # Estimate.
        flops=300 * GFLOP,
        # 8 GB shared LPDDR5 minus OS and CUDA context -> ~6 GiB. Estimate.
        memory_bytes=6 * GiB,
        # Dev kit ships an 802.11ac M.2 Wi-Fi card: ~200 Mbit/s typical. Estimate.
        uplink_bps=200 * MBIT,
        downlink_bps=200 * MBIT,
        power_active_w=15.0,  # Datasheet: 15 W power mode (7 W and 25 W "Super" also exist).
        power_idle_w=5.0,  # Dev kit idle incl. carrier board, ~4-6 W. Estimate.
        power_radio_w=1.0,  # M.2 Wi-Fi card while transferring. Estimate.
        # Datasheet: 68 GB/s LPDDR5; A78AE host ~25 us per kernel launched from eager PyTorch. Estimates.
        latency=_gpu(300 * GFLOP, 68e9, 2.5e-5, 1e-3),
        rtt_s=0.003,  # Wi-Fi LAN. Estimate.
    ),
    # Mid-range Android phone (Snapdragon 7-series class: 4x A78 + 4x A55), on LTE.
    "phone_mid": DeviceProfile(
        name="phone_mid",
        # CPU FP32 NEON peak ~200 GFLOP/s (4x A78 @ 2.3 GHz x 16 FLOP/cycle + 4x A55 @ 1.9 GHz
        # x 8); on-device CPU training is thermally limited to ~5% -> ~10 GFLOP/s. Estimate,
        # consistent with Geekbench ML / AI-Benchmark gaps between mid and flagship SoCs.
        flops=10 * GFLOP,
        # 6 GB RAM; Android leaves a foreground app ~1-2 GB before the low-memory killer. Estimate.
        memory_bytes=int(1.5 * GiB),
        # LTE: Opensignal / Ookla median 4G ~30 Mbit/s down, ~8 Mbit/s up. Estimate.
        uplink_bps=8 * MBIT,
        downlink_bps=30 * MBIT,
        power_active_w=3.0,  # Sustained all-core CPU load after throttling. Estimate.
        power_idle_w=0.5,  # Awake, screen off. Estimate.
        # Huang et al., MobiSys 2012 (LTE power model): ~1.3 W radio base + throughput term.
        power_radio_w=1.5,
        # LPDDR4X: ~15 GB/s sustained; big cores ~2.5x slower per op than the reference. Estimates.
        latency=_cpu(10 * GFLOP, 15e9, 2.5),
        rtt_s=0.05,  # Opensignal: 4G latency ~40-60 ms medians. Estimate.
    ),
    # Flagship phone (Snapdragon 8 Gen 2 class: 1x X3 + 4x A715/A710 + 3x A510), on 5G.
    "phone_high": DeviceProfile(
        name="phone_high",
        # CPU FP32 NEON peak ~330 GFLOP/s (X3 @ 3.2 GHz x 32 FLOP/cycle + 4 mid cores @ 2.8 GHz
        # x 16 + 3x A510 @ 2.0 GHz x 8); ~10% sustained for training -> ~35 GFLOP/s. Estimate.
        flops=35 * GFLOP,
        memory_bytes=4 * GiB,  # 12 GB RAM; what a foreground app can hold. Estimate.
        # 5G sub-6 GHz: Opensignal 5G reports ~150 Mbit/s down, ~25 Mbit/s up. Estimate.
        uplink_bps=25 * MBIT,
        downlink_bps=150 * MBIT,
        power_active_w=5.0,  # Sustained CPU load after throttling. Estimate.
        power_idle_w=0.6,  # Awake, screen off. Estimate.
        # Narayanan et al., SIGCOMM 2021: 5G radios draw more than LTE at modest rates. Estimate.
        power_radio_w=2.5,
        # LPDDR5X: ~30 GB/s sustained; X3 core ~1.5x slower per op. Estimates.
        latency=_cpu(35 * GFLOP, 30e9, 1.5),
        rtt_s=0.03,  # Opensignal: 5G latency ~25-35 ms medians. Estimate.
    ),
    # Laptop, 8-core x86 CPU with AVX2/FMA (Ryzen 7 5800U / Core i7-1260P class), on Wi-Fi 6.
    "laptop_cpu": DeviceProfile(
        name="laptop_cpu",
        # FP32 peak ~770 GFLOP/s (8 cores x 3.0 GHz x 32 FLOP/cycle); HPL (FP64) on a Framework
        # 13 (Ryzen AI 340) is 88.8 GFLOP/s (geerlingguy/top500-benchmark). PyTorch/oneDNN
        # training ~13% of FP32 peak under a 15-28 W limit -> ~100 GFLOP/s. Estimate.
        flops=100 * GFLOP,
        memory_bytes=8 * GiB,  # 16 GB machine, half for training. Estimate.
        # Wi-Fi 6 office/home link, iperf ~300 Mbit/s down, ~200 up. Estimate.
        uplink_bps=200 * MBIT,
        downlink_bps=300 * MBIT,
        # Framework 13 AMD drew 41.6 W at the wall under HPL (same source); ~35 W for PyTorch.
        power_active_w=35.0,
        power_idle_w=6.0,  # Idle, screen on, ~5-8 W. Estimate.
        power_radio_w=1.5,  # Wi-Fi card while transferring. Estimate.
        # Dual-channel DDR4/LPDDR5: ~25 GB/s STREAM; cores as fast as the reference. Estimates.
        latency=_cpu(100 * GFLOP, 25e9, 1.0),
        rtt_s=0.003,  # Wi-Fi 6 LAN. Estimate.
    ),
    # Edge server: one NVIDIA T4 in a 1U host, on 10 GbE.
    "edge_gpu_server": DeviceProfile(
        name="edge_gpu_server",
        # T4 datasheet: 8.1 TFLOP/s FP32, 65 TFLOP/s FP16 mixed precision. Small-CNN training
        # is launch/bandwidth bound: ~35% of FP32 peak (or ~5% of tensor peak with AMP)
        # -> ~3 TFLOP/s. Estimate.
        flops=3000 * GFLOP,
        memory_bytes=15 * GiB,  # T4 datasheet: 16 GB GDDR6, minus CUDA context.
        uplink_bps=9400 * MBIT,  # 10 GbE: iperf ~9.4 Gbit/s.
        downlink_bps=9400 * MBIT,
        # T4 board power 70 W (datasheet) + ~100 W host under load. Estimate.
        power_active_w=170.0,
        power_idle_w=60.0,  # Host idle ~50 W + T4 idle ~10 W. Estimate.
        power_radio_w=5.0,  # 10 GbE NIC. Estimate.
        # T4 datasheet: 320 GB/s GDDR6; x86 host + CUDA launch ~10 us per kernel. Estimates.
        latency=_gpu(3000 * GFLOP, 320e9, 1e-5, 5e-4),
        rtt_s=0.0002,  # 10 GbE LAN. Estimate.
    ),
    # Cloud GPU: one NVIDIA A100 40 GB SXM.
    "cloud_gpu": DeviceProfile(
        name="cloud_gpu",
        # A100 datasheet: 19.5 TFLOP/s FP32, 156 TF32, 312 FP16 tensor. Small models reach
        # ~13% of TF32 peak -> ~20 TFLOP/s (MLPerf-scale models reach far more). Estimate.
        flops=20000 * GFLOP,
        memory_bytes=38 * GiB,  # 40 GB HBM2 minus CUDA context.
        uplink_bps=25000 * MBIT,  # Typical cloud GPU instance network, 25 Gbit/s. Estimate.
        downlink_bps=25000 * MBIT,
        power_active_w=550.0,  # 400 W SXM TDP (datasheet) + host share. Estimate.
        power_idle_w=150.0,  # Estimate.
        power_radio_w=10.0,  # Estimate.
        # A100 datasheet: 1555 GB/s HBM2; ~8 us per eagerly launched kernel. Estimates.
        latency=_gpu(20000 * GFLOP, 1555e9, 8e-6, 4e-4),
        rtt_s=0.001,  # within a cloud region. Estimate.
    ),
}


def resolve_profile(name: str, custom: Mapping[str, ProfileConfig] | None = None) -> DeviceProfile:
    """The profile called ``name``: the job's own ``fleet.profiles`` win over the catalog,
    so users can correct a built-in class with their measurements without renaming it."""
    if custom and name in custom:
        c = custom[name]
        return DeviceProfile(
            name=name,
            flops=float(c.flops),
            memory_bytes=int(c.memory_bytes),
            uplink_bps=float(c.uplink_bps),
            downlink_bps=float(c.downlink_bps),
            power_active_w=float(c.power_active_w),
            power_idle_w=float(c.power_idle_w),
            power_radio_w=float(c.power_radio_w),
            latency=latency_params(c.latency) if c.latency is not None else None,
            rtt_s=float(c.rtt_s),
        )
    if name in CATALOG:
        return CATALOG[name]
    known = [*(custom or {}), *(k for k in CATALOG if k not in (custom or {}))]
    raise FlexrayError(
        f"unknown device class {name!r}; known: {', '.join(known)} (or define it under fleet.profiles)"
    )


def latency_params(cfg: LatencyConfig) -> LatencyParams:
    """The typed latency model of a ``fleet.profiles`` entry."""
    return LatencyParams(float(cfg.step_s), tuple(
        KindRates(**getattr(cfg, kind).model_dump()) for kind in KINDS))


def latency_yaml(params: LatencyParams) -> str:
    """The flow-style YAML block ``flexray probe`` prints (``.inf``: a rate that does not limit)."""
    def num(v: float) -> str:
        return ".inf" if math.isinf(v) else yaml_float(v)

    kinds = ", ".join(
        f"{kind}: {{{', '.join(f'{f.name}: {num(getattr(r, f.name))}' for f in dataclasses.fields(r))}}}"
        for kind, r in zip(KINDS, params.kinds))
    return f"{{step_s: {num(params.step_s)}, {kinds}}}"


def yaml_float(v: float) -> str:
    """4 significant digits; PyYAML reads 1e+08 as a string, so write 1.0e+08."""
    text = f"{float(v):.4g}"
    mantissa, e, exp = text.partition("e")
    return f"{mantissa}.0{e}{exp}" if e and "." not in mantissa else text
