"""Engine-side device management: NVML telemetry, device slots, machine-wide device locks."""
