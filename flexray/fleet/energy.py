"""The latency and energy model shared by the throttle and the scheduler.

Keeping both in one place means the scheduler's prediction and the throttle's simulated time
can never disagree about what a device costs.
"""

from __future__ import annotations

from flexray.fleet.profiles import DeviceProfile


def energy_j(profile: DeviceProfile, compute_s: float, comm_s: float, idle_s: float = 0.0) -> float:
    """Joules a device spends on one task.

    compute: ``power_active_w`` is whole-device power under full compute load, so it already
    includes the baseline. communication: the device is otherwise idle, so it pays its idle
    baseline plus the radio's extra ``power_radio_w`` (radios are measured as a delta over
    idle). waiting (``idle_s``, e.g. for a straggler or the server): idle baseline only.
    Compute and communication are treated as sequential, the conservative case for a
    round-based protocol (download, train, upload).
    """
    return (
        profile.power_active_w * compute_s
        + profile.power_radio_w * comm_s
        + profile.power_idle_w * (comm_s + idle_s)
    )


def predict_times(
    profile: DeviceProfile, speed: float, flops: float, bytes_down: float, bytes_up: float
) -> tuple[float, float, float]:
    """(download_s, compute_s, upload_s) for ``flops`` of training at trace ``speed``,
    with bandwidth in bits/s and payloads in bytes."""
    download_s = 8.0 * bytes_down / profile.downlink_bps
    compute_s = flops / (profile.flops * speed)
    upload_s = 8.0 * bytes_up / profile.uplink_bps
    return download_s, compute_s, upload_s
