"""Device classes: the numbers the latency and energy model run on.

``flops`` is *sustained training* throughput with PyTorch, not the datasheet peak: small-batch
CNN training on edge hardware reaches only a few to a few tens of percent of peak (kernel
launch overhead, memory bandwidth, thermal throttling). Every number below names its source;
"estimate" marks numbers that are judgement calls from a source rather than measurements.
Users who have measured their own hardware should override them under ``fleet.profiles``.
"""

from __future__ import annotations

from collections.abc import Mapping

from flexray.config import ProfileConfig
from flexray.errors import FlexrayError
from flexray.protocol import DeviceProfile

__all__ = ["CATALOG", "DeviceProfile", "GFLOP", "GiB", "MBIT", "resolve_profile"]

GiB = 1024**3
MBIT = 1e6
GFLOP = 1e9


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
        )
    if name in CATALOG:
        return CATALOG[name]
    known = [*(custom or {}), *(k for k in CATALOG if k not in (custom or {}))]
    raise FlexrayError(
        f"unknown device class {name!r}; known: {', '.join(known)} (or define it under fleet.profiles)"
    )
