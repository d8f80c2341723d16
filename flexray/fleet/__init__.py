"""Who the devices are: profiles, speed/availability traces, energy model, actors."""
