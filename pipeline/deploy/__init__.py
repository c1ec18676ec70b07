"""Deploying bare metal from built images: the node inventory, per-node kickstarts, the PXE
tree that serves them, and booting nodes from the network."""
