"""Launchers of `rrvf_jax.main`: XManager (xm_launch), GKE manifests (gke), TPU VMs (tpu_vm.sh)."""
