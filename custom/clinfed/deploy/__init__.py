"""Deploying clinfed as a real FLARE federation: provision signed kits, run them, submit jobs.

- `provision`: FLARE's provisioner on `provisioning/*.yml`, clinfed's site policy in every kit;
  `add_site` grows a running federation without re-issuing anyone's kit.
- `federation`: `up` / `down` a provisioned federation on this host (loopback only), by PID.
- `submit`: a job from an admin's kit through FLARE's API, results downloaded.
- `poc`: `nvflare poc` with the same kits.
- `commands`: the `clinfed provision|up|down|submit|poc` subcommands.
"""
